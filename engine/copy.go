package engine

import (
	"context"

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
	if err := validateBlocks(blocks, inst.layout.numBlocks); err != nil {
		return nil, err
	}
	if err := checkRefs(blocks, inst.layout.numBlocks); err != nil {
		return nil, err
	}
	return inst, nil
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
// id) to per-(region, pool) plans. A Save's shares are all in the rank's
// own pool, so it makes one batch per region; a Load's may come from
// several pools (blocks saved by instances on other nodes).
func (e *Engine) planCopies(plans map[planKey]*copyPlan, inst *instance, b *block, id uint32, idx int) {
	s := &b.shares[inst.key.rank]
	base := s.ext.off
	for l, layer := range inst.layout.layers {
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

// runCopies executes the plans concurrently and returns, per block index,
// whether all of its copies succeeded. Once ctx is done it submits no more
// batches (their blocks fail, and it returns ctx's error), but it waits for
// every batch already submitted: the memory is in use until then. With
// after set, the copies wait on the GPU for the producer's event first.
func (e *Engine) runCopies(ctx context.Context, plans map[planKey]*copyPlan, dir native.Direction, n int, after *native.Event) ([]bool, error) {
	ok := make([]bool, n)
	for i := range ok {
		ok[i] = true
	}
	fail := func(p *copyPlan) {
		for _, i := range p.blocks {
			ok[i] = false
		}
	}
	type started struct {
		plan    *copyPlan
		pending *native.Pending
	}
	var all []started
	var cancelled error
	for _, p := range plans {
		if cancelled = ctx.Err(); cancelled != nil {
			fail(p)
			continue
		}
		pending, err := e.copier.SubmitAfter(p.region, p.pool, dir, p.ops, after)
		if err != nil {
			e.log.Warn("copy submit failed", "err", err)
			fail(p)
			continue
		}
		all = append(all, started{p, pending})
	}
	for _, s := range all {
		<-s.pending.Done()
		if err := s.pending.Err(); err != nil {
			e.log.Warn("copy failed", "err", err)
			fail(s.plan)
		}
	}
	return ok, cancelled
}
