package router

import (
	"math/rand/v2"
	"sync/atomic"
)

// selector is a backend selection policy (--lb). The pool filters its
// backends down to the selectable ones the request has not tried yet; the
// selector chooses among those. A new policy is a new type here and its
// --lb name in newSelector.
//
// choose is called concurrently, with at least two candidates (the pool
// settles zero and one itself) in the pool's order, and returns one of
// them. rt is the request's KV routing state (kvroute.go), nil when there
// is none (the KV policy is off, the request fell back, or the leg is GET
// /v1/models): policies that do not route by KV ignore it.
type selector interface {
	choose(cands []*backend, rt *route) *backend
}

// newSelector is the policy named by --lb (nil for an unknown name);
// fallback is the KV policy's for requests without a route
// (--kv-fallback-lb). Each pool gets its own, so per-pool state such as a
// rotation stays per pool.
func newSelector(lb, fallback LB) selector {
	switch lb {
	case LBRoundRobin:
		return &roundRobin{}
	case LBLeastInflight:
		return leastInflight{}
	case LBKV:
		base := newSelector(fallback, "")
		if base == nil {
			base = leastInflight{}
		}
		return &kvSelector{base: base}
	}
	return nil
}

// roundRobin rotates over the candidates (--lb round-robin).
type roundRobin struct{ next atomic.Uint64 }

func (s *roundRobin) choose(cands []*backend, _ *route) *backend {
	return cands[(s.next.Add(1)-1)%uint64(len(cands))]
}

// leastInflight takes the less loaded of two random candidates (--lb
// least-inflight, power of two choices): it tracks the least loaded backend
// without every router herding onto it.
type leastInflight struct{}

func (leastInflight) choose(cands []*backend, _ *route) *backend {
	i := rand.IntN(len(cands))
	j := rand.IntN(len(cands) - 1)
	if j >= i {
		j++
	}
	if cands[j].inflight.Load() < cands[i].inflight.Load() {
		return cands[j]
	}
	return cands[i]
}

// kvSelector routes by where the prompt's KV already is (--lb kv). A
// prefill (or aggregated) backend costs its uncached tokens times its
// in-flight requests plus one; a decode backend is preferred by the
// blocks its host will hold when it runs: all of them when it shares the
// chosen P's engine (P saved the prompt there), else what its engine
// holds already. Ties rotate, so cold prompts spread. Without a route it
// is base (--kv-fallback-lb).
type kvSelector struct {
	base selector
	next atomic.Uint64
}

func (s *kvSelector) choose(cands []*backend, rt *route) *backend {
	if rt == nil {
		return s.base.choose(cands, nil)
	}
	n := uint64(len(cands))
	start := s.next.Add(1)
	var best *backend
	if cands[0].role == roleDecode {
		bestLocal, bestLoad := -1, int64(0)
		for k := range n {
			b := cands[(start+k)%n]
			local, load := rt.localBlocks(b), b.inflight.Load()
			if local > bestLocal || (local == bestLocal && load < bestLoad) {
				best, bestLocal, bestLoad = b, local, load
			}
		}
		return best
	}
	bestCost := int64(-1)
	for k := range n {
		b := cands[(start+k)%n]
		cost := int64(rt.uncachedTokens(b)) * (b.inflight.Load() + 1)
		if bestCost < 0 || cost < bestCost {
			best, bestCost = b, cost
		}
	}
	return best
}
