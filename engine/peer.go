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
// engine's sealed blocks. The control plane (engine/peer, gRPC over TCP)
// carries the calls below; the bytes move over the transport of
// peertransport.go: the validated stream (peerread.go: only whole shares of
// a transfer the reader opened, by its handle) or, on RDMA fabrics, UCX
// one-sided reads of pools registered remote-read-only.
//
//   - PeerHandshake returns the epoch (new on every start: extents of
//     another epoch name memory of a process that is gone) and, with
//     PeerTransportRDMA only, the UCX worker address and every pool's
//     remote key and extent.
//   - OpenPeerTransfer pins the sealed prefix of the asked hashes and says
//     where each rank's share lies. A pinned block is never evicted, so
//     its extents stay valid until ReleasePeerTransfer or the TTL, and
//     past either for as long as a validated read of them is being sent.
//
// The reader's reads complete before it releases (or it stopped answering
// and its connection was closed), so no read of an extent that was reused
// can be served to a reader that still wants it.

// Errors of the peer plane besides the engine's kinds.
var (
	// ErrPeerEpoch: the peer's epoch is not the one the caller holds: it
	// restarted, and its pools' contents and keys are new.
	ErrPeerEpoch = errors.New("peer epoch changed")
	// ErrPeerUnavailable: the peer could not be reached or answered with
	// an error that is not one of the engine's kinds.
	ErrPeerUnavailable = errors.New("peer unavailable")
	// ErrPeerConnection: the connection to the peer broke mid-read.
	ErrPeerConnection = errors.New("peer connection lost")
)

// PeerControl is the control plane to other engines, addressed by their
// --peer-addr (engine/peer's Client). Errors wrap ErrPermission (refused:
// token), ErrNotFound, ErrPeerEpoch, ErrPeerUnavailable or ctx's error.
type PeerControl interface {
	Handshake(ctx context.Context, addr string) (*pb.PeerHandshakeResponse, error)
	OpenTransfer(ctx context.Context, addr string, req *pb.PeerOpenTransferRequest) (*pb.PeerOpenTransferResponse, error)
	ReleaseTransfer(ctx context.Context, addr, handle string) error
	// Read reads whole shares of the open transfer handle from the peer's
	// validated stream into each read's Dst (PeerTransportTCP). It returns
	// only once no byte can land in any Dst any more, ctx's end included.
	// Errors wrap ErrPeerConnection (the stream broke) besides the above.
	Read(ctx context.Context, addr, handle string, reads []PeerShareRead) error
}

// PeerShareRead is one share to read: its extent in the peer's pools and
// the local memory (len(Dst) == Ext.Len) it lands in.
type PeerShareRead struct {
	Ext PeerExtent
	Dst []byte
}

// MaxPeerOpenHashes bounds the hashes of one OpenPeerTransfer (1M tokens
// at block size 16), and so the peer port's largest request message; a
// longer fetch is cut to it (a shorter hit).
const MaxPeerOpenHashes = 1 << 16

// DefaultPeerOpenTTL bounds how long an open peer transfer pins blocks
// when the reader asks for no TTL; a reader's TTL is capped at 10x it.
const DefaultPeerOpenTTL = 30 * time.Second

// peerOpen is a transfer a reader opened: the blocks it pinned, and the
// P/D transfer it named (released with it: see ReleasePeerTransfer).
type peerOpen struct {
	blocks     []*block
	expires    time.Time
	transferID string
	// shares are the extents a validated read may name (peerread.go),
	// each with its length (its group's share of a rank).
	shares map[shareKey]uint64
	// readers counts validated reads being sent; a transfer released or
	// expired meanwhile (closed) is unpinned when the last one ends.
	readers int
	closed  bool
}

// Epoch changes on every engine start.
func (e *Engine) Epoch() string { return e.epoch }

