package router

import (
	"encoding/base64"
	"net/url"
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
	// endpoints are base+path parsed once, for the completion paths;
	// basicAuth is the Authorization that base's userinfo gives ("" none).
	endpoints map[string]*url.URL
	basicAuth string
	// m are its metric series, set by New before any request.
	m backendSeries

	mu           sync.Mutex
	consecFails  int
	ejectedUntil time.Time
}

// newBackend is the backend of role at base (a URL without trailing
// slash), not yet selectable: newPool marks it so.
func newBackend(role, base string) *backend {
	b := &backend{role: role, base: base, name: redactURL(base), endpoints: map[string]*url.URL{}}
	for _, path := range []string{pathCompletions, pathChatCompletions} {
		if u, err := url.Parse(base + path); err == nil {
			b.endpoints[path] = u
		}
	}
	if u, err := url.Parse(base); err == nil && u.User != nil {
		pw, _ := u.User.Password()
		b.basicAuth = "Basic " + base64.StdEncoding.EncodeToString([]byte(u.User.Username()+":"+pw))
	}
	return b
}

// endpoint is the URL of path on b. The URL is shared: read it only.
func (b *backend) endpoint(path string) *url.URL {
	if u, ok := b.endpoints[path]; ok {
		return u
	}
	u, _ := url.Parse(b.base + path) // base is validated; only the known paths come here
	return u
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
	if len(p.backends) == 1 { // the common small case, without a candidate list
		if b := p.backends[0]; !contains(exclude, b) && b.healthy(time.Now()) {
			return b
		}
		return nil
	}
	cp := candPool.Get().(*[maxBackends]*backend)
	defer candPool.Put(cp)
	cands := cp[:0]
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

// candPool holds pick's candidate lists: one on the stack would escape
// through the selector interface, an allocation per pick.
var candPool = sync.Pool{New: func() any { return new([maxBackends]*backend) }}

// hasCandidate: a healthy backend not in exclude exists (pick would
// find one), asked without consulting the selector.
func (p *pool) hasCandidate(exclude []*backend) bool {
	now := time.Now()
	for _, b := range p.backends {
		if !contains(exclude, b) && b.healthy(now) {
			return true
		}
	}
	return false
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
