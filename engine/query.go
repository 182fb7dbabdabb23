package engine

import (
	"context"
	"fmt"
	"strings"
	"time"

	pb "github.com/pegaflow/pegaflow/engine/api/pegaflowv1"
	"github.com/pegaflow/pegaflow/internal/ids"
)

// Query returns the longest sealed prefix of req.Hashes, or in a
// namespace with groups the hybrid boundary (hybrid.go). With WaitMs it
// waits (bounded by MaxQueryWait and ctx) for hashes whose save is in
// flight and, with TransferId, for that transfer to settle. The answer
// and its lease are taken under one hold of e.mu.
func (e *Engine) Query(ctx context.Context, req *pb.QueryRequest) (*pb.QueryResponse, error) {
	hashes, err := queryHashes(req)
	if err != nil {
		return nil, err
	}
	if req.TransferId != "" {
		if err := validateTransfer(req.TransferId, ""); err != nil {
			return nil, err
		}
	}
	source, err := e.sourceOf(req)
	if err != nil {
		return nil, err
	}
	wait := min(time.Duration(req.WaitMs)*time.Millisecond, e.cfg.MaxQueryWait)
	deadline := time.Now().Add(wait)
	if source != "" {
		// Within the wait; same-host queries never get here.
		e.fetchFromPeer(ctx, source, req, hashes, wait)
	}
	parent := ctx
	ctx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()

	e.mu.Lock()
	defer e.mu.Unlock()
	s, ns, err := e.sessionNamespaceLocked(req.SessionId, req.NamespaceId)
	if err != nil {
		return nil, err
	}
	s.opened[ns] = struct{}{}
	// With a source engine the transfer is the peer's: nothing here to
	// wait for (unless the source is this engine).
	localTransfer := req.SourceEngine == "" || (source == "" && e.peers != nil)
	if req.TransferId != "" && wait > 0 && localTransfer {
		w, err := e.joinTransferLocked(req.TransferId)
		if err != nil {
			return nil, err
		}
		e.mu.Unlock()
		select {
		case <-w.done:
		case <-ctx.Done():
		}
		e.mu.Lock()
		e.leaveTransferLocked(w)
		if err := e.awakeLocked(s); err != nil {
			return nil, err
		}
	}
	if e.tier != nil {
		if ps := e.promoteLocked(ns, hashes, req.FirstBlock); len(ps) > 0 {
			// SSD reads get at least PromoteWait, even in a Query that
			// waits for nothing else.
			e.mu.Unlock()
			awaitPromotions(parent, ps, deadline.Add(max(0, e.cfg.SSD.PromoteWait-wait)))
			e.mu.Lock()
			if err := e.awakeLocked(s); err != nil {
				return nil, err
			}
		}
	}
	var hit, inflight int
	for {
		hit, inflight = e.hitLocked(ns, hashes, req.FirstBlock)
		if inflight == 0 || wait == 0 {
			break
		}
		changed := e.changed
		e.mu.Unlock()
		select {
		case <-changed:
		case <-ctx.Done():
		}
		e.mu.Lock()
		if err := e.awakeLocked(s); err != nil {
			return nil, err
		}
		if ctx.Err() != nil {
			hit, inflight = e.hitLocked(ns, hashes, req.FirstBlock)
			break
		}
	}
	e.stats.hits += uint64(hit)
	e.stats.misses += uint64(len(hashes) - hit)
	e.attributeLocked(ns, hashes, hit)
	if e.tier != nil && req.TransferId == "" {
		// A prefix hit (not the load of one's own P/D transfer) proves
		// reuse: the SSD tier writes these blocks in the background.
		e.provenHitLocked(ns, hashes, req.FirstBlock, hit)
	}
	resp := &pb.QueryResponse{NumHit: uint32(hit), NumInflight: uint32(inflight)}
	var needed []*block
	if ns.hybrid || (req.Lease && hit > 0) {
		// (Without groups prefixLocked touched them already.)
		needed = e.leaseBlocksLocked(ns, hashes, req.FirstBlock, hit)
	}
	if req.Lease && hit > 0 {
		ttl := e.cfg.LeaseTTL
		if req.LeaseTtlMs > 0 {
			ttl = min(time.Duration(req.LeaseTtlMs)*time.Millisecond, 10*e.cfg.LeaseTTL)
		}
		l := &lease{session: s, ranks: ns.allRanks, expires: time.Now().Add(ttl), blocks: needed}
		for _, b := range needed {
			e.pinLocked(b)
		}
		id := ids.New("l-")
		e.leases[id] = l
		s.leases[id] = l
		resp.LeaseId = id
	}
	return resp, nil
}

// sourceOf is the peer a Query fetches from: its source_engine, checked
// against PeerAllow, or "" when it names none or this engine itself (P
// and D on one host in a multi-host deployment: the transfer is local).
// An engine without peers ignores the source, as before it had any.
func (e *Engine) sourceOf(req *pb.QueryRequest) (string, error) {
	if req.SourceEngine == "" {
		return "", nil
	}
	if err := validatePeerAddr("source_engine", req.SourceEngine); err != nil {
		return "", err
	}
	if e.peers == nil || strings.EqualFold(req.SourceEngine, e.cfg.PeerAddress) {
		return "", nil
	}
	if err := e.checkSourceEngine(req.SourceEngine); err != nil {
		return "", err
	}
	return req.SourceEngine, nil
}

// awakeLocked is what a Query re-checks after waiting without e.mu: the
// engine may have closed, and its session may have ended, in which case
// nothing may be leased for it any more (CloseSession already released
// the session's leases and would never see one taken now).
func (e *Engine) awakeLocked(s *session) error {
	if err := e.checkOpen(); err != nil {
		return err
	}
	if e.sessions[s.id] != s {
		return fmt.Errorf("%w: session %q ended while the query waited", ErrNotFound, s.id)
	}
	return nil
}

// prefixLocked counts the sealed prefix of group g's blocks and, after it,
// the run of blocks still being saved.
func (e *Engine) prefixLocked(g *nsGroup, hashes [][]byte) (hit, inflight int) {
	hit = peekPrefix(g, hashes)
	for _, h := range hashes[:hit] {
		e.policy.touch(g.blocks[string(h)])
	}
	for i := hit; i < len(hashes); i++ {
		b := g.blocks[string(hashes[i])]
		if b == nil || b.sealed || b.saving == 0 && b.saved == 0 {
			break
		}
		inflight++
	}
	return hit, inflight
}

// attributeLocked counts a query's hit blocks by where their bytes came
// from (tier attribution): a block promoted from SSD or fetched from a
// peer counts so on its first hit, as DRAM after. Positions are counted
// in the namespace's first full-attention group (its first group when it
// has none).
func (e *Engine) attributeLocked(ns *namespace, hashes [][]byte, hit int) {
	g := ns.groups[0]
	for _, c := range ns.groups {
		if c.kind == kindFull {
			g = c
			break
		}
	}
	for _, h := range hashes[:hit] {
		b := g.blocks[string(h)]
		if b == nil {
			e.stats.tierHits[originDRAM]++
			continue
		}
		e.stats.tierHits[b.origin]++
		b.origin = originDRAM
	}
}
