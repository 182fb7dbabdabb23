package engine

import (
	"github.com/dgraph-io/ristretto/v2"
)

// queueID says which eviction queue holds a block.
type queueID uint8

const (
	queueNone      queueID = iota // pinned, in flight or unsealed: not evictable
	queueProbation                // first admitted, evicted first
	queueMain                     // proven reuse
)

// blockList is an intrusive doubly linked list of blocks (head = newest).
type blockList struct {
	head, tail *block
	bytes      uint64
	len        int
}

func (l *blockList) pushFront(b *block) {
	b.prev, b.next = nil, l.head
	if l.head != nil {
		l.head.prev = b
	}
	l.head = b
	if l.tail == nil {
		l.tail = b
	}
	l.bytes += b.ext.size
	l.len++
}

func (l *blockList) remove(b *block) {
	if b.prev != nil {
		b.prev.next = b.next
	} else {
		l.head = b.next
	}
	if b.next != nil {
		b.next.prev = b.prev
	} else {
		l.tail = b.prev
	}
	b.prev, b.next = nil, nil
	l.bytes -= b.ext.size
	l.len--
}

// evictionPolicy is an S3-FIFO-style policy over the exact block index.
//
// Invariant: a block is in exactly one of probation/main iff it is sealed and
// unpinned (b.queue says which); every other block is in neither, so a victim
// is never pinned, leased, in flight or partially saved.
//
// New blocks enter probation unless their key was evicted recently (found in
// the ghost set), in which case they go straight to main. Probation is FIFO:
// a referenced block leaving it is promoted to main instead of evicted. Main
// is a CLOCK: a referenced tail gets a second chance. Probation is drained
// first while it holds more than probationShare of the pool, so a scan of
// one-off blocks evicts itself rather than the hot shared prefixes in main.
//
// The ghost set is a ristretto cache of keys (cost 1 each). Its TinyLFU
// admission keeps the keys that are re-requested often; it may drop or delay
// keys (ristretto's Set is asynchronous and lossy), which only costs a
// promotion, never correctness, because the index itself is exact.
type evictionPolicy struct {
	probation, main blockList
	probationLimit  uint64
	ghost           *ristretto.Cache[string, struct{}]
}

// probationShare is S3-FIFO's small-queue share of the capacity.
const probationShare = 0.10

func newEvictionPolicy(capacity uint64, ghostEntries int64) (*evictionPolicy, error) {
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
	return &evictionPolicy{
		probationLimit: uint64(float64(capacity) * probationShare),
		ghost:          ghost,
	}, nil
}

func (p *evictionPolicy) close() { p.ghost.Close() }

// admit puts a block that just became evictable into its queue.
func (p *evictionPolicy) admit(b *block) {
	if b.queue != queueNone {
		return
	}
	if b.promoted {
		b.queue = queueMain
		p.main.pushFront(b)
		return
	}
	if _, seen := p.ghost.Get(b.ghostKey()); seen {
		b.promoted = true
		b.queue = queueMain
		p.main.pushFront(b)
		return
	}
	b.queue = queueProbation
	p.probation.pushFront(b)
}

// withdraw takes a block out of the queues (it got pinned or is freed).
func (p *evictionPolicy) withdraw(b *block) {
	switch b.queue {
	case queueProbation:
		p.probation.remove(b)
	case queueMain:
		p.main.remove(b)
	}
	b.queue = queueNone
}

// touch records a use of the block.
func (p *evictionPolicy) touch(b *block) { b.referenced = true }

// victim picks the next block to evict and withdraws it, or returns nil
// when nothing is evictable.
func (p *evictionPolicy) victim() *block {
	for p.probation.len+p.main.len > 0 {
		if p.probation.len > 0 && (p.probation.bytes > p.probationLimit || p.main.len == 0) {
			b := p.probation.tail
			p.probation.remove(b)
			if b.referenced {
				b.referenced, b.promoted = false, true
				b.queue = queueMain
				p.main.pushFront(b)
				continue
			}
			b.queue = queueNone
			p.ghost.Set(b.ghostKey(), struct{}{}, 1)
			return b
		}
		b := p.main.tail
		p.main.remove(b)
		if b.referenced {
			b.referenced = false
			p.main.pushFront(b)
			continue
		}
		b.queue = queueNone
		return b
	}
	return nil
}
