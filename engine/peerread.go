package engine

import (
	"fmt"
	"time"
)

// The validated read (PeerTransportTCP): a reader that opened a transfer
// here asks for shares of it by the transfer's handle, and gets bytes only
// for extents that are exactly shares of that transfer's blocks. The
// handle is a 128-bit random capability returned over the authenticated
// control plane; an extent anywhere else (another transfer's blocks, free
// pool memory, an address beyond the pool) is refused before any byte is
// sent. Nothing is ever written here by a reader.

// MaxPeerReadExtents bounds the extents of one read request, and so the
// work and memory one request costs the serving engine.
const MaxPeerReadExtents = 16384

// MaxPeerReadBytes bounds the bytes one read request asks for.
const MaxPeerReadBytes = 256 << 20

// PeerExtent names one share in a peer's pools (PeerExtent of peer.proto).
type PeerExtent struct {
	Pool   uint32
	Offset uint64
	Len    uint64
}

// shareKey identifies a share of an open transfer for the read check.
type shareKey struct {
	pool int
	off  uint64
}

// PeerRead is a validated read being served: Src[i] is the pool memory of
// the i-th extent asked for. The transfer's blocks stay pinned, and the
// engine's pools mapped, until Done; Done must be called exactly once, when
// no byte of Src is read any more.
type PeerRead struct {
	Src  [][]byte
	done func()
}

// Done ends the read.
func (r *PeerRead) Done() { r.done() }

// OpenPeerRead checks exts against the open transfer handle names and
// returns the memory to send. ErrNotFound for an unknown, released or
// expired handle; ErrInvalid for an extent that is not one whole share of
// that transfer, or for a request over the bounds.
func (e *Engine) OpenPeerRead(handle string, exts []PeerExtent) (*PeerRead, error) {
	if len(exts) == 0 || len(exts) > MaxPeerReadExtents {
		return nil, invalid("%d extents in one read, want 1..%d", len(exts), MaxPeerReadExtents)
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if err := e.checkOpen(); err != nil {
		return nil, err
	}
	o, ok := e.peerOpens[handle]
	if !ok || time.Now().After(o.expires) {
		return nil, fmt.Errorf("%w: peer transfer %q", ErrNotFound, handle)
	}
	var total uint64
	src := make([][]byte, len(exts))
	for i, x := range exts {
		if n, ok := o.shares[shareKey{int(x.Pool), x.Offset}]; !ok || x.Len != n {
			return nil, invalid("extent %d (pool %d, offset %d, %d bytes) is not a share of transfer %q", i, x.Pool, x.Offset, x.Len, handle)
		}
		if total += x.Len; total > MaxPeerReadBytes {
			return nil, invalid("read of more than %d bytes in one request", MaxPeerReadBytes)
		}
		// In bounds: the share was allocated in this pool (checked by the
		// allocator), and its block is pinned, so the extent is neither
		// freed nor reused while the read holds the transfer.
		src[i] = e.pools[x.Pool].mem.Bytes()[x.Offset : x.Offset+x.Len]
	}
	o.readers++
	e.copies.Add(1) // under e.mu: Close waits for the read before the pools go
	return &PeerRead{Src: src, done: func() {
		e.mu.Lock()
		defer e.mu.Unlock()
		o.readers--
		if o.readers == 0 && o.closed {
			e.unpinPeerOpenLocked(o)
		}
		e.copies.Done()
	}}, nil
}
