package router

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// KVIndex answers how much of a prompt the engine serving a backend
// already holds. The router asks it, never a shadow index of its own: the
// engines' indexes are authoritative (CPU tier included, restart-safe).
//
// Lookup must be safe for concurrent use and must return soon after ctx
// ends (the router stops waiting at its --kv-lookup-budget either way and
// counts a late answer as no hit).
type KVIndex interface {
	// Lookup returns the number of leading blocks of q.Hashes that the
	// engine holds sealed. engine is the engine's peer address
	// (host:port), mapped from the backend's URL by --kv-engine or
	// --kv-engine-port, or LocalEngine for the engine in this process. ctx
	// carries the routing budget.
	Lookup(ctx context.Context, engine string, q KVQuery) (blocks int, err error)
}

// LocalEngine is the engine address the router passes for the engine in
// its own process: loopback backends when neither --kv-engine nor
// --kv-engine-port names another.
const LocalEngine = ""

// KVQuery is one prompt's lookup. Model "" matches any model (the
// engine's namespaces record vLLM's model path, which a client's served
// model name need not equal); BlockSize, HashAlgo and SeedFingerprint
// select the namespaces whose hashes the router's can match.
type KVQuery struct {
	Model           string
	BlockSize       int
	HashAlgo        string
	SeedFingerprint []byte
	Hashes          [][]byte
}

// kvEngineMap is which engine serves which backend (--kv-engine,
// --kv-engine-port). Read only after New.
type kvEngineMap struct {
	byHostPort map[string]string // "host:port" of a backend -> engine
	byHost     map[string]string // backend host -> engine
	port       string            // --kv-engine-port ("" none)
}

// parseKVEngines reads --kv-engine BACKEND_HOST[:PORT]=ENGINE_HOST:PORT
// entries; a mapping with the backend's port wins over one by host.
func parseKVEngines(entries []string, port int) (kvEngineMap, error) {
	m := kvEngineMap{byHostPort: map[string]string{}, byHost: map[string]string{}}
	if port > 0 {
		m.port = strconv.Itoa(port)
	}
	var errs []error
	for _, e := range entries {
		from, to, ok := strings.Cut(e, "=")
		if !ok || from == "" {
			errs = append(errs, fmt.Errorf("--kv-engine %q: want BACKEND_HOST=ENGINE_HOST:PORT", e))
			continue
		}
		if err := checkHostPort(to); err != nil {
			errs = append(errs, fmt.Errorf("--kv-engine %q: engine address: %w", e, err))
			continue
		}
		from = strings.ToLower(from)
		if checkHostPort(from) == nil {
			h, p, _ := net.SplitHostPort(from)
			m.byHostPort[net.JoinHostPort(h, p)] = to
			continue
		}
		if err := checkHostPort(net.JoinHostPort(strings.Trim(from, "[]"), "1")); err != nil {
			errs = append(errs, fmt.Errorf("--kv-engine %q: backend host: %w", e, err))
			continue
		}
		m.byHost[strings.Trim(from, "[]")] = to
	}
	return m, errors.Join(errs...)
}

// engineFor is the engine serving the backend at base; ok false when no
// engine is known (the backend counts as holding nothing). A dns://
// backend's base holds the resolved address, so --kv-engine-port maps it.
func (m kvEngineMap) engineFor(base string) (engine string, ok bool) {
	u, err := url.Parse(base)
	if err != nil {
		return "", false
	}
	host, port := strings.ToLower(u.Hostname()), u.Port()
	if port == "" {
		port = "80"
		if u.Scheme == "https" {
			port = "443"
		}
	}
	if e, ok := m.byHostPort[net.JoinHostPort(host, port)]; ok {
		return e, true
	}
	if e, ok := m.byHost[host]; ok {
		return e, true
	}
	if m.port != "" {
		return net.JoinHostPort(host, m.port), true
	}
	if isLoopbackHost(host) {
		return LocalEngine, true
	}
	return "", false
}

func isLoopbackHost(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// Lookup results (kv_lookups_total{result}).
const (
	lookupHit     = "ok"
	lookupError   = "error"
	lookupTimeout = "timeout" // no answer within --kv-lookup-budget
	lookupBogus   = "bogus"   // an answer outside [0, hashes]
)

// lookupAll asks every engine in engines (distinct) in parallel and
// returns, within budget, the blocks each holds (absent: none). An engine
// that errs, answers nonsense or is still silent when the budget ends
// counts as holding nothing; its goroutine is left to end with ctx and
// its answer is dropped. observe gets each engine's result and latency.
func lookupAll(ctx context.Context, idx KVIndex, engines []string, q KVQuery, budget time.Duration,
	observe func(result string, seconds float64)) map[string]int {
	type answer struct {
		engine string
		blocks int
		err    error
		took   time.Duration
	}
	lctx, cancel := context.WithTimeout(ctx, budget)
	defer cancel()
	ch := make(chan answer, len(engines)) // never blocks a late sender
	for _, e := range engines {
		go func() {
			t0 := time.Now()
			n, err := idx.Lookup(lctx, e, q)
			ch <- answer{e, n, err, time.Since(t0)}
		}()
	}
	hits := make(map[string]int, len(engines))
	for got := 0; got < len(engines); got++ {
		select {
		case a := <-ch:
			switch {
			case a.err != nil:
				observe(lookupError, a.took.Seconds())
			case a.blocks < 0 || a.blocks > len(q.Hashes):
				observe(lookupBogus, a.took.Seconds())
			default:
				observe(lookupHit, a.took.Seconds())
				if a.blocks > 0 {
					hits[a.engine] = a.blocks
				}
			}
		case <-lctx.Done():
			for range len(engines) - got {
				observe(lookupTimeout, budget.Seconds())
			}
			return hits
		}
	}
	return hits
}
