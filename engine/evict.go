package engine

import (
	"github.com/dgraph-io/ristretto/v2"
)

// queueID says which eviction queue holds a share.
type queueID uint8

const (
	queueNone      queueID = iota // pinned, in flight or unsealed: not evictable
	queueProbation                // first admitted, evicted first
	queueMain                     // proven reuse
)

// shareList is an intrusive doubly linked list of block shares (head =
// newest).
type shareList struct {
	head, tail *share
	bytes      uint64
	len        int
}

func (l *shareList) pushFront(s *share) {
	s.prev, s.next = nil, l.head
	if l.head != nil {
		l.head.prev = s
	}
	l.head = s
	if l.tail == nil {
		l.tail = s
	}
	l.bytes += s.ext.size
	l.len++
}

func (l *shareList) remove(s *share) {
	if s.prev != nil {
		s.prev.next = s.next
	} else {
		l.head = s.next
	}
	if s.next != nil {
		s.next.prev = s.prev
	} else {
		l.tail = s.prev
	}
	s.prev, s.next = nil, nil
	l.bytes -= s.ext.size
	l.len--
}

// poolQueues are one pool's S3-FIFO queues.
type poolQueues struct {
	probation, main shareList
	probationLimit  uint64
}

// evictionPolicy is an S3-FIFO-style policy over the exact block index,
// kept per pool: each pool's queues hold the shares stored in it, so
// making room in one pool evicts, in that pool's policy order, only blocks
// that free space there.
//
// Invariant: a block is queued (b.queued) iff it is sealed and unpinned;
// then every one of its shares is in exactly one of its pool's probation
// or main (s.queue says which); otherwise none is. So a victim is never
// pinned, leased, in flight or partially saved, and evicting a block
// withdraws all of its shares at once.
//
// New blocks enter probation unless their key was evicted recently (found
// in the ghost set), in which case they go straight to main. Probation is
// FIFO: a referenced share leaving it is promoted to main instead of
// evicted. Main is a CLOCK: a referenced tail gets a second chance. A
// pool's probation is drained first while it holds more than
// probationShare of the pool, so a scan of one-off blocks evicts itself
// rather than the hot shared prefixes in main. Reference and promotion
// bits are per share (a hit sets them on every share), so a block with
// several shares in one pool (TP ranks on one node) behaves as one entry
// would.
//
// The ghost set, shared by the pools, is a ristretto cache of keys (cost 1
// each). Its TinyLFU admission keeps the keys that are re-requested often;
// it may drop or delay keys (ristretto's Set is asynchronous and lossy),
// which only costs a promotion, never correctness, because the index
// itself is exact.
type evictionPolicy struct {
	pools     []poolQueues
	evictable int // queued blocks
	ghost     *ristretto.Cache[string, struct{}]
	// proven, when set, is told of a block whose share entered a main
	// queue (it proved reuse). The SSD tier writes it then, ahead of any
	// eviction (spill.go); a prefix query's hit tells it too (query.go).
	proven func(*block)
}

// probationShare is S3-FIFO's small-queue share of the capacity.
const probationShare = 0.10

// newEvictionPolicy makes queues for pools of the given capacities.
func newEvictionPolicy(capacities []uint64, ghostEntries int64) (*evictionPolicy, error) {
	if ghostEntries < 64 {
		ghostEntries = 64
	}
	ghost, err := ristretto.NewCache(&ristretto.Config[string, struct{}]{
		NumCounters: ghostEntries * 10,
		MaxCost:     ghostEntries,
		BufferItems: 64,
	})
	if err != nil {
		return nil, err
	}
	p := &evictionPolicy{pools: make([]poolQueues, len(capacities)), ghost: ghost}
	for i, c := range capacities {
		p.pools[i].probationLimit = uint64(float64(c) * probationShare)
	}
	return p, nil
}

func (p *evictionPolicy) close() { p.ghost.Close() }

// admit queues a block that just became evictable (sealed: every share is
// allocated).
func (p *evictionPolicy) admit(b *block) {
	if b.queued {
		return
	}
	b.queued = true
	p.evictable++
	_, seen := p.ghost.Get(b.ghostKey())
	main := false
	for i := range b.shares {
		s := &b.shares[i]
		q := &p.pools[s.pool]
		if seen {
			s.promoted = true
		}
		if s.promoted {
			s.queue = queueMain
			q.main.pushFront(s)
			main = true
			continue
		}
		s.queue = queueProbation
		q.probation.pushFront(s)
	}
	if main && p.proven != nil {
		p.proven(b)
	}
}

// withdraw takes a block's shares out of the queues (it got pinned or is
// freed).
func (p *evictionPolicy) withdraw(b *block) {
	if !b.queued {
		return
	}
	b.queued = false
	p.evictable--
	for i := range b.shares {
		s := &b.shares[i]
		q := &p.pools[s.pool]
		switch s.queue {
		case queueProbation:
			q.probation.remove(s)
		case queueMain:
			q.main.remove(s)
		}
		s.queue = queueNone
	}
}

// touch records a use of the block.
func (p *evictionPolicy) touch(b *block) {
	for i := range b.shares {
		b.shares[i].referenced = true
	}
}

// victim picks the next block to evict for space in pool and withdraws
// it, or returns nil when nothing with a share in that pool is evictable.
// proven says it left the main queue (it proved reuse: worth spilling).
func (p *evictionPolicy) victim(pool int) (b *block, proven bool) {
	q := &p.pools[pool]
	for q.probation.len+q.main.len > 0 {
		if q.probation.len > 0 && (q.probation.bytes > q.probationLimit || q.main.len == 0) {
			s := q.probation.tail
			q.probation.remove(s)
			if s.referenced {
				s.referenced, s.promoted = false, true
				s.queue = queueMain
				q.main.pushFront(s)
				if p.proven != nil {
					p.proven(s.b)
				}
				continue
			}
			s.queue = queueNone
			p.ghost.Set(s.b.ghostKey(), struct{}{}, 1)
			p.withdraw(s.b)
			return s.b, false
		}
		s := q.main.tail
		q.main.remove(s)
		if s.referenced {
			s.referenced = false
			q.main.pushFront(s)
			continue
		}
		s.queue = queueNone
		p.withdraw(s.b)
		return s.b, true
	}
	return nil, false
}

// ghostKey identifies a block across namespaces and groups for the ghost
// set (fixed-size prefix, so no two blocks share a key).
func (b *block) ghostKey() string {
	n := b.ns.idx
	return string([]byte{byte(n), byte(n >> 8), byte(n >> 16), byte(n >> 24), byte(b.g.index)}) + b.hash
}
