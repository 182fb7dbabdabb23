package sim

import (
	"context"
	"sync"
)

// blockPool hands out the KV cache's block ids. A request reserves all the
// blocks it can need (prompt + max output) at once, so holders never wait
// for each other.
type blockPool struct {
	mu      sync.Mutex
	free    []uint32
	total   int
	changed chan struct{} // closed (and replaced) whenever blocks are freed
}

func newBlockPool(n int) *blockPool {
	p := &blockPool{total: n, changed: make(chan struct{})}
	for i := n - 1; i >= 0; i-- {
		p.free = append(p.free, uint32(i))
	}
	return p
}

// tryAlloc takes n blocks or none. When it fails, the returned channel is
// closed at the next release.
func (p *blockPool) tryAlloc(n int) ([]uint32, <-chan struct{}) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if n > len(p.free) {
		return nil, p.changed
	}
	out := make([]uint32, n)
	copy(out, p.free[len(p.free)-n:])
	p.free = p.free[:len(p.free)-n]
	return out, nil
}

// alloc waits until n blocks are free or ctx ends.
func (p *blockPool) alloc(ctx context.Context, n int) ([]uint32, error) {
	for {
		b, changed := p.tryAlloc(n)
		if changed == nil {
			return b, nil
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

func (p *blockPool) release(blocks []uint32) {
	if len(blocks) == 0 {
		return
	}
	p.mu.Lock()
	p.free = append(p.free, blocks...)
	close(p.changed)
	p.changed = make(chan struct{})
	p.mu.Unlock()
}

func (p *blockPool) used() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.total - len(p.free)
}
