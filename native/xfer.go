//go:build !noucx

package native

/*
#cgo pkg-config: ucx
#include <stdlib.h>
#include "pegaflow_xfer.h"
*/
import "C"

import (
	"context"
	"fmt"
	"sync"
	"time"
	"unsafe"
)

// XferBuilt reports whether this build has the UCX transfer component (the
// `noucx` build tag leaves it out).
const XferBuilt = true

// Compile-time checks that the Go mirrors match the C layout.
var (
	_ [unsafe.Sizeof(XferOp{}) - unsafe.Sizeof(C.pf_xfer_op{})]struct{}
	_ [unsafe.Sizeof(C.pf_xfer_op{}) - unsafe.Sizeof(XferOp{})]struct{}
	_ [MaxXferOps - C.PF_XFER_MAX_OPS]struct{}
	_ [C.PF_XFER_MAX_OPS - MaxXferOps]struct{}
)

// XferAgent reads peers' registered memory over UCX (pegaflow_xfer.h): one
// UCX context and worker, and a native progress thread that also serves
// peers reading this agent's memory (over TCP a GET is emulated by the
// target's progress, so an agent must stay open while peers read it).
// UCX takes its configuration (UCX_TLS, UCX_NET_DEVICES,
// UCX_TCP_PORT_RANGE, ...) from the environment at NewXferAgent.
//
// Every method of the agent, its memories and peers is safe for concurrent
// use. Close of any of them never races with a call that uses it: Go locks
// serialise Close against calls into C, and the C side keeps memory and
// peers alive while batches use them.
type XferAgent struct {
	mu   sync.RWMutex // shared by calls into C, exclusive by Close
	a    *C.pf_xfer_agent
	done *completions
	addr []byte

	kmu   sync.Mutex // guards peers and mems
	peers map[*XferPeer]struct{}
	mems  map[*XferMem]struct{}

	closeOnce sync.Once
	closeErr  error
}

// NewXferAgent creates an agent.
func NewXferAgent() (*XferAgent, error) {
	done, err := newCompletions("pegaflow-xfer-completions")
	if err != nil {
		return nil, err
	}
	a := &XferAgent{done: done, peers: map[*XferPeer]struct{}{}, mems: map[*XferMem]struct{}{}}
	if rc := C.pf_xfer_agent_create(C.int(done.writeFd), &a.a); rc != C.PF_OK {
		done.abort()
		return nil, codeErr(int64(rc), "UCX transfer agent")
	}
	done.start()
	var n C.uint64_t
	if rc := C.pf_xfer_agent_address(a.a, nil, 0, &n); rc == C.PF_OK && n > 0 {
		a.addr = make([]byte, n)
		C.pf_xfer_agent_address(a.a, (*C.uint8_t)(unsafe.Pointer(&a.addr[0])), n, &n)
	}
	return a, nil
}

// Address is the worker address blob a peer passes to Connect.
func (a *XferAgent) Address() []byte { return append([]byte(nil), a.addr...) }

// Close closes the agent's remaining peers (their in-flight Gets fail)
// and memories, then stops the agent. Repeated calls return the first
// result.
func (a *XferAgent) Close() error {
	a.closeOnce.Do(func() {
		a.kmu.Lock()
		peers, mems := a.peers, a.mems
		a.peers, a.mems = nil, nil
		a.kmu.Unlock()
		for p := range peers {
			p.close()
		}
		for m := range mems {
			m.close()
		}
		a.mu.Lock()
		rc := C.pf_xfer_agent_destroy(a.a)
		a.a = nil
		a.mu.Unlock()
		if err := a.done.close(); err != nil {
			a.closeErr = err
		}
		if rc != C.PF_OK {
			a.closeErr = codeErr(int64(rc), "destroy UCX transfer agent")
		}
	})
	return a.closeErr
}

// track records a child for Close; false once the agent is closing.
func track[T comparable](a *XferAgent, set func() map[T]struct{}, k T) bool {
	a.kmu.Lock()
	defer a.kmu.Unlock()
	m := set()
	if m == nil {
		return false
	}
	m[k] = struct{}{}
	return true
}

func untrack[T comparable](a *XferAgent, set func() map[T]struct{}, k T) {
	a.kmu.Lock()
	defer a.kmu.Unlock()
	delete(set(), k) // nil map (agent closing): no-op
}

// XferMem is local memory registered with an agent: the source of peers'
// reads and the destination of this agent's Gets.
type XferMem struct {
	agent *XferAgent
	mu    sync.RWMutex // shared by Gets while they submit, exclusive by Close
	m     *C.pf_xfer_mem
	rkey  []byte
	base  uint64
	size  uint64
	pool  *Pool // kept reachable while registered
}

