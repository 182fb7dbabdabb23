package engine

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	pb "github.com/pegaflow/pegaflow/engine/api/pegaflowv1"
	"github.com/pegaflow/pegaflow/native"
)

// A Query naming a source engine first fetches, from that peer, the run of
// hashes after the local sealed prefix that this engine holds in no state
// at all (a block some local rank is saving, or another query is fetching,
// is waited for as usual instead). Like Save it runs plan -> copy ->
// commit, e.mu never held across the network:
//
//  1. plan (locked): the missing run and the pool each rank's share goes
//     to; the local prefix is pinned so fetching cannot evict it;
//  2. OpenTransfer on the peer pins its sealed prefix of the run and says
//     where the shares lie; as many blocks as the copy budget holds (one
//     op per share, the budget call of Save and Load, bounds.go) get fresh
//     local extents for their shares and are entered unsealed, every rank
//     "saving", pinned;
//  3. copy (unlocked): chunks of whole blocks read in parallel, each one
//     validated read of the peer's stream (PeerControl.Read) or, with
//     PeerTransportRDMA, UCX GETs of at most MaxXferOps ops each;
//  4. commit (locked): the leading blocks whose every share arrived are
//     sealed; the rest are freed. A read returns only once no byte of it
//     can land any more (the stream's bytes land in the reading goroutine;
//     native.XferPeer.Get drains or force-closes first), so freed extents
//     are never written late, and nothing half-fetched is ever sealed.
//
// Every failure (peer unreachable or refusing, epoch changed, blocks
// evicted there, connection lost, deadline, local pool full, copy budget)
// ends the fetch with the prefix actually fetched; the Query then answers
// as usual.
//
// In a namespace with groups the peer answers with its hybrid boundary's
// blocks over all the query's hashes (OpenPeerTransfer): each names its
// group and position. The blocks held here sealed are pinned instead of
// read, those held in any other state are waited for as usual, and the
// rest are read; the Query's own boundary then counts what arrived.

var (
	errPeerMissing  = errors.New("the peer holds fewer of the blocks than asked")
	errPoolFull     = errors.New("no room in the local pool: every block with a share there is pinned")
	errPeerMismatch = errors.New("the peer's blocks do not match this namespace")
	// errCopyBudget: the peer offered more blocks than the engine's copy
	// budget lets one fetch read (Config.MaxCopyOps).
	errCopyBudget = errors.New("more blocks than one fetch's copy budget")
)

// fetchChunkBytes is about how many bytes one chunk of whole blocks reads:
// small enough that a deadline leaves most of what arrived usable, large
// enough that a stream read's fixed cost is small (and, with UCX, to keep
// the peer's window of 256 GETs, ~16 MiB, full).
const fetchChunkBytes = 8 << 20

// fetchRange is what a fetch's plan step found missing.
type fetchRange struct {
	ns     *namespace
	hashes [][]byte
	first  uint32   // QueryRequest.first_block of hashes[0] (groups only)
	pools  []int    // local pool of each rank's share
	local  []*block // the local blocks it relies on, pinned during the fetch
}

// fetchDeadline is how long a fetch may take within a Query's wait: the
// wait (Config.PeerFetchTimeout when the query does not wait) less the
// grace a cancelled Get may take, so the Query still answers in time when
// the peer stopped answering.
func (e *Engine) fetchDeadline(wait time.Duration) time.Duration {
	if wait <= 0 {
		wait = e.cfg.PeerFetchTimeout
	}
	return max(wait-native.XferCancelGrace, wait/2)
}

