package engine

import (
	"time"

	pb "github.com/pegaflow/pegaflow/engine/api/pegaflowv1"
)

// share is one TP rank's part of a block: its group's rankBytes in one extent of
// the pool on the NUMA node of the GPU of the rank that saved it (the
// default pool for ranks without one). ext.size == 0 until that rank's
// save allocates it.
type share struct {
	b    *block
	pool int // index into e.pools
	ext  extent
	// Eviction state (evict.go): the queue of e.policy.pools[pool] that
	// holds the share, its links there, and its CLOCK bits.
	queue                queueID
	prev, next           *share
	referenced, promoted bool
}

// block is one KV block of a namespace: one share per TP rank (MLA's
// namespaces have TP size 1, so one share), each allocated by the rank
// that saves it, so P's ranks on different NUMA nodes each copy into
// their own node's pool. A sealed block has every share allocated.
type block struct {
	hash string
	ns   *namespace
	// g is the block's KV cache group: the block holds its layers only.
	g       *nsGroup
	freed   bool
	shares  []share // len ns.desc.TPSize, indexed by rank
	created time.Time
	saved   uint64 // ranks whose copy completed
	saving  uint64 // ranks copying now
	sealed  bool
	loading int32 // loads copying out now
	// pins counts reasons the block must stay: saves and loads in flight,
	// leases, transfers. Evictable iff sealed && pins == 0.
	pins int32
	// transfers still waiting for this block to seal.
	transfers []*transfer
	// queued: the shares are in the eviction queues (evict.go).
	queued bool
	// promo is the SSD promotion filling the block (promote.go), nil
	// otherwise; origin is where its bytes came from, until its first hit.
	promo  *promotion
	origin uint8
	// staged: the SSD tier has the block, or has it queued (spill.go).
	staged bool
}

// newBlock makes a block of group g of ns; the caller enters it with
// e.addBlockLocked.
func newBlock(ns *namespace, g *nsGroup, hash string, now time.Time) *block {
	b := &block{hash: hash, ns: ns, g: g, created: now, shares: make([]share, ns.desc.TPSize)}
	for i := range b.shares {
		b.shares[i].b = b
	}
	return b
}

func (e *Engine) pinLocked(b *block) {
	if b.pins == 0 {
		e.policy.withdraw(b)
	}
	b.pins++
}

func (e *Engine) unpinLocked(b *block) {
	b.pins--
	if b.pins == 0 && b.sealed {
		if !b.freed {
			e.policy.admit(b)
		}
	}
}

// allocateLocked finds space for a share in pool p, evicting unpinned
// sealed blocks with a share there, in that pool's policy order, as
// needed; with an SSD tier, a victim from the main queue is spilled
// (spill.go). It fails when nothing evictable is left in p.
func (e *Engine) allocateLocked(p int, size uint64) (extent, bool) {
	for {
		if ext, ok := e.pools[p].alloc.alloc(size); ok {
			return ext, true
		}
		victim, proven := e.policy.victim(p)
		if victim == nil {
			return extent{}, false
		}
		if proven && e.tier != nil {
			e.stageLocked(victim) // staging full: not spilled, counted
		}
		e.freeLocked(victim)
		e.stats.evictions++
	}
}

// addBlockLocked enters a new, unsealed block in its group's index.
func (e *Engine) addBlockLocked(b *block) {
	b.g.blocks[b.hash] = b
	e.numBlocks++
	e.stats.kinds[b.g.kind].resident++
	e.partial[b] = struct{}{}
}

// releaseShareLocked returns a share's extent to its pool.
func (e *Engine) releaseShareLocked(s *share) {
	if s.ext.size == 0 {
		return
	}
	e.pools[s.pool].alloc.release(s.ext)
	s.ext = extent{}
}

// freeLocked drops a block from the index and returns its shares' extents.
func (e *Engine) freeLocked(b *block) {
	if b.sealed {
		b.ns.feed.add(pb.BlockEventKind_BLOCK_EVENT_KIND_REMOVED, b)
	}
	e.policy.withdraw(b)
	delete(b.g.blocks, b.hash)
	b.freed = true
	e.numBlocks--
	e.stats.kinds[b.g.kind].resident--
	delete(e.partial, b)
	for i := range b.shares {
		e.releaseShareLocked(&b.shares[i])
	}
}

// failBlockLocked frees a block no rank will complete and fails the
// transfers waiting on it.
func (e *Engine) failBlockLocked(b *block, why string) {
	for _, t := range b.transfers {
		t.blockFailed(e, b, why)
	}
	b.transfers = nil
	e.freeLocked(b)
	e.broadcastLocked()
}

func (e *Engine) sealLocked(b *block) {
	b.sealed = true
	b.ns.feed.add(pb.BlockEventKind_BLOCK_EVENT_KIND_STORED, b)
	delete(e.partial, b)
	waiting := b.transfers
	b.transfers = nil
	for _, t := range waiting {
		t.pending--
		t.check(e)
	}
}