// RegisterPool registers a whole pool. The pool cannot be closed
// (ErrClosed) until the memory is closed.
func (a *XferAgent) RegisterPool(p *Pool) (*XferMem, error) {
	if p == nil {
		return nil, fmt.Errorf("%w: nil pool", ErrInvalid)
	}
	p.mu.RLock()
	defer p.mu.RUnlock()
	if p.p == nil {
		return nil, fmt.Errorf("%w: pool", ErrClosed)
	}
	return a.register(func(m **C.pf_xfer_mem) C.int { return C.pf_xfer_mem_register_pool(a.a, p.p, m) }, p)
}

// RegisterMemory registers size bytes at base: memory Go does not manage
// (an mmap, C memory), which must stay mapped until the XferMem is closed.
func (a *XferAgent) RegisterMemory(base unsafe.Pointer, size uint64) (*XferMem, error) {
	return a.register(func(m **C.pf_xfer_mem) C.int {
		return C.pf_xfer_mem_register(a.a, base, C.uint64_t(size), m)
	}, nil)
}

func (a *XferAgent) register(reg func(**C.pf_xfer_mem) C.int, pool *Pool) (*XferMem, error) {
	a.mu.RLock()
	defer a.mu.RUnlock()
	if a.a == nil {
		return nil, fmt.Errorf("%w: transfer agent", ErrClosed)
	}
	var cm *C.pf_xfer_mem // a C variable: cgo refuses pointers into Go structs holding Go pointers
	if rc := reg(&cm); rc != C.PF_OK {
		return nil, codeErr(int64(rc), "register memory")
	}
	m := &XferMem{agent: a, m: cm, pool: pool}
	m.base, m.size = uint64(C.pf_xfer_mem_base(m.m)), uint64(C.pf_xfer_mem_size(m.m))
	var n C.uint64_t
	C.pf_xfer_mem_rkey(m.m, nil, 0, &n)
	m.rkey = make([]byte, n)
	if n > 0 {
		C.pf_xfer_mem_rkey(m.m, (*C.uint8_t)(unsafe.Pointer(&m.rkey[0])), n, &n)
	}
	if !track(a, func() map[*XferMem]struct{} { return a.mems }, m) {
		C.pf_xfer_mem_deregister(m.m)
		return nil, fmt.Errorf("%w: transfer agent", ErrClosed)
	}
	return m, nil
}

// RKey is the packed remote key a peer passes to AddRemoteRegion.
func (m *XferMem) RKey() []byte { return append([]byte(nil), m.rkey...) }

// Base is the address peers add the region at (its first byte here).
func (m *XferMem) Base() uint64 { return m.base }

// Size is the registered length in bytes.
func (m *XferMem) Size() uint64 { return m.size }

// Close waits for this agent's Gets into the memory, then unregisters it;
// peers still holding its rkey fail their reads from then on. Repeated
// calls are no-ops.
func (m *XferMem) Close() error {
	untrack(m.agent, func() map[*XferMem]struct{} { return m.agent.mems }, m)
	return m.close()
}

func (m *XferMem) close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.m == nil {
		return nil
	}
	rc := C.pf_xfer_mem_deregister(m.m)
	m.m = nil
	m.pool = nil
	return codeErr(int64(rc), "deregister memory")
}

// XferPeer is an endpoint to another agent and the regions it advertised.
// Once the peer failed (it died, the connection was lost, or a cancel had
// to force the endpoint closed) every Get fails with ErrPeer: close it and
// Connect again.
type XferPeer struct {
	agent *XferAgent
	mu    sync.RWMutex // shared by calls into C, exclusive by Close
	p     *C.pf_xfer_peer
}

// Connect creates an endpoint to the agent whose Address this is (from an
// authenticated peer: UCX parses it without a length check). The
// connection itself is made by the first Get.
func (a *XferAgent) Connect(addr []byte) (*XferPeer, error) {
	a.mu.RLock()
	defer a.mu.RUnlock()
	if a.a == nil {
		return nil, fmt.Errorf("%w: transfer agent", ErrClosed)
	}
	var cp *C.pf_xfer_peer
	if rc := C.pf_xfer_peer_connect(a.a, bytesPtr(addr), C.uint64_t(len(addr)), &cp); rc != C.PF_OK {
		return nil, codeErr(int64(rc), "connect transfer peer")
	}
	p := &XferPeer{agent: a, p: cp}
	if !track(a, func() map[*XferPeer]struct{} { return a.peers }, p) {
		C.pf_xfer_peer_close(p.p)
		return nil, fmt.Errorf("%w: transfer agent", ErrClosed)
	}
	return p, nil
}

func bytesPtr(b []byte) *C.uint8_t {
	if len(b) == 0 {
		return nil
	}
	return (*C.uint8_t)(unsafe.Pointer(&b[0]))
}

