package router

import (
	"context"
	"errors"
	"time"
)

// The KV policy's per-request work (--lb kv): the prompt's token ids
// (tokenize.go), its vLLM block hashes (kvhash.go, remembered by
// kvmemo.go), how many leading
// blocks each engine behind the candidates holds (kvindex.go, in parallel
// within --kv-lookup-budget), and the P/D bypass verdict. The selectors
// (selector.go) then pick from the route.

// route is one request's KV routing state. kvRoute fills it before the
// legs; the prefill leg then sets prefill. The legs run one after another
// on the request's goroutine, so it needs no lock.
type route struct {
	blockSize int
	tokens    int            // the prompt's token count
	blocks    int            // its full blocks (hashed)
	hits      map[string]int // engine -> leading blocks it holds; absent: none
	// prefill is the P whose prefill succeeded (nil before, and with a
	// bypass): its engine holds every block once P saved them.
	prefill *backend
	// bypass: a D's host holds at least --pd-bypass-ratio of the prompt,
	// so the request skips P and goes to D alone.
	bypass bool
}

// held is the blocks b's engine holds now.
func (rt *route) held(b *backend) int {
	if !b.kvKnown {
		return 0
	}
	return rt.hits[b.kvEngine]
}

// uncachedTokens is what b would compute: the prompt past its engine's
// prefix, at least one token (vLLM always computes the last).
func (rt *route) uncachedTokens(b *backend) int {
	return max(1, rt.tokens-rt.held(b)*rt.blockSize)
}

// localBlocks is what a D at b would load from its own host: every block
// when it shares the chosen P's engine, else what its engine holds.
func (rt *route) localBlocks(b *backend) int {
	if rt.colocated(b) {
		return rt.blocks
	}
	return rt.held(b)
}

// colocated: b shares the chosen P's engine.
func (rt *route) colocated(b *backend) bool {
	p := rt.prefill
	return p != nil && p.kvKnown && b.kvKnown && p.kvEngine == b.kvEngine
}

// kvState is the router's KV policy: nil unless --lb kv.
type kvState struct {
	idx     KVIndex
	engines kvEngineMap
	hasher  *kvHasher
}

// newKVState checks the KV policy's configuration against idx (a nil
// index: --lb kv refused).
func newKVState(cfg Config, idx KVIndex) (*kvState, error) {
	if idx == nil {
		return nil, errors.New("--lb kv needs the engines' index, which this process was not given (run it in pegaflow serve)")
	}
	engines, err := parseKVEngines(cfg.KVEngines, cfg.KVEnginePort)
	if err != nil {
		return nil, err
	}
	hasher, err := newKVHasher(cfg.KVHashAlgo, cfg.KVHashSeed, cfg.KVBlockSize, uint64(cfg.KVHashMemo))
	if err != nil {
		return nil, err
	}
	return &kvState{idx: idx, engines: engines, hasher: hasher}, nil
}

// kvRoute is the request's route under --lb kv: nil when the policy is
// off, or when the request cannot be routed by KV (a fallback, counted by
// reason). body is the client's body; chat: a chat completion.
func (r *Router) kvRoute(ctx context.Context, in *incoming, body []byte) *route {
	if r.kvs == nil {
		return nil
	}
	p, reason := promptOf(body, in.path == pathChatCompletions)
	ids := p.ids
	if reason == "" && ids == nil {
		ids, reason = r.promptTokens(ctx, in, p.tokenize)
	}
	if reason != "" {
		r.m.kvFallbacks[reason].Inc()
		return nil
	}
	return r.routeTokens(ctx, ids, p.salt)
}

