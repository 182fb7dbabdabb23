package engine

import (
	"context"
	"errors"
	"fmt"
	"time"

	pb "github.com/pegaflow/pegaflow/engine/api/pegaflowv1"
	"github.com/pegaflow/pegaflow/internal/ids"
)

// The peer side of cross-host P/D: another engine (the reader) reads this
// engine's sealed blocks straight out of its pools over UCX. The control
// plane (engine/peer, gRPC over TCP) carries the calls below; the bytes
// never pass through Go.
//
//   - PeerHandshake exports the UCX worker address, every pool's remote key
//     and extent, and the epoch (new on every start: extents of another
//     epoch name memory of a process that is gone).
//   - OpenPeerTransfer pins the sealed prefix of the asked hashes and says
//     where each rank's share lies. A pinned block is never evicted, so
//     its extents stay valid until ReleasePeerTransfer or the TTL.
//
// The reader's UCX GETs complete before it releases (or it stopped
// answering and its endpoint was closed), so no read of an extent that was
// reused can be served to a reader that still wants it.

// Errors of the peer plane besides the engine's kinds.
var (
	// ErrPeerEpoch: the peer's epoch is not the one the caller holds: it
	// restarted, and its pools' contents and keys are new.
	ErrPeerEpoch = errors.New("peer epoch changed")
	// ErrPeerUnavailable: the peer could not be reached or answered with
	// an error that is not one of the engine's kinds.
	ErrPeerUnavailable = errors.New("peer unavailable")
)

// PeerControl is the control plane to other engines, addressed by their
// --peer-addr (engine/peer's Client). Errors wrap ErrPermission (refused:
// token), ErrNotFound, ErrPeerEpoch, ErrPeerUnavailable or ctx's error.
type PeerControl interface {
	Handshake(ctx context.Context, addr string) (*pb.PeerHandshakeResponse, error)
	OpenTransfer(ctx context.Context, addr string, req *pb.PeerOpenTransferRequest) (*pb.PeerOpenTransferResponse, error)
	ReleaseTransfer(ctx context.Context, addr, handle string) error
}

// DefaultPeerOpenTTL bounds how long an open peer transfer pins blocks
// when the reader asks for no TTL; a reader's TTL is capped at 10x it.
const DefaultPeerOpenTTL = 30 * time.Second

// peerOpen is a transfer a reader opened: the blocks it pinned, and the
// P/D transfer it named (released with it: see ReleasePeerTransfer).
type peerOpen struct {
	blocks     []*block
	expires    time.Time
	transferID string
}

// Epoch changes on every engine start.
func (e *Engine) Epoch() string { return e.epoch }