// fetchFromPeer fetches what req is missing from the peer at addr, within
// wait. It never fails the Query: errors only shorten what it fetched.
func (e *Engine) fetchFromPeer(ctx context.Context, addr string, req *pb.QueryRequest, hashes [][]byte, wait time.Duration) {
	if e.peers == nil {
		return
	}
	f := e.planFetchRange(req.SessionId, req.NamespaceId, hashes, req.FirstBlock)
	if f == nil {
		return
	}
	start := time.Now()
	ctx, cancel := context.WithTimeout(ctx, e.fetchDeadline(wait))
	defer cancel()
	stop := context.AfterFunc(e.stopped, cancel)
	defer stop()
	var n int
	var bytes uint64
	var err error
	if !f.ns.registered() {
		err = fmt.Errorf("%w: no rank registered the namespace's layout here yet", errPeerMismatch)
	} else {
		n, bytes, err = e.fetch(ctx, addr, req.TransferId, f)
	}
	e.mu.Lock()
	for _, b := range f.local {
		e.unpinLocked(b)
	}
	e.mu.Unlock()
	reason := ""
	if err != nil {
		reason = failureReason(err)
		e.log.Warn("peer fetch ended short", "peer", addr, "namespace", f.ns.id, "asked", len(f.hashes), "fetched", n,
			"reason", reason, "err", err)
	}
	e.m.observeFetch(n, bytes, time.Since(start), reason)
}

// planFetchRange finds the missing run (with groups: the hashes, when the
// boundary here falls short of them even counting saves in flight); nil
// when nothing is missing or the query is bad (Query reports that).
func (e *Engine) planFetchRange(sessionID, nsID string, hashes [][]byte, first uint32) *fetchRange {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.checkOpen() != nil {
		return nil
	}
	if _, err := e.sessionLocked(sessionID); err != nil {
		return nil
	}
	ns := e.namespaces[nsID]
	if ns == nil {
		return nil
	}
	pools := make([]int, ns.desc.TPSize)
	for r := range pools {
		pools[r] = e.rankPoolLocked(ns, uint32(r))
	}
	if ns.hybrid {
		if hit, inflight := e.boundaryLocked(ns, hashes, first); hit+inflight == len(hashes) {
			return nil
		}
		return &fetchRange{ns: ns, hashes: hashes[:min(len(hashes), MaxPeerOpenHashes)], first: first, pools: pools}
	}
	blocks := ns.groups[0].blocks
	lo := 0
	for lo < len(hashes) {
		b := blocks[string(hashes[lo])]
		if b == nil || !b.sealed {
			break
		}
		lo++
	}
	hi := lo
	for hi < len(hashes) && hi-lo < MaxPeerOpenHashes && blocks[string(hashes[hi])] == nil {
		hi++
	}
	if hi == lo {
		return nil
	}
	f := &fetchRange{ns: ns, hashes: hashes[lo:hi], pools: pools, local: make([]*block, 0, lo)}
	for _, h := range hashes[:lo] {
		b := blocks[string(h)]
		e.pinLocked(b)
		f.local = append(f.local, b)
	}
	return f
}

// rankPoolLocked is the pool rank r of ns saves into here (so loads by
// that rank stay on its node): a registered instance's, else the default.
func (e *Engine) rankPoolLocked(ns *namespace, r uint32) int {
	for k, inst := range e.instances {
		if k.rank == r && inst.ns == ns {
			return inst.pool
		}
	}
	return e.defaultPool
}