// routeTokens is the route of a prompt of ids: its hashes, the engines'
// lookups and the bypass verdict (the decision's cost past tokenizing).
func (r *Router) routeTokens(ctx context.Context, ids []uint32, salt string) *route {
	t0 := time.Now()
	defer func() { r.m.observe(phaseKVRoute, time.Since(t0).Seconds()) }()
	hashes, err := r.kvs.hasher.blockHashes(ids, salt)
	if err != nil { // Validate tried the algorithm: not expected
		r.m.kvFallbacks[fallbackHashError].Inc()
		return nil
	}
	rt := &route{blockSize: r.cfg.KVBlockSize, tokens: len(ids), blocks: len(hashes)}
	r.m.kvPromptTokens.Add(float64(rt.tokens))
	if len(hashes) == 0 {
		return rt // shorter than a block: nothing any engine can hold
	}
	q := KVQuery{BlockSize: r.cfg.KVBlockSize, HashAlgo: r.cfg.KVHashAlgo, SeedFingerprint: r.kvs.hasher.fp, Hashes: hashes}
	rt.hits = lookupAll(ctx, r.kvs.idx, r.kvEngines(), q, r.cfg.KVLookupBudget, r.m.kvLookup)
	if r.decode != nil && r.cfg.PDBypassRatio > 0 {
		best, now := 0, time.Now()
		for _, b := range r.decode.backends() {
			if b.healthy(now) {
				best = max(best, rt.held(b))
			}
		}
		rt.bypass = best > 0 && float64(best*rt.blockSize) >= r.cfg.PDBypassRatio*float64(rt.tokens)
	}
	return rt
}

// promptTokens gets the prompt's ids from an answer-leg backend's
// /tokenize within --kv-tokenize-timeout, or the fallback reason.
func (r *Router) promptTokens(ctx context.Context, in *incoming, req []byte) ([]uint32, string) {
	b := r.answer.pool.pick(nil, nil)
	if b == nil {
		return nil, fallbackNoTokenizer
	}
	t0 := time.Now()
	tctx, cancel := context.WithTimeout(ctx, r.cfg.KVTokenizeTimeout)
	defer cancel()
	ids, err := r.tokenize(tctx, b, in.authz, req)
	r.m.observe(phaseKVTokenize, time.Since(t0).Seconds())
	if err != nil {
		var terr *tokenizeError
		reason := fallbackTokenizeError
		if errors.As(err, &terr) {
			reason = terr.reason
		}
		r.log.Debug("tokenize failed: routing by --kv-fallback-lb", "backend", b.name, "request_id", in.reqID, "err", err)
		return nil, reason
	}
	return ids, ""
}

// kvEngines are the distinct engines behind the selectable backends of
// every pool: each is asked once per request.
func (r *Router) kvEngines() []string {
	var engines []string
	now := time.Now()
	for _, p := range r.pools() {
		for _, b := range p.backends() {
			if b.kvKnown && b.healthy(now) && !containsString(engines, b.kvEngine) {
				engines = append(engines, b.kvEngine)
			}
		}
	}
	return engines
}

func containsString(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// Decision reasons (kv_decisions_total{reason}).
const (
	decisionHit       = "prefix_hit" // the chosen backend's engine holds part of the prompt
	decisionNoHit     = "no_hit"     // it holds none (a cold prompt: chosen by load)
	decisionColocated = "colocated"  // a D on the chosen P's engine: loads everything locally
	decisionBypass    = "bypass"     // a D alone, its host holding >= --pd-bypass-ratio
	decisionFallback  = "fallback"   // no route: --kv-fallback-lb chose
)

// kvDecided counts the KV policy's pick of b (for the leg of b's role)
// and the hit tokens it predicts.
func (r *Router) kvDecided(b *backend, rt *route) {
	if r.kvs == nil {
		return
	}
	reason, blocks := decisionFallback, 0
	switch {
	case rt == nil:
	case rt.bypass:
		reason, blocks = decisionBypass, rt.held(b)
	case b.role == roleDecode && rt.colocated(b):
		reason, blocks = decisionColocated, rt.blocks
	case rt.held(b) > 0:
		reason, blocks = decisionHit, rt.held(b)
	default:
		reason = decisionNoHit
	}
	r.m.kvDecisions.WithLabelValues(b.role, reason).Inc()
	if rt != nil {
		r.m.kvHitTokens.WithLabelValues(b.role).Add(float64(blocks * rt.blockSize))
	}
}