// AddRemoteRegion adds a region the peer registered: its RKey, Base and
// Size as the peer advertised them. Gets are bounds-checked against size
// before anything is sent.
func (p *XferPeer) AddRemoteRegion(rkey []byte, base, size uint64) (RemoteRegion, error) {
	p.mu.RLock()
	defer p.mu.RUnlock()
	if p.p == nil {
		return 0, fmt.Errorf("%w: transfer peer", ErrClosed)
	}
	var id C.uint32_t
	if rc := C.pf_xfer_peer_add_region(p.p, bytesPtr(rkey), C.uint64_t(len(rkey)), C.uint64_t(base), C.uint64_t(size), &id); rc != C.PF_OK {
		return 0, codeErr(int64(rc), fmt.Sprintf("add remote region of %d bytes", size))
	}
	return RemoteRegion(id), nil
}

// Err is nil while the peer is usable, else wraps ErrPeer (or ErrClosed).
func (p *XferPeer) Err() error {
	p.mu.RLock()
	defer p.mu.RUnlock()
	if p.p == nil {
		return fmt.Errorf("%w: transfer peer", ErrClosed)
	}
	return codeErr(int64(C.pf_xfer_peer_status(p.p)), "transfer peer")
}

// XferCancelGrace is how long a Get whose ctx ended waits for its GETs
// already in flight (at most a window per peer) before it force-closes
// the peer's endpoint. Tearing an endpoint down under GETs the target is
// still answering can abort the target over TCP (a UCX bug, see
// native/README.md), so a live peer is given this long to finish them.
const XferCancelGrace = time.Second

// Get reads ops from the peer's region into local and blocks until every
// byte arrived, the batch failed (ErrPeer: the peer died or the connection
// was closed) or ctx ended. Every op is checked against the region's
// advertised size and local's size first (ErrRange, nothing sent); at
// most MaxXferOps ops (ErrInvalid). When ctx ends first the batch is
// cancelled: its unposted ops are dropped and Get returns an error
// wrapping ctx.Err() and ErrCanceled once its GETs in flight finished,
// no more bytes can land in local then and the peer stays usable. If
// they do not finish within XferCancelGrace (the peer stopped answering),
// the peer's endpoint is force-closed: every batch on it fails and the
// peer reports ErrPeer from then on.
func (p *XferPeer) Get(ctx context.Context, region RemoteRegion, local *XferMem, ops []XferOp) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if local == nil {
		return fmt.Errorf("%w: nil local memory", ErrInvalid)
	}
	a := p.agent
	token, pend, err := p.submit(region, local, ops)
	if err != nil {
		return err
	}
	select {
	case <-pend.done:
		return pend.err
	case <-ctx.Done():
	}
	a.cancel(token, false)
	grace := time.NewTimer(XferCancelGrace)
	defer grace.Stop()
	select {
	case <-pend.done:
	case <-grace.C:
		a.cancel(token, true)
		<-pend.done
	}
	if pend.err == nil {
		return nil // it completed before the cancel took effect
	}
	return fmt.Errorf("%w: %w", ctx.Err(), pend.err)
}

func (a *XferAgent) cancel(token uint64, force bool) {
	a.mu.RLock()
	defer a.mu.RUnlock()
	if a.a != nil {
		f := C.int(0)
		if force {
			f = 1
		}
		C.pf_xfer_cancel(a.a, C.uint64_t(token), f)
	}
}

func (p *XferPeer) submit(region RemoteRegion, local *XferMem, ops []XferOp) (uint64, *Pending, error) {
	a := p.agent
	a.mu.RLock()
	defer a.mu.RUnlock()
	if a.a == nil {
		return 0, nil, fmt.Errorf("%w: transfer agent", ErrClosed)
	}
	p.mu.RLock()
	defer p.mu.RUnlock()
	if p.p == nil {
		return 0, nil, fmt.Errorf("%w: transfer peer", ErrClosed)
	}
	local.mu.RLock()
	defer local.mu.RUnlock()
	if local.m == nil {
		return 0, nil, fmt.Errorf("%w: local memory", ErrClosed)
	}
	var opsPtr *C.pf_xfer_op
	if len(ops) > 0 {
		opsPtr = (*C.pf_xfer_op)(unsafe.Pointer(&ops[0]))
	}
	token, pend := a.done.add("transfer batch")
	// C reads the ops before returning, so the slice is not retained.
	if rc := C.pf_xfer_get(p.p, C.uint32_t(region), local.m, opsPtr, C.uint64_t(len(ops)), C.uint64_t(token)); rc != C.PF_OK {
		a.done.drop(token)
		return 0, nil, codeErr(int64(rc), fmt.Sprintf("get %d ops", len(ops)))
	}
	return token, pend, nil
}

// Close ends the peer's Gets (ErrCanceled): it stops posting, waits up to
// a second for the GETs in flight, closes the endpoint and returns once UCX
// released it. Repeated calls are no-ops.
func (p *XferPeer) Close() error {
	untrack(p.agent, func() map[*XferPeer]struct{} { return p.agent.peers }, p)
	return p.close()
}

func (p *XferPeer) close() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.p == nil {
		return nil
	}
	rc := C.pf_xfer_peer_close(p.p)
	p.p = nil
	return codeErr(int64(rc), "close transfer peer")
}