// fetch opens the transfer on the peer, reads it and seals what arrived;
// it returns how many blocks it sealed here and their bytes (all ranks).
func (e *Engine) fetch(ctx context.Context, addr, transferID string, f *fetchRange) (int, uint64, error) {
	x := e.peers
	l, err := x.link(ctx, addr)
	if err != nil {
		return 0, 0, err
	}
	ttl := uint32(time.Until(deadlineOf(ctx))/time.Millisecond) + 5000
	open := func(l *peerLink) (*pb.PeerOpenTransferResponse, error) {
		return x.ctl.OpenTransfer(ctx, addr, &pb.PeerOpenTransferRequest{Epoch: l.epoch, NamespaceId: f.ns.id,
			TransferId: transferID, Hashes: f.hashes, TtlMs: ttl, FirstBlock: f.first})
	}
	resp, err := open(l)
	if errors.Is(err, ErrPeerEpoch) {
		// The peer restarted since the handshake and nothing was read
		// yet: handshake with the new process and ask it once.
		x.drop(l)
		if l, err = x.link(ctx, addr); err == nil {
			resp, err = open(l)
		}
	}
	if err != nil {
		return 0, 0, err
	}
	if resp.Handle != "" {
		defer func() {
			// Off the query's path; the peer's TTL covers a lost release.
			go func() {
				rctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer cancel()
				if err := x.ctl.ReleaseTransfer(rctx, addr, resp.Handle); err != nil {
					x.log.Debug("peer release failed", "peer", addr, "handle", resp.Handle, "err", err)
				}
			}()
		}()
	}
	if resp.Epoch != l.epoch {
		x.drop(l)
		return 0, 0, fmt.Errorf("%w: handshake at %q, transfer opened at %q", ErrPeerEpoch, l.epoch, resp.Epoch)
	}
	pools := -1 // the validated stream: the peer checks the pool of every extent
	if l.xp != nil {
		pools = len(l.regions)
	}
	if err := checkPeerBlocks(resp, f, pools); err != nil {
		return 0, 0, err
	}
	p, held, err := planWithBudget(ctx, e.budget, func(held *int64) (*fetchPlan, int64, error) {
		return e.planFetch(f, resp.Blocks, held)
	})
	if err != nil {
		return 0, 0, err
	}
	defer e.budget.release(held)
	if len(p.got) == 0 {
		return 0, 0, p.short
	}
	n, err := e.readBlocks(ctx, l, resp.Handle, p.reads, len(f.pools))
	if errors.Is(err, native.ErrPeer) {
		x.drop(l)
	}
	e.commitFetch(f.ns, p.got, n)
	var bytes uint64
	for _, b := range p.got[:n] {
		bytes += b.g.rankBytes * uint64(len(f.pools))
	}
	switch {
	case err != nil:
		return n, bytes, err
	case p.short != nil:
		return n, bytes, p.short
	case !f.ns.hybrid && len(resp.Blocks) < len(f.hashes):
		return n, bytes, fmt.Errorf("%w: %d of %d", errPeerMissing, len(resp.Blocks), len(f.hashes))
	}
	return n, bytes, nil
}

func deadlineOf(ctx context.Context) time.Time {
	d, _ := ctx.Deadline()
	return d
}

// checkPeerBlocks checks the peer's answer against the namespace here,
// and each extent's pool against the peer's pools (pools < 0: not known
// here). With UCX the extents themselves are bounds-checked against the
// peer's advertised pool sizes by the native layer before anything is
// read; the validated stream's peer checks them against the transfer.
func checkPeerBlocks(resp *pb.PeerOpenTransferResponse, f *fetchRange, pools int) error {
	ns := f.ns
	if !ns.hybrid && len(resp.Blocks) > len(f.hashes) {
		return fmt.Errorf("%w: %d blocks for %d hashes", errPeerMismatch, len(resp.Blocks), len(f.hashes))
	}
	if ns.hybrid && len(resp.Blocks) > len(f.hashes)*len(ns.groups) {
		return fmt.Errorf("%w: %d blocks for %d hashes of %d groups", errPeerMismatch, len(resp.Blocks), len(f.hashes), len(ns.groups))
	}
	if !ns.hybrid && len(resp.Blocks) > 0 && resp.RankBytes != ns.groups[0].rankBytes {
		return fmt.Errorf("%w: a rank's share is %d bytes there, %d here", errPeerMismatch, resp.RankBytes, ns.groups[0].rankBytes)
	}
	var seen map[[2]uint32]struct{}
	if ns.hybrid {
		seen = make(map[[2]uint32]struct{}, len(resp.Blocks))
	}
	for i, b := range resp.Blocks {
		g, err := peerBlockGroup(ns, b, i, len(f.hashes), seen)
		if err != nil {
			return err
		}
		if len(b.Shares) != len(f.pools) {
			return fmt.Errorf("%w: block %d has %d shares, TP size is %d", errPeerMismatch, i, len(b.Shares), len(f.pools))
		}
		for _, s := range b.Shares {
			if s == nil || (pools >= 0 && int(s.Pool) >= pools) || s.Length != g.rankBytes {
				return fmt.Errorf("%w: block %d: share in pool %d of %d, %d bytes", errPeerMismatch, i, s.GetPool(), pools, s.GetLength())
			}
		}
	}
	return nil
}

