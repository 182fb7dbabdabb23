package engine

import (
	"context"
	"errors"
	"fmt"
	"slices"

	"golang.org/x/sync/semaphore"

	pb "github.com/pegaflow/pegaflow/engine/api/pegaflowv1"
)

// The work of one Save or Load is bounded by the caller's registration,
// and the work of all of them together by Config.MaxCopyOps:
//
//   - a call names each hash and each block id at most once, so it has at
//     most num_blocks refs (checkRefs);
//   - each ref expands to the registered segments of every layer, so a
//     call plans refs x opsPerBlock copy ops, and moves at most num_blocks
//     x bytes-per-block bytes, all inside the caller's region (bytes need
//     no memory: copies run between mappings that already exist);
//   - the ops a plan holds (Go, coalesced and native copies of each) are
//     reserved from a weighted semaphore of MaxCopyOps before the plan is
//     built and returned after its copies completed. A call needing more
//     than MaxCopyOps fails; others wait (bounded by their ctx) for room.
//
// So engine memory for copies stays below about 72 bytes x MaxCopyOps
// whatever clients send; the rest of a call's memory is its request.

// copyBudget is the engine-wide budget of in-flight copy ops.
type copyBudget struct {
	sem *semaphore.Weighted
	max int64
}

func newCopyBudget(max int64) *copyBudget {
	return &copyBudget{sem: semaphore.NewWeighted(max), max: max}
}

func (b *copyBudget) release(n int64) {
	if n > 0 {
		b.sem.Release(n)
	}
}

// errNeedBudget is a plan step's answer when the ops it needs are not
// free: the caller waits for them unlocked and plans again.
var errNeedBudget = errors.New("copy budget busy")

// reserveOpsLocked makes sure *held covers n refs' ops for inst, taking
// what is missing without blocking. Caller holds e.mu.
func (e *Engine) reserveOpsLocked(inst *instance, refs int, held *int64) (need int64, err error) {
	need = int64(refs) * int64(opsPerBlock(inst.layout))
	switch {
	case need > e.budget.max:
		return 0, invalid("%d blocks x %d copy ops per block is more than the engine's %d copy ops per call (--max-copy-ops); split the call",
			refs, opsPerBlock(inst.layout), e.budget.max)
	case need <= *held:
		return need, nil
	case e.budget.sem.TryAcquire(need - *held):
		*held = need
		return need, nil
	}
	return need, errNeedBudget
}

// planWithBudget runs plan until it is not short of budget, waiting for
// the ops it asked for between attempts. *held is what the caller must
// release once the plan's copies completed.
func planWithBudget[P any](ctx context.Context, b *copyBudget, held *int64, plan func() (P, int64, error)) (P, error) {
	for {
		p, need, err := plan()
		if !errors.Is(err, errNeedBudget) {
			return p, err
		}
		b.release(*held)
		*held = 0
		if err := b.sem.Acquire(ctx, need); err != nil {
			return p, fmt.Errorf("waiting for %d copy ops of the engine's budget (--max-copy-ops): %w", need, err)
		}
		*held = need
	}
}

func opsPerBlock(l *rankLayout) int {
	n := 0
	for _, layer := range l.layers {
		n += len(layer.segments)
	}
	return n
}

// checkRefs rejects a call that names a hash or a block id twice: a
// repeated hash copies the same block again for nothing (a Load of one
// hash 1,000 times was an out-of-memory), a repeated block id makes two
// copies race on one cache block. Without repeats a call has at most
// numBlocks refs.
func checkRefs(blocks []*pb.BlockRef, numBlocks uint32) error {
	if uint64(len(blocks)) > uint64(numBlocks) {
		return invalid("%d blocks in one call, more than the instance's %d", len(blocks), numBlocks)
	}
	if len(blocks) < 2 {
		return nil
	}
	ids := make([]uint32, len(blocks))
	hashes := make(map[string]struct{}, len(blocks))
	for i, b := range blocks {
		ids[i] = b.BlockId
		if _, dup := hashes[string(b.Hash)]; dup {
			return invalid("block %d: hash %x repeated in one call", i, b.Hash)
		}
		hashes[string(b.Hash)] = struct{}{}
	}
	slices.Sort(ids)
	for i := 1; i < len(ids); i++ {
		if ids[i] == ids[i-1] {
			return invalid("block_id %d repeated in one call", ids[i])
		}
	}
	return nil
}
