package engine

import (
	"errors"
	"fmt"

	"github.com/pegaflow/pegaflow/engine/topology"
	"github.com/pegaflow/pegaflow/native"
)

// pool is one native pool, bound to one NUMA node, with its allocator.
// Its eviction queues are evictionPolicy.pools[idx]. The engine's pools
// are fixed at New: e.pools[i].idx == i.
type pool struct {
	idx   int
	node  int // NUMA node (-1: no binding)
	gpus  int // GPUs whose ranks' shares it holds (topology.PoolShare.GPUs)
	mem   *native.Pool
	alloc *allocator // guarded by e.mu
}

// openPools allocates the placement's pools, their extents aligned to
// align. On error the ones already
// allocated are freed.
func openPools(placement topology.Placement, device int, flags native.PoolFlags, align uint64) ([]*pool, int, error) {
	pools := make([]*pool, 0, len(placement.Pools))
	def := -1
	for i, ps := range placement.Pools {
		mem, err := native.NewPool(ps.Size, ps.Node, device, flags)
		if err != nil {
			closePools(pools)
			return nil, -1, fmt.Errorf("allocate pool of %d bytes on NUMA node %d: %w", ps.Size, ps.Node, err)
		}
		pools = append(pools, &pool{idx: i, node: ps.Node, gpus: ps.GPUs, mem: mem, alloc: newAlignedAllocator(mem.Size(), align)})
		if ps.Node == placement.Node {
			def = i
		}
	}
	if def < 0 {
		closePools(pools)
		return nil, -1, fmt.Errorf("placement has no pool on its default node %d", placement.Node)
	}
	return pools, def, nil
}

func closePools(pools []*pool) error {
	var errs []error
	for _, p := range pools {
		errs = append(errs, p.mem.Close())
	}
	return errors.Join(errs...)
}

// poolFor picks the pool for a rank's shares: the one on its GPU's NUMA
// node, the default pool when the rank has no GPU (CPU mode, shm regions)
// or its node has no pool of its own (unknown node, --numa-node, a single
// pool).
func (e *Engine) poolFor(layout *rankLayout) int {
	if layout.device == "" {
		return e.defaultPool
	}
	gpu, ok := e.cfg.Topology.Lookup(layout.device)
	if !ok || gpu.NUMANode < 0 {
		return e.defaultPool
	}
	for _, p := range e.pools {
		if p.node == gpu.NUMANode {
			return p.idx
		}
	}
	return e.defaultPool
}

// capacity is the sum of the pools' sizes.
func (e *Engine) capacity() uint64 {
	var n uint64
	for _, p := range e.pools {
		n += p.mem.Size()
	}
	return n
}

// usedLocked is the sum of the bytes the pools' blocks hold.
func (e *Engine) usedLocked() uint64 {
	var n uint64
	for _, p := range e.pools {
		n += p.alloc.used
	}
	return n
}