// peerBlockGroup is the local group of block i of a peer's answer: group
// 0 without groups; with them the group it names, at a position inside
// the hashes, each (group, position) once.
func peerBlockGroup(ns *namespace, b *pb.PeerBlock, i, hashes int, seen map[[2]uint32]struct{}) (*nsGroup, error) {
	if !ns.hybrid {
		return ns.groups[0], nil
	}
	g := ns.group(b.Group)
	if g == nil || int(b.Position) >= hashes {
		return nil, fmt.Errorf("%w: block %d: group %d position %d (%d hashes)", errPeerMismatch, i, b.Group, b.Position, hashes)
	}
	k := [2]uint32{b.Group, b.Position}
	if _, dup := seen[k]; dup {
		return nil, fmt.Errorf("%w: block %d: group %d position %d twice", errPeerMismatch, i, b.Group, b.Position)
	}
	seen[k] = struct{}{}
	return g, nil
}

// fetchRead is one share to read: from the peer's pool into a local one.
type fetchRead struct {
	remotePool, localPool int
	op                    native.XferOp
}

// fetchPlan is what a fetch's plan step entered: got[i], unsealed, reads
// reads[i], its shares. short says why it entered fewer blocks than the
// peer offered (copy budget, local pool full), nil when it stopped only at
// a hash that appeared here meanwhile.
type fetchPlan struct {
	got   []*block
	reads [][]fetchRead
	short error
}

// planFetch enters the blocks the peer holds, in order, as unsealed
// blocks every rank of which is saving, with fresh extents; it stops where
// the copy budget does (one op per share, see planWithBudget), at a hash
// that appeared here meanwhile, or at a block whose shares do not fit.
func (e *Engine) planFetch(f *fetchRange, remote []*pb.PeerBlock, held *int64) (*fetchPlan, int64, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if err := e.checkOpen(); err != nil {
		return nil, 0, err
	}
	fit, need, err := e.budget.reserve(len(remote), len(f.pools), held)
	if err != nil {
		return nil, need, err
	}
	p := &fetchPlan{got: make([]*block, 0, fit), reads: make([][]fetchRead, 0, fit)}
	if fit < len(remote) {
		p.short = fmt.Errorf("%w: %d of the peer's %d blocks fit (%d shares each, --max-copy-ops %d)",
			errCopyBudget, fit, len(remote), len(f.pools), e.budget.max)
		remote = remote[:fit]
	}
	ns, now := f.ns, time.Now()
	for i, rb := range remote {
		g, pos := ns.groups[0], i
		if ns.hybrid {
			g, pos = ns.group(rb.Group), int(rb.Position) // checkPeerBlocks checked both
		}
		h := string(f.hashes[pos])
		if have := g.blocks[h]; have != nil {
			if ns.hybrid {
				// Held here: relied on if sealed, else waited for as usual.
				if have.sealed {
					e.pinLocked(have)
					f.local = append(f.local, have)
				}
				continue
			}
			p.short = nil // saved or fetched meanwhile: the answer counts it as usual
			break
		}
		b := newBlock(ns, g, h, now)
		rs := make([]fetchRead, len(rb.Shares))
		for r, s := range rb.Shares {
			ext, ok := e.allocateLocked(f.pools[r], g.rankBytes)
			if !ok {
				for q := range r {
					e.releaseShareLocked(&b.shares[q])
				}
				p.short = fmt.Errorf("%w (pool on NUMA node %d)", errPoolFull, e.pools[f.pools[r]].node)
				return e.readingLocked(p), 0, nil
			}
			b.shares[r].pool, b.shares[r].ext = f.pools[r], ext
			rs[r] = fetchRead{int(s.Pool), f.pools[r], native.XferOp{RemoteOffset: s.Offset, LocalOffset: ext.off, Len: s.Length}}
		}
		e.addBlockLocked(b)
		b.saving = ns.allRanks
		e.pinLocked(b)
		p.got = append(p.got, b)
		p.reads = append(p.reads, rs)
	}
	return e.readingLocked(p), 0, nil
}

