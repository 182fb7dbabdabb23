package engine

import (
	"context"
	"fmt"

	pb "github.com/pegaflow/pegaflow/engine/api/pegaflowv1"
	"github.com/pegaflow/pegaflow/native"
)

// Save and Load run in three steps, so that e.mu is never held across a
// copy and every function that takes it releases it:
//
//  1. plan (locked): validate, pin the blocks, reserve the extents and
//     build the per-(region, pool) batches;
//  2. copy (unlocked): run the batches;
//  3. commit (locked): record each block's outcome and unpin.
//
// A done ctx stops a call before planning and keeps batches not yet
// submitted from starting (their blocks fail as if the copy had); batches
// already submitted always run to completion, because the extents and
// regions they touch stay reserved until the commit step.

// copyInstanceLocked finds the caller's instance and validates its block
// refs. Caller holds e.mu.
func (e *Engine) copyInstanceLocked(sessionID, instanceID string, rank uint32, blocks []*pb.BlockRef) (*instance, error) {
	inst, err := e.instanceLocked(sessionID, instanceID, rank)
	if err != nil {
		return nil, err
	}
	if err := validateBlocks(inst.ns, blocks, inst.layout.numBlocks); err != nil {
		return nil, err
	}
	return inst, nil
}

// beginCopyLocked is the common start of Save's and Load's plan steps:
// the caller's instance, the call's copy ops reserved from the budget
// (need > 0 with errNeedBudget: wait for that many, see planWithBudget),
// and the event the copies wait for when the caller set wait_event.
// Caller holds e.mu.
func (e *Engine) beginCopyLocked(sessionID, instanceID string, rank uint32, blocks []*pb.BlockRef, held *int64,
	wantEvent bool) (inst *instance, after *native.Event, need int64, err error) {
	if inst, err = e.copyInstanceLocked(sessionID, instanceID, rank, blocks); err != nil {
		return nil, nil, 0, err
	}
	per := opsPerBlock(inst.layout)
	fit, need, err := e.budget.reserve(len(blocks), per, held)
	if verr := validateCopyOps(len(blocks), fit, per, e.budget.max); verr != nil {
		return nil, nil, 0, verr
	}
	if err != nil {
		return nil, nil, need, err
	}
	if after, err = waitEventOf(inst, wantEvent); err != nil {
		return nil, nil, 0, err
	}
	return inst, after, 0, nil
}

// waitEventOf is the event a Save's or Load's copies wait for when the
// caller set wait_event. Copying without the wait the worker asked for
// would read KV bytes its kernels may still be writing (Save), or write
// blocks they may still read or write (Load): refuse instead.
func waitEventOf(inst *instance, want bool) (*native.Event, error) {
	if !want {
		return nil, nil
	}
	if inst.event == nil {
		return nil, fmt.Errorf("%w: wait_event set but instance %q rank %d has no CUDA event open "+
			"(RegisterResponse.cuda_event was false)", ErrPrecondition, inst.key.id, inst.key.rank)
	}
	return inst.event, nil
}

// planKey names one native batch: a batch copies between one region and
// one pool.
type planKey struct {
	region, pool int
}

type copyPlan struct {
	region *native.Region
	pool   *native.Pool
	ops    []native.CopyOp
	blocks []int // indexes into the call's block list, for failure reports
}

// planCopies appends the ops moving rank's share of block b (cache block
// id of b's group) to per-(region, pool) plans: the segments of the
// layers of b's group only. A Save's shares are all in the rank's own
// pool, so it makes one batch per region; a Load's may come from several
// pools (blocks saved by instances on other nodes).
func (e *Engine) planCopies(plans map[planKey]*copyPlan, inst *instance, b *block, id uint32, idx int) {
	s := &b.shares[inst.key.rank]
	base := s.ext.off
	for _, l := range inst.layout.groupLayers[b.g.index] {
		layer := &inst.layout.layers[l]
		key := planKey{layer.region, s.pool}
		p := plans[key]
		if p == nil {
			p = &copyPlan{region: inst.regions[layer.region], pool: e.pools[s.pool].mem}
			plans[key] = p
		}
		for s, seg := range layer.segments {
			p.ops = append(p.ops, native.CopyOp{
				RegionOffset: seg.offset + uint64(id)*seg.stride,
				PoolOffset:   base + b.ns.segOffset[l][s],
				Len:          seg.length,
			})
		}
		if n := len(p.blocks); n == 0 || p.blocks[n-1] != idx {
			p.blocks = append(p.blocks, idx)
		}
	}
}

