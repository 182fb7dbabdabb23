package engine

import (
	"context"
	"errors"
	"fmt"

	"golang.org/x/sync/semaphore"
)

// The work of one Save or Load is bounded by the caller's registration,
// and the work of all of them together by Config.MaxCopyOps:
//
//   - a call names each hash and each block id at most once, so it has at
//     most num_blocks refs (validateBlocks);
//   - each ref expands to the registered segments of every layer, so a
//     call plans refs x opsPerBlock copy ops, and moves at most num_blocks
//     x bytes-per-block bytes, all inside the caller's region (bytes need
//     no memory: copies run between mappings that already exist);
//   - the ops a plan holds (Go, coalesced and native copies of each) are
//     reserved from a weighted semaphore of MaxCopyOps before the plan is
//     built and returned after its copies completed. A call needing more
//     than MaxCopyOps fails; others wait (bounded by their ctx) for room.
//     A peer fetch takes one op per share from the same budget, through
//     the same call (copyBudget.reserve); one of more than MaxCopyOps
//     reads the blocks that fit and ends short, reason copy_budget.
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

// reserve is the budget call of every copy (Save, Load, a peer fetch):
// it makes sure *held covers the ops of the first fit of n blocks of
// perBlock ops each, taking what is missing without blocking. fit is n
// unless n blocks need more ops than the whole budget: then it is as many
// as the budget holds (a Save or Load refuses, validateCopyOps; a fetch
// reads fewer and says so). need > *held with errNeedBudget: wait for
// need ops unlocked and call again (planWithBudget).
func (b *copyBudget) reserve(n, perBlock int, held *int64) (fit int, need int64, err error) {
	per := int64(max(perBlock, 1))
	fit = int(min(int64(n), b.max/per))
	need = int64(fit) * per
	switch {
	case need <= *held:
		return fit, need, nil
	case b.sem.TryAcquire(need - *held):
		*held = need
		return fit, need, nil
	}
	return fit, need, errNeedBudget
}

// planWithBudget runs plan until it is not short of budget, waiting for
// the ops it asked for between attempts; plan reserves them into *held
// (copyBudget.reserve). It returns the plan and the ops it holds, which
// the caller releases once the plan's copies completed; a failed plan
// holds none. A ctx already done stops it before planning: the caller
// gave up.
func planWithBudget[P any](ctx context.Context, b *copyBudget, plan func(held *int64) (P, int64, error)) (P, int64, error) {
	var held int64
	for {
		var p P
		if err := ctx.Err(); err != nil {
			return p, 0, err
		}
		p, need, err := plan(&held)
		if err == nil {
			return p, held, nil
		}
		b.release(held)
		held = 0
		if !errors.Is(err, errNeedBudget) {
			return p, 0, err
		}
		if err := b.sem.Acquire(ctx, need); err != nil {
			return p, 0, fmt.Errorf("waiting for %d copy ops of the engine's budget (--max-copy-ops): %w", need, err)
		}
		held = need
	}
}

// opsPerBlock is the most copy ops one block of any group of l takes (one
// per segment of the group's layers): the budget reserves it for every
// block of a call.
func opsPerBlock(l *rankLayout) int {
	most := 0
	for _, layers := range l.groupLayers {
		n := 0
		for _, i := range layers {
			n += len(l.layers[i].segments)
		}
		most = max(most, n)
	}
	return most
}
