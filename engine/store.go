package engine

import (
	"context"
	"fmt"
	"time"

	pb "github.com/pegaflow/pegaflow/engine/api/pegaflowv1"
	"github.com/pegaflow/pegaflow/native"
)

// savePlan is what Save's plan step reserved: the blocks this rank copies
// (pinned, with this rank's saving bit and a fresh extent each) and the
// batches that copy them.
type savePlan struct {
	inst     *instance
	held     int64 // copy ops of the engine's budget, returned when the copies end
	bit      uint64
	transfer *transfer
	after    *native.Event
	plans    map[planKey]*copyPlan
	saving   []*block
	resp     *pb.SaveResponse
}

// Save copies blocks from the caller's registered memory into the pool and
// returns when the copies are done. Blocks already sealed, or already saved
// by this rank, are skipped. With a transfer id the blocks are tagged and
// pinned for the decode side. Copies not done by the deadline (ctx's,
// capped at Config.CopyTimeout) fail the call and their blocks; their
// pool extents stay reserved until the copier is really done with them.
// A call whose ctx ended before its commit seals nothing, even where the
// copies completed: a caller that gave up may already reuse its blocks.
func (e *Engine) Save(ctx context.Context, req *pb.SaveRequest) (*pb.SaveResponse, error) {
	start := time.Now()
	if err := e.validateSave(req); err != nil {
		return nil, err
	}
	ctx, cancel := e.copyDeadline(ctx)
	defer cancel()
	p, held, err := planWithBudget(ctx, e.budget, func(held *int64) (*savePlan, int64, error) { return e.planSave(req, held) })
	if err != nil {
		return nil, err
	}
	p.held = held
	r := e.runCopies(ctx, p.plans, native.RegionToPool, len(p.saving), p.after)
	if err := ctx.Err(); err != nil {
		// The caller gave up (cancelled, or its deadline passed) after the
		// copies: it may be reusing those KV blocks already (a preempted
		// request), so what was copied is not trusted. Nothing is sealed.
		for i := range r.ok {
			r.ok[i] = false
		}
		if r.err == nil {
			r.err = err
		}
	}
	e.commitSave(p, r, req.TransferLast, start)
	if r.err != nil {
		return nil, r.err
	}
	return p.resp, nil
}

// planSave is Save's plan step; it needs the returned number of copy ops
// of the budget (see planWithBudget) when they are not in *held.
func (e *Engine) planSave(req *pb.SaveRequest, held *int64) (*savePlan, int64, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	inst, after, need, err := e.beginCopyLocked(req.SessionId, req.InstanceId, req.Rank, req.Blocks, held, req.WaitEvent)
	if err != nil {
		return nil, need, err
	}
	ns := inst.ns
	p := &savePlan{inst: inst, bit: uint64(1) << inst.key.rank, after: after, plans: map[planKey]*copyPlan{},
		saving: make([]*block, 0, len(req.Blocks)), resp: &pb.SaveResponse{}}
	var t *transfer
	if req.TransferId != "" {
		if t, err = e.transferLocked(req.TransferId, ns, req.ReadyUrl, req.ReadyToken); err != nil {
			return nil, 0, err
		}
		p.transfer = t
	}
	now := time.Now()
	for _, ref := range req.Blocks {
		g := ns.group(ref.Group)
		b := g.blocks[string(ref.Hash)]
		if b != nil && (b.sealed || (b.saved|b.saving)&p.bit != 0) {
			p.resp.Skipped++
			if b.sealed && inst.key.rank == 0 {
				ns.feed.add(pb.BlockEventKind_BLOCK_EVENT_KIND_PRESENT, b)
			}
			if t != nil {
				t.add(e, b)
			}
			continue
		}
		// This rank's share goes to its own node's pool. Evicting for it
		// cannot take b: b is not sealed, so not evictable.
		ext, ok := e.allocateLocked(inst.pool, g.rankBytes)
		if !ok {
			p.resp.Failed++
			e.stats.saveFailures++
			if t != nil {
				t.settle(e, transferFailed, fmt.Sprintf("pool on NUMA node %d exhausted: every resident block with a share there is pinned",
					e.pools[inst.pool].node))
			}
			// Without this share the block never seals: drop what the
			// other ranks stored unless one of them is copying now (then
			// the partial reaper frees it).
			if b != nil && b.saving == 0 {
				e.failBlockLocked(b, "a rank's share did not fit its pool")
			}
			continue
		}
		if b == nil {
			b = newBlock(ns, g, string(ref.Hash), now)
			e.addBlockLocked(b)
		}
		b.shares[inst.key.rank].pool = inst.pool
		b.shares[inst.key.rank].ext = ext
		b.saving |= p.bit
		e.pinLocked(b)
		if t != nil {
			t.add(e, b)
		}
		e.planCopies(p.plans, inst, b, ref.BlockId, len(p.saving))
		p.saving = append(p.saving, b)
	}
	e.copies.Add(1) // under e.mu, so never after Close's Wait began
	return p, 0, nil
}

