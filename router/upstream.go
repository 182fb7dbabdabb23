package router

import (
	"context"
	"math/rand/v2"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// backend is one vLLM instance. Health is the conjunction of the last
// active /health poll and the passive ejection window.
type backend struct {
	role     string
	base     string
	inflight atomic.Int64
	polledOK atomic.Bool

	mu           sync.Mutex
	consecFails  int
	ejectedUntil time.Time
}

func (b *backend) healthy(now time.Time) bool {
	if !b.polledOK.Load() {
		return false
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	return !now.Before(b.ejectedUntil)
}

// markResult feeds passive health: threshold consecutive failures eject the
// backend for cooldown.
func (b *backend) markResult(ok bool, threshold int, cooldown time.Duration, now time.Time) (ejected bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if ok {
		b.consecFails = 0
		return false
	}
	b.consecFails++
	if b.consecFails >= threshold {
		b.consecFails = 0
		b.ejectedUntil = now.Add(cooldown)
		return true
	}
	return false
}

// pool selects among the healthy backends of one role.
type pool struct {
	role     string
	backends []*backend
	lb       string
	next     atomic.Uint64
}

func newPool(role string, urls []string, lb string) *pool {
	p := &pool{role: role, lb: lb}
	for _, u := range urls {
		b := &backend{role: role, base: strings.TrimRight(u, "/")}
		b.polledOK.Store(true) // optimistic until the first poll says otherwise
		p.backends = append(p.backends, b)
	}
	return p
}

// pick returns a healthy backend not in tried, or nil.
func (p *pool) pick(tried map[*backend]bool) *backend {
	now := time.Now()
	candidates := make([]*backend, 0, len(p.backends))
	for _, b := range p.backends {
		if !tried[b] && b.healthy(now) {
			candidates = append(candidates, b)
		}
	}
	switch len(candidates) {
	case 0:
		return nil
	case 1:
		return candidates[0]
	}
	if p.lb == LBLeastInflight {
		// Power of two choices: near least-loaded without herding.
		i := rand.IntN(len(candidates))
		j := rand.IntN(len(candidates) - 1)
		if j >= i {
			j++
		}
		if candidates[j].inflight.Load() < candidates[i].inflight.Load() {
			return candidates[j]
		}
		return candidates[i]
	}
	return candidates[int(p.next.Add(1)-1)%len(candidates)]
}

func (p *pool) anyHealthy() bool {
	now := time.Now()
	for _, b := range p.backends {
		if b.healthy(now) {
			return true
		}
	}
	return false
}

// pollHealth runs active health checks until ctx ends.
func pollHealth(ctx context.Context, client *http.Client, pools []*pool, interval, timeout time.Duration, onChange func(*backend, bool)) {
	if interval <= 0 {
		<-ctx.Done()
		return
	}
	check := func() {
		var wg sync.WaitGroup
		for _, p := range pools {
			for _, b := range p.backends {
				wg.Add(1)
				go func() {
					defer wg.Done()
					cctx, cancel := context.WithTimeout(ctx, timeout)
					defer cancel()
					ok := false
					req, err := http.NewRequestWithContext(cctx, http.MethodGet, b.base+"/health", nil)
					if err == nil {
						if resp, err := client.Do(req); err == nil {
							ok = resp.StatusCode == http.StatusOK
							resp.Body.Close()
						}
					}
					if ctx.Err() != nil {
						return
					}
					if b.polledOK.Swap(ok) != ok {
						onChange(b, ok)
					}
				}()
			}
		}
		wg.Wait()
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	check()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			check()
		}
	}
}
