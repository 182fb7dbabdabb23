package router

import (
	"encoding/base64"
	"net/url"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/pegaflow/pegaflow/router/upstream"
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
	// authLine is the Authorization header line that base's userinfo
	// gives ("" none).
	endpoints map[string]*upstream.Target
	authLine  []byte
	// m are its metric series, set by New before any request.
	m backendSeries
	// kvEngine is the address of the engine serving it (kvindex.go),
	// kvKnown whether one is known; set before it is published.
	kvEngine string
	kvKnown  bool

	mu           sync.Mutex
	consecFails  int
	ejectedUntil time.Time
}

// newBackend is the backend of role at base (a URL without trailing
// slash), not yet selectable: newPool marks it so.
func newBackend(role, base string) *backend {
	b := &backend{role: role, base: base, name: redactURL(base), endpoints: map[string]*upstream.Target{}}
	for _, path := range []string{pathCompletions, pathChatCompletions} {
		if u, err := url.Parse(base + path); err == nil {
			if t, err := upstream.NewTarget(u); err == nil {
				b.endpoints[path] = t
			}
		}
	}
	if u, err := url.Parse(base); err == nil && u.User != nil {
		pw, _ := u.User.Password()
		// base64 output needs no header validation.
		b.authLine, _ = upstream.AppendHeader(nil, "Authorization", "Basic "+base64.StdEncoding.EncodeToString([]byte(u.User.Username()+":"+pw)))
	}
	return b
}

// endpoint is the target of path on b (nil when base+path is not a
// usable URL; Config.Validate keeps such bases out). Shared: read only.
func (b *backend) endpoint(path string) *upstream.Target {
	return b.endpoints[path]
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
// ones with its selector. Its members are the static backends (http(s)
// URLs) and those its dns:// targets resolved to (discovery.go), published
// whole: a request reads one snapshot, and a published slice is never
// modified. Invariant: at most maxBackends members (Validate bounds the
// static ones, update the rest), so candidate lists live on the stack.
type pool struct {
	role    string
	sel     selector
	members atomic.Pointer[[]*backend]
	static  []string     // bases of the http(s) entries, in the order given
	targets []*dnsTarget // the dns:// entries (discovery.go)
	// attach gives a new backend its metric series before it is
	// published; detach drops them once it left. nil: neither (tests).
	attach, detach func(*backend)
}

// newPool builds the pool of role from entries (http(s) base URLs and
// dns://name:port targets, validated by Config.Validate) and its selector. The
// static backends are members at once; a target's join when it resolves.
func newPool(role string, entries []string, sel selector) *pool {
	p := &pool{role: role, sel: sel}
	for _, e := range entries {
		if isDNSTarget(e) {
			t, _ := parseDNSTarget(e)
			p.targets = append(p.targets, t)
			continue
		}
		base, _ := normalizeBackendURL(e)
		p.static = append(p.static, base)
	}
	p.update(p.static)
	return p
}

// backends is the current member list (read only).
func (p *pool) backends() []*backend {
	if m := p.members.Load(); m != nil {
		return *m
	}
	return nil
}

// update makes bases (duplicates ignored, at most maxBackends kept) the
// pool's members and returns who joined and who left. A base already a
// member keeps its backend object, so its health, ejection and in-flight
// count go on; a new one is a fresh backend (optimistically selectable
// until its first health poll, as at start); one that left gets no new
// requests, and those it has finish on the object they hold. Callers are
// serialized (New, then the discovery loop alone).
func (p *pool) update(bases []string) (joined, left []*backend, dropped int) {
	old := p.backends()
	byBase := make(map[string]*backend, len(old))
	for _, b := range old {
		byBase[b.base] = b
	}
	next := make([]*backend, 0, min(len(bases), maxBackends))
	kept := make(map[string]bool, len(bases))
	for _, base := range bases {
		if kept[base] {
			continue
		}
		if len(next) == maxBackends {
			dropped++
			continue
		}
		kept[base] = true
		b := byBase[base]
		if b == nil {
			b = newBackend(p.role, base)
			b.activeOK.Store(true) // optimistic until the first poll says otherwise
			if p.attach != nil {
				p.attach(b)
			}
			joined = append(joined, b)
		}
		next = append(next, b)
	}
	for _, b := range old {
		if !kept[b.base] {
			left = append(left, b)
		}
	}
	if old != nil && slices.Equal(next, old) {
		return nil, nil, dropped // the same members in the same order
	}
	p.members.Store(&next)
	for _, b := range left {
		if p.detach != nil {
			p.detach(b)
		}
	}
	return joined, left, dropped
}

// pick returns a healthy backend not in exclude, chosen by the pool's
// selector for the request's route rt (nil: none), or nil when there is
// none.
func (p *pool) pick(exclude []*backend, rt *route) *backend {
	members := p.backends()
	if len(members) == 1 { // the common small case, without a candidate list
		if b := members[0]; !contains(exclude, b) && b.healthy(time.Now()) {
			return b
		}
		return nil
	}
	cp := candPool.Get().(*[maxBackends]*backend)
	defer candPool.Put(cp)
	cands := cp[:0]
	now := time.Now()
	for _, b := range members {
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
	return p.sel.choose(cands, rt)
}

// candPool holds pick's candidate lists: one on the stack would escape
// through the selector interface, an allocation per pick.
var candPool = sync.Pool{New: func() any { return new([maxBackends]*backend) }}

// hasCandidate: a healthy backend not in exclude exists (pick would
// find one), asked without consulting the selector.
func (p *pool) hasCandidate(exclude []*backend) bool {
	now := time.Now()
	for _, b := range p.backends() {
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
	for _, b := range p.backends() {
		if b.healthy(now) {
			n++
		}
	}
	return n
}