// heldExtent is a pool extent a late copy still writes: no block owns it
// any more, and it is freed when the copy ends.
type heldExtent struct {
	pool int
	ext  extent
}

// commitSave is Save's commit step: r.ok[i] says whether p.saving[i] was
// copied. A stuck block fails like a failed copy, but its share's extent
// is detached from it and freed only when the late copy ends, so a new
// save of the block (or any other) never gets memory the copier writes.
func (e *Engine) commitSave(p *savePlan, r *copyResult, last bool, start time.Time) {
	e.mu.Lock()
	defer e.mu.Unlock()
	ns, rank, t, resp := p.inst.ns, p.inst.key.rank, p.transfer, p.resp
	var bytes uint64
	var held []heldExtent
	for i, b := range p.saving {
		b.saving &^= p.bit
		if r.ok[i] {
			b.saved |= p.bit
			resp.Saved++
			bytes += b.g.rankBytes
			e.stats.kinds[b.g.kind].saves++
			e.stats.kinds[b.g.kind].bytesSaved += b.g.rankBytes
			if b.saved == ns.allRanks && !b.sealed {
				e.sealLocked(b)
			}
			e.unpinLocked(b)
			continue
		}
		resp.Failed++
		e.stats.saveFailures++
		// The rank may save the block again; it will allocate anew.
		if s := &b.shares[rank]; r.stuck[i] {
			held = append(held, heldExtent{s.pool, s.ext})
			s.ext = extent{}
		} else {
			e.releaseShareLocked(s)
		}
		e.unpinLocked(b)
		if b.saved == 0 && b.saving == 0 {
			e.failBlockLocked(b, "copy failed")
		} else if t != nil {
			t.settle(e, transferFailed, "copy failed")
		}
	}
	if t != nil && last {
		t.lastRanks |= p.bit
		t.check(e)
	}
	e.stats.saves += uint64(resp.Saved)
	e.stats.bytesSaved += bytes
	e.broadcastLocked()
	e.m.observeSave(time.Since(start), bytes)
	e.afterLate(r, func() {
		for _, h := range held {
			e.pools[h.pool].alloc.release(h.ext)
		}
		e.budget.release(p.held)
	})
}

// loadPlan is what Load's plan step reserved: the sealed blocks it copies
// out (pinned, loading counted) and, for each, its index in the request.
type loadPlan struct {
	inst    *instance
	after   *native.Event // the copies wait for it on the GPU (wait_event)
	held    int64         // copy ops of the engine's budget, returned when the copies end
	plans   map[planKey]*copyPlan
	loading []*block
	index   []int
	status  []pb.BlockStatus
}