// PeerHandshake is what a reader needs to read this engine's pools.
// ErrPrecondition when the engine was started without peers.
func (e *Engine) PeerHandshake() (*pb.PeerHandshakeResponse, error) {
	if e.xfer == nil {
		return nil, fmt.Errorf("%w: engine started without peer transfers", ErrPrecondition)
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if err := e.checkOpen(); err != nil {
		return nil, err
	}
	resp := &pb.PeerHandshakeResponse{Epoch: e.epoch, WorkerAddress: e.xfer.agent.Address(), EngineVersion: e.cfg.Version}
	for _, m := range e.xfer.mems {
		resp.Pools = append(resp.Pools, &pb.PeerPool{Rkey: m.RKey(), Base: m.Base(), Size: m.Size()})
	}
	return resp, nil
}

// OpenPeerTransfer pins the longest sealed prefix of req.Hashes (in
// req.NamespaceId, or in the namespace of the transfer req.TransferId
// names) and returns every rank's share extent of each of its blocks. With
// TransferId and WaitMs it first waits (bounded) for that transfer to
// settle. No block: an empty answer without a handle.
func (e *Engine) OpenPeerTransfer(ctx context.Context, req *pb.PeerOpenTransferRequest) (*pb.PeerOpenTransferResponse, error) {
	if req.Epoch != e.epoch {
		return nil, fmt.Errorf("%w: asked for epoch %q, this engine is at %q", ErrPeerEpoch, req.Epoch, e.epoch)
	}
	if len(req.Hashes) > MaxQueryHashes {
		return nil, invalid("%d hashes in one transfer, max %d", len(req.Hashes), MaxQueryHashes)
	}
	for i, h := range req.Hashes {
		if err := validateHash(i, h); err != nil {
			return nil, err
		}
	}
	if req.TransferId != "" {
		if err := validateTransfer(req.TransferId, ""); err != nil {
			return nil, err
		}
		if req.WaitMs > 0 {
			wctx, cancel := context.WithTimeout(ctx, min(time.Duration(req.WaitMs)*time.Millisecond, e.cfg.MaxQueryWait))
			_ = e.AwaitTransfer(wctx, req.TransferId) // failed or late: whatever is sealed is served
			cancel()
		}
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if err := e.checkOpen(); err != nil {
		return nil, err
	}
	ns, err := e.peerNamespaceLocked(req.NamespaceId, req.TransferId)
	if err != nil {
		return nil, err
	}
	resp := &pb.PeerOpenTransferResponse{Epoch: e.epoch, RankBytes: ns.rankBytes}
	hit, _ := e.prefixLocked(ns, req.Hashes)
	if hit == 0 {
		return resp, nil
	}
	if len(e.peerOpens) >= e.cfg.MaxTransfers {
		return nil, fmt.Errorf("%w: %d peer transfers open, the engine's limit (--max-transfers)", ErrExhausted, len(e.peerOpens))
	}
	ttl := e.cfg.PeerOpenTTL
	if req.TtlMs > 0 {
		ttl = min(time.Duration(req.TtlMs)*time.Millisecond, 10*e.cfg.PeerOpenTTL)
	}
	o := &peerOpen{blocks: make([]*block, 0, hit), expires: time.Now().Add(ttl), transferID: req.TransferId}
	resp.Blocks = make([]*pb.PeerBlock, hit)
	for i, h := range req.Hashes[:hit] {
		b := ns.blocks[string(h)]
		e.pinLocked(b)
		o.blocks = append(o.blocks, b)
		pbb := &pb.PeerBlock{Shares: make([]*pb.PeerExtent, len(b.shares))}
		for r, s := range b.shares {
			pbb.Shares[r] = &pb.PeerExtent{Pool: uint32(s.pool), Offset: s.ext.off, Length: ns.rankBytes}
		}
		resp.Blocks[i] = pbb
	}
	resp.Handle = ids.New("pt-")
	e.peerOpens[resp.Handle] = o
	return resp, nil
}

func (e *Engine) peerNamespaceLocked(nsID, transferID string) (*namespace, error) {
	if nsID == "" {
		if t, ok := e.transfers[transferID]; ok && transferID != "" && t.ns != nil {
			return t.ns, nil
		}
		return nil, fmt.Errorf("%w: transfer %q (and no namespace_id given)", ErrNotFound, transferID)
	}
	ns, ok := e.namespaces[nsID]
	if !ok {
		return nil, fmt.Errorf("%w: namespace %q", ErrNotFound, nsID)
	}
	return ns, nil
}

// ReleasePeerTransfer unpins an open peer transfer; ErrNotFound when it
// is unknown, released or expired. A P/D transfer the open named is
// released too: the reader consumed it, as a local D's Release would
// (else its blocks stay pinned here until the transfer TTL, and a busy P
// fills its pool with them). An open that merely expired (the reader died
// or was cut off) leaves the transfer to its own TTL.
func (e *Engine) ReleasePeerTransfer(handle string) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	o, ok := e.peerOpens[handle]
	if !ok {
		return fmt.Errorf("%w: peer transfer %q", ErrNotFound, handle)
	}
	e.releasePeerOpenLocked(handle, o)
	if o.transferID != "" {
		e.releaseTransferLocked(o.transferID)
	}
	return nil
}

func (e *Engine) releasePeerOpenLocked(handle string, o *peerOpen) {
	for _, b := range o.blocks {
		e.unpinLocked(b)
	}
	o.blocks = nil
	delete(e.peerOpens, handle)
}

// expirePeerOpensLocked drops the pins of open transfers past their TTL
// (a reader that died or was partitioned away).
func (e *Engine) expirePeerOpensLocked(now time.Time) {
	for h, o := range e.peerOpens {
		if now.After(o.expires) {
			e.releasePeerOpenLocked(h, o)
		}
	}
}