// copyResult is what runCopies saw of a call's batches by its deadline.
type copyResult struct {
	// ok[i]: every copy of block i completed. stuck[i]: a batch of block i
	// was still running at the deadline, so its memory (pool extent and
	// region) is still being read or written.
	ok, stuck []bool
	late      []*native.Pending
	// err is set when the deadline (or the caller) ended the wait.
	err error
}

// afterLate runs fn, holding e.mu, once every batch still running at the
// deadline has really finished: only then may the memory they touch be
// freed or reused. It ends the call's share of e.copies.
func (e *Engine) afterLate(r *copyResult, fn func()) {
	if len(r.late) == 0 {
		fn()
		e.copies.Done()
		return
	}
	go func() {
		defer e.copies.Done()
		for _, p := range r.late {
			<-p.Done()
		}
		e.mu.Lock()
		defer e.mu.Unlock()
		fn()
		e.log.Warn("copies that outlived their call's deadline finished; their memory is free again", "batches", len(r.late))
	}()
}

// copyDeadline bounds a Save's or Load's copies by the caller's deadline,
// capped at Config.CopyTimeout.
func (e *Engine) copyDeadline(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, e.cfg.CopyTimeout)
}

// runCopies executes the plans concurrently and reports, per block index,
// whether all of its copies succeeded. Once ctx is done it submits no more
// batches (their blocks fail) and stops waiting: batches still running then
// are returned in late, their blocks marked stuck, and the call fails with
// ctx's error, while the copier finishes them in the background (a copy
// on a dead producer's event, or a slow file, may take very long). With
// after set, the copies wait on the GPU for the producer's event first.
// The caller ran e.copies.Add(1) at planning; afterLate ends it.
func (e *Engine) runCopies(ctx context.Context, plans map[planKey]*copyPlan, dir native.Direction, n int, after *native.Event) *copyResult {
	r := &copyResult{ok: make([]bool, n), stuck: make([]bool, n)}
	for i := range r.ok {
		r.ok[i] = true
	}
	mark := func(p *copyPlan, stuck bool) {
		for _, i := range p.blocks {
			r.ok[i] = false
			r.stuck[i] = r.stuck[i] || stuck
		}
	}
	type started struct {
		plan    *copyPlan
		pending *native.Pending
	}
	var all []started
	for _, p := range plans {
		if r.err = ctx.Err(); r.err != nil {
			mark(p, false)
			continue
		}
		pending, err := e.copier.SubmitAfter(p.region, p.pool, dir, p.ops, after)
		if err != nil {
			e.log.Warn("copy submit failed", "err", err)
			mark(p, false)
			continue
		}
		all = append(all, started{p, pending})
	}
	for _, s := range all {
		if r.err == nil {
			select {
			case <-s.pending.Done():
			case <-ctx.Done():
				r.err = fmt.Errorf("copies did not finish in time (deadline: the call's, at most --copy-timeout %v): %w",
					e.cfg.CopyTimeout, ctx.Err())
			}
		}
		select {
		case <-s.pending.Done():
			if err := s.pending.Err(); err != nil {
				e.log.Warn("copy failed", "err", err)
				mark(s.plan, false)
			}
		default:
			r.late = append(r.late, s.pending)
			mark(s.plan, true)
		}
	}
	if len(r.late) > 0 {
		e.log.Warn("copies outlived their call's deadline; their blocks failed, their memory stays reserved until they finish",
			"batches", len(r.late), "err", r.err)
	}
	return r
}