// PeerHandshake is what a reader needs to read this engine's pools.
// ErrPrecondition when the engine was started without peers.
func (e *Engine) PeerHandshake() (*pb.PeerHandshakeResponse, error) {
	if e.peers == nil {
		return nil, fmt.Errorf("%w: engine started without peer transfers", ErrPrecondition)
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if err := e.checkOpen(); err != nil {
		return nil, err
	}
	resp := &pb.PeerHandshakeResponse{Epoch: e.epoch, EngineVersion: e.cfg.Version}
	if x := e.peers.ucx; x != nil {
		resp.WorkerAddress = x.agent.Address()
		for _, m := range x.mems {
			resp.Pools = append(resp.Pools, &pb.PeerPool{Rkey: m.RKey(), Base: m.Base(), Size: m.Size()})
		}
	}
	return resp, nil
}

// OpenPeerTransfer pins the longest sealed prefix of req.Hashes (in
// req.NamespaceId, or in the namespace of the transfer req.TransferId
// names; in a namespace with groups, the blocks of the hybrid boundary,
// each naming its group and position) and returns every rank's share
// extent of each of its blocks. With
// TransferId and WaitMs it first waits (bounded) for that transfer to
// settle. No block: an empty answer without a handle.
func (e *Engine) OpenPeerTransfer(ctx context.Context, req *pb.PeerOpenTransferRequest) (*pb.PeerOpenTransferResponse, error) {
	if req.Epoch != e.epoch {
		return nil, fmt.Errorf("%w: asked for epoch %q, this engine is at %q", ErrPeerEpoch, req.Epoch, e.epoch)
	}
	if err := validatePeerOpen(req); err != nil {
		return nil, err
	}
	if req.TransferId != "" && req.WaitMs > 0 {
		wctx, cancel := context.WithTimeout(ctx, min(time.Duration(req.WaitMs)*time.Millisecond, e.cfg.MaxQueryWait))
		_ = e.AwaitTransfer(wctx, req.TransferId) // failed or late: whatever is sealed is served
		cancel()
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
	resp := &pb.PeerOpenTransferResponse{Epoch: e.epoch}
	if !ns.hybrid {
		resp.RankBytes = ns.groups[0].rankBytes
	}
	if e.tier != nil {
		// Blocks on this engine's SSD are served to peers too, once back
		// in the pool (within the tier's promote budget).
		if ps := e.promoteLocked(ns, req.Hashes, req.FirstBlock); len(ps) > 0 {
			e.mu.Unlock()
			awaitPromotions(ctx, ps, time.Now().Add(e.cfg.SSD.PromoteWait))
			e.mu.Lock()
			if err := e.checkOpen(); err != nil {
				return nil, err
			}
		}
	}
	hit, _ := e.hitLocked(ns, req.Hashes, req.FirstBlock)
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
	o := &peerOpen{blocks: make([]*block, 0, hit), expires: time.Now().Add(ttl), transferID: req.TransferId,
		shares: make(map[shareKey]uint64, hit*int(ns.desc.TPSize))}
	resp.Blocks = make([]*pb.PeerBlock, 0, hit)
	// Without groups: the sealed prefix, in order. With groups: every
	// group's needed blocks of the hybrid boundary, named.
	e.neededLocked(ns, req.Hashes, req.FirstBlock, hit, func(g *nsGroup, i int, b *block) {
		e.pinLocked(b)
		o.blocks = append(o.blocks, b)
		pbb := &pb.PeerBlock{Shares: make([]*pb.PeerExtent, len(b.shares))}
		if ns.hybrid {
			pbb.Group, pbb.Position = g.index, uint32(i)
		}
		for r, s := range b.shares {
			pbb.Shares[r] = &pb.PeerExtent{Pool: uint32(s.pool), Offset: s.ext.off, Length: g.rankBytes}
			o.shares[shareKey{s.pool, s.ext.off}] = g.rankBytes
		}
		resp.Blocks = append(resp.Blocks, pbb)
	})
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

// releasePeerOpenLocked forgets the open transfer (no new read may name
// it) and unpins its blocks, at once or when its last read ends.
func (e *Engine) releasePeerOpenLocked(handle string, o *peerOpen) {
	delete(e.peerOpens, handle)
	o.closed = true
	if o.readers == 0 {
		e.unpinPeerOpenLocked(o)
	}
}

func (e *Engine) unpinPeerOpenLocked(o *peerOpen) {
	for _, b := range o.blocks {
		e.unpinLocked(b)
	}
	o.blocks, o.shares = nil, nil
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
