//go:build noucx

package native

import (
	"context"
	"fmt"
	"time"
	"unsafe"
)

// XferBuilt reports whether this build has the UCX transfer component; the
// `noucx` build tag leaves it out and every call fails with ErrNotSupported.
const XferBuilt = false

// XferCancelGrace mirrors xfer.go's (callers budget for it).
const XferCancelGrace = time.Second

var errNoUCX = fmt.Errorf("%w: UCX not built (noucx build tag)", ErrNotSupported)

// XferAgent is the UCX transfer agent; see xfer.go. Not in this build.
type XferAgent struct{}

// XferMem is registered memory; not in this build.
type XferMem struct{}

// XferPeer is a transfer peer; not in this build.
type XferPeer struct{}

func NewXferAgent() (*XferAgent, error)                                      { return nil, errNoUCX }
func (a *XferAgent) Address() []byte                                         { return nil }
func (a *XferAgent) Close() error                                            { return nil }
func (a *XferAgent) RegisterPool(*Pool) (*XferMem, error)                    { return nil, errNoUCX }
func (a *XferAgent) RegisterMemory(unsafe.Pointer, uint64) (*XferMem, error) { return nil, errNoUCX }
func (a *XferAgent) Connect([]byte) (*XferPeer, error)                       { return nil, errNoUCX }
func (m *XferMem) RKey() []byte                                              { return nil }
func (m *XferMem) Base() uint64                                              { return 0 }
func (m *XferMem) Size() uint64                                              { return 0 }
func (m *XferMem) Close() error                                              { return nil }
func (p *XferPeer) AddRemoteRegion([]byte, uint64, uint64) (RemoteRegion, error) {
	return 0, errNoUCX
}
func (p *XferPeer) Err() error { return errNoUCX }
func (p *XferPeer) Get(context.Context, RemoteRegion, *XferMem, []XferOp) error {
	return errNoUCX
}
func (p *XferPeer) Close() error { return nil }
