package router

import (
	"math/rand/v2"
	"sync/atomic"
)

// selector is a backend selection policy (--lb). The pool filters its
// backends down to the selectable ones the request has not tried yet; the
// selector chooses among those. A new policy (KV- or load-aware, say) is a
// new type here and its --lb name in newSelector.
//
// choose is called concurrently, with at least two candidates (the pool
// settles zero and one itself) in the pool's order, and returns one of
// them.
type selector interface {
	choose(cands []*backend) *backend
}

// newSelector is the policy named by --lb (nil for an unknown name). Each
// pool gets its own, so per-pool state such as a rotation stays per pool.
func newSelector(lb LB) selector {
	switch lb {
	case LBRoundRobin:
		return &roundRobin{}
	case LBLeastInflight:
		return leastInflight{}
	}
	return nil
}

// roundRobin rotates over the candidates (--lb round-robin).
type roundRobin struct{ next atomic.Uint64 }

func (s *roundRobin) choose(cands []*backend) *backend {
	return cands[(s.next.Add(1)-1)%uint64(len(cands))]
}

// leastInflight takes the less loaded of two random candidates (--lb
// least-inflight, power of two choices): it tracks the least loaded backend
// without every router herding onto it.
type leastInflight struct{}

func (leastInflight) choose(cands []*backend) *backend {
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
