package router

import (
	"sync"
	"sync/atomic"
	"time"
)

// backend is one vLLM server. It is selectable when its last active health
// poll passed (or none ran yet) and passive health has not ejected it.
type backend struct {
	role string
	base string // URL without trailing slash, credentials included: requests only
	// name is base without credentials (redactURL): every metric label,
	// log line, error message and /health entry shows this, never base.
	name     string
	inflight atomic.Int64
	activeOK atomic.Bool
	// warnedNoKVParams: the warning that this P answers without PegaFlow
	// kv_transfer_params was logged (once per backend).
	warnedNoKVParams atomic.Bool

	mu           sync.Mutex
	consecFails  int
	ejectedUntil time.Time
}

// newBackend is the backend of role at base (a URL without trailing
// slash), not yet selectable: newPool marks it so.
func newBackend(role, base string) *backend {
	return &backend{role: role, base: base, name: redactURL(base)}
}

func (b *backend) healthy(now time.Time) bool {
	if !b.activeOK.Load() {
		return false
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	return !now.Before(b.ejectedUntil)
}

// report feeds passive health. The failure count survives an ejection, so
// a backend that fails again right after its cool-down (half-open) is
// ejected again at once; a success closes it.
func (b *backend) report(ok bool, threshold int, cooldown time.Duration, now time.Time) (ejected bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if ok {
		b.consecFails = 0
		return false
	}
	b.consecFails++
	if b.consecFails >= threshold && !now.Before(b.ejectedUntil) {
		b.ejectedUntil = now.Add(cooldown)
		return true
	}
	return false
}

// pool holds the backends of one role and picks among the selectable
// ones with its selector. Invariant: at most maxBackends backends
// (Validate), so candidate lists live on the stack.
type pool struct {
	role     string
	backends []*backend
	sel      selector
}

// newPool builds the pool of role from urls and lb, both validated by
// Config.Validate.
func newPool(role string, urls []string, lb string) *pool {
	p := &pool{role: role, sel: newSelector(lb)}
	for _, u := range urls {
		base, _ := normalizeBackendURL(u)
		b := newBackend(role, base)
		b.activeOK.Store(true) // optimistic until the first poll says otherwise
		p.backends = append(p.backends, b)
	}
	return p
}

// pick returns a healthy backend not in exclude, chosen by the pool's
// selector, or nil when there is none.
func (p *pool) pick(exclude []*backend) *backend {
	var buf [maxBackends]*backend
	cands := buf[:0]
	now := time.Now()
	for _, b := range p.backends {
		if !contains(exclude, b) && b.healthy(now) {
			cands = append(cands, b)
		}
	}
	switch len(cands) {
	case 0:
		return nil
	case 1:
		return cands[0]
	}
	return p.sel.choose(cands)
}

func contains(list []*backend, b *backend) bool {
	for _, x := range list {
		if x == b {
			return true
		}
	}
	return false
}

// healthyCount is the number of selectable backends now.
func (p *pool) healthyCount() int {
	now := time.Now()
	n := 0
	for _, b := range p.backends {
		if b.healthy(now) {
			n++
		}
	}
	return n
}