// Load copies sealed blocks into the caller's registered memory. Each
// block's outcome is reported; missing and failed blocks are for the caller
// to recompute. Copies not done by the deadline (as for Save) fail the
// call; their blocks stay pinned until the copier is done reading them.
func (e *Engine) Load(ctx context.Context, req *pb.LoadRequest) (*pb.LoadResponse, error) {
	start := time.Now()
	ctx, cancel := e.copyDeadline(ctx)
	defer cancel()
	p, held, err := planWithBudget(ctx, e.budget, func(held *int64) (*loadPlan, int64, error) { return e.planLoad(req, held) })
	if err != nil {
		return nil, err
	}
	p.held = held
	r := e.runCopies(ctx, p.plans, native.PoolToRegion, len(p.loading), p.after)
	e.commitLoad(p, r, req.LeaseId, req.TransferId, start)
	if r.err != nil {
		return nil, r.err
	}
	return &pb.LoadResponse{Status: p.status}, nil
}

// planLoad is Load's plan step, budgeted like planSave.
func (e *Engine) planLoad(req *pb.LoadRequest, held *int64) (*loadPlan, int64, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	inst, after, need, err := e.beginCopyLocked(req.SessionId, req.InstanceId, req.Rank, req.Blocks, held, req.WaitEvent)
	if err != nil {
		return nil, need, err
	}
	p := &loadPlan{inst: inst, after: after, plans: map[planKey]*copyPlan{}, status: make([]pb.BlockStatus, len(req.Blocks))}
	for i, ref := range req.Blocks {
		b := inst.ns.group(ref.Group).blocks[string(ref.Hash)]
		if b == nil || !b.sealed {
			p.status[i] = pb.BlockStatus_BLOCK_STATUS_MISSING
			continue
		}
		if inst.key.rank == 0 {
			inst.ns.feed.add(pb.BlockEventKind_BLOCK_EVENT_KIND_PRESENT, b)
		}
		e.pinLocked(b)
		b.loading++
		e.policy.touch(b)
		e.planCopies(p.plans, inst, b, ref.BlockId, len(p.loading))
		p.loading = append(p.loading, b)
		p.index = append(p.index, i)
	}
	e.copies.Add(1) // under e.mu, so never after Close's Wait began
	return p, 0, nil
}

// commitLoad is Load's commit step: r.ok[j] says whether p.loading[j] was
// copied. The rank counts as having loaded the lease's and transfer's
// blocks either way: it will not ask again. A stuck block keeps its pin
// (and stays counted as loading) until the late copy stops reading it.
func (e *Engine) commitLoad(p *loadPlan, r *copyResult, leaseID, transferID string, start time.Time) {
	e.mu.Lock()
	defer e.mu.Unlock()
	ns := p.inst.ns
	var bytes uint64
	var stuck []*block
	for j, b := range p.loading {
		if r.stuck[j] {
			stuck = append(stuck, b)
		} else {
			b.loading--
			e.unpinLocked(b)
		}
		if r.ok[j] {
			p.status[p.index[j]] = pb.BlockStatus_BLOCK_STATUS_OK
			bytes += b.g.rankBytes
			e.stats.kinds[b.g.kind].loads++
			e.stats.kinds[b.g.kind].bytesLoaded += b.g.rankBytes
		} else {
			p.status[p.index[j]] = pb.BlockStatus_BLOCK_STATUS_FAILED
		}
	}
	bit := uint64(1) << p.inst.key.rank
	if l, found := e.leases[leaseID]; found && leaseID != "" {
		l.loaded |= bit
		if l.loaded&l.ranks == l.ranks {
			e.releaseLeaseLocked(leaseID, l)
		}
	}
	if t, found := e.transfers[transferID]; found && transferID != "" {
		t.loaded |= bit
		if t.loaded&ns.allRanks == ns.allRanks {
			t.release(e)
		}
	}
	e.stats.loads += uint64(len(p.loading))
	e.stats.bytesLoaded += bytes
	e.m.observeLoad(time.Since(start), bytes)
	e.afterLate(r, func() {
		for _, b := range stuck {
			b.loading--
			e.unpinLocked(b)
		}
		e.budget.release(p.held)
	})
}