// readingLocked counts p's fetch as reading when it entered any block:
// under e.mu, so never after Close's Wait began; commitFetch ends it.
func (e *Engine) readingLocked(p *fetchPlan) *fetchPlan {
	if len(p.got) > 0 {
		e.copies.Add(1)
		e.fetchesReading++
	}
	return p
}

// readBlocks reads the blocks in chunks of whole blocks, all chunks
// submitted at once (the native layer keeps them in FIFO order per peer),
// and returns how many leading blocks arrived whole and the error that
// ended the first chunk that did not.
func (e *Engine) readBlocks(ctx context.Context, l *peerLink, handle string, reads [][]fetchRead, tp int) (int, error) {
	var most uint64 // the largest share: groups' shares differ in size
	for _, rs := range reads {
		most = max(most, rs[0].op.Len)
	}
	per := max(1, min(fetchChunkBytes/max(1, int(most)*tp), min(native.MaxXferOps, MaxPeerReadExtents)/tp))
	chunks := (len(reads) + per - 1) / per
	errs := make([]error, chunks)
	var wg sync.WaitGroup
	for c := range chunks {
		wg.Go(func() {
			errs[c] = e.readChunk(ctx, l, handle, reads[c*per:min((c+1)*per, len(reads))])
		})
	}
	wg.Wait()
	for c, err := range errs {
		if err != nil {
			return c * per, err
		}
	}
	return len(reads), nil
}

// readChunk reads a chunk's shares: one validated read of them all, or
// with UCX one Get per (peer pool, local pool). Either returns only once
// no byte of the chunk can land any more.
func (e *Engine) readChunk(ctx context.Context, l *peerLink, handle string, reads [][]fetchRead) error {
	if l.xp == nil {
		rs := make([]PeerShareRead, 0, len(reads)*len(reads[0]))
		for _, shares := range reads {
			for _, r := range shares {
				dst := e.pools[r.localPool].mem.Bytes()[r.op.LocalOffset : r.op.LocalOffset+r.op.Len]
				rs = append(rs, PeerShareRead{Ext: PeerExtent{Pool: uint32(r.remotePool), Offset: r.op.RemoteOffset, Len: r.op.Len}, Dst: dst})
			}
		}
		return e.peers.ctl.Read(ctx, l.addr, handle, rs)
	}
	type pair struct{ remote, local int }
	groups := map[pair][]native.XferOp{}
	for _, rs := range reads {
		for _, r := range rs {
			k := pair{r.remotePool, r.localPool}
			groups[k] = append(groups[k], r.op)
		}
	}
	for k, ops := range groups {
		if err := l.xp.Get(ctx, l.regions[k.remote], e.peers.ucx.mems[k.local], ops); err != nil {
			return fmt.Errorf("read %d shares from %s: %w", len(ops), l.addr, err)
		}
	}
	return nil
}

// commitFetch seals the first n blocks of got and frees the rest.
func (e *Engine) commitFetch(ns *namespace, got []*block, n int) {
	e.mu.Lock()
	defer e.mu.Unlock()
	defer e.copies.Done()
	e.fetchesReading--
	for i, b := range got {
		b.saving = 0
		if i < n {
			b.saved = ns.allRanks
			b.origin = originPeer
			e.sealLocked(b)
			e.unpinLocked(b)
			continue
		}
		e.unpinLocked(b)
		e.failBlockLocked(b, "peer fetch did not complete")
	}
	e.broadcastLocked()
}
