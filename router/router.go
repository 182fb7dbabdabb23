// Package router is PegaFlow's OpenAI-compatible proxy in front of vLLM.
//
// In P/D mode (--prefill, --decode) each request is prefilled on a P
// backend with max_tokens=1, then, once the engine says the transfer's KV
// is sealed (in-process or by POST /kv_ready), decoded on a D backend whose
// stream is relayed to the client. In aggregated mode (--backend) each
// request goes whole to one backend: the data-parallel baseline that P/D is
// compared against, with the same retries, health and metrics.
//
// The files, one concern each:
//   - router.go (this file): wiring (New, Register, Run, Close) and the
//     request orchestration (handleCompletion, servePD);
//   - config.go: Config, its flags and validation, and the policy types
//     Handoff, OnKVTimeout and LB (UpstreamClient is legclient.go's);
//   - urls.go: backend URL normalising, URL redaction, host:port checks;
//   - request.go: request intake (incoming: body read under
//     --client-read-timeout and --max-body-bytes, request id, the legs'
//     header lines) and the validated P/D body (requestBody);
//   - prompt.go: the linear prompt and messages checks;
//   - jsonscan.go: the top-level JSON walk requests and answers are read
//     and rewritten with (no decoding of prompts, messages or answers);
//   - legbody.go: each leg's body and kv_transfer_params, and the
//     aggregated body's scrub of router-only keys;
//   - pool.go: backends and their pools; selector.go: backend selection
//     (--lb: round-robin, power of two choices, kv), one type per policy;
//   - kvroute.go: --lb kv's per-request route (tokens, hashes, the
//     engines' lookups, the P/D bypass verdict); kvindex.go: KVIndex,
//     the interface to the engines, which engine serves which backend
//     (--kv-engine, --kv-engine-port) and the parallel bounded lookups;
//     kvhash.go: the one seam to vLLM's block hashes (internal/vllmhash);
//     kvmemo.go: the bounded memo of recent prompts' block hashes;
//     tokenize.go: the prompt's token ids (given, or a backend's POST
//     /tokenize) and the fallback reasons;
//   - discovery.go: dns://name:port backends, re-resolved every
//     --resolve-interval (Resolver; each address a backend);
//   - health.go: active GET /health polling and passive health;
//   - retry.go: the one retry loop every leg runs under (attempt limit,
//     retryable verdict, capped jittered backoff; internal/retry);
//   - leg.go: the legs: prefill, answer (decode or aggregated), /v1/models;
//   - legclient.go: the legs' HTTP client (--upstream-client): upstream/
//     (its own package: the HTTP/1.1 client, connections kept per
//     backend) or net/http;
//   - legclock.go: the answer leg's limits (--decode-timeout,
//     --first-byte-timeout, --idle-stream-timeout) on one timer;
//   - handoff.go: transfers, /kv_ready reports and the KV-ready wait
//     (awaitKV, --handoff callback, --on-kv-timeout);
//   - relay.go: the SSE relay, one complete event at a time;
//   - buffered.go: the budget of answer bytes held (non-streaming and
//     P's answers), 503 beyond --max-buffered-bytes;
//   - clientwrite.go: the deadline on every write to a client;
//   - errors.go: attemptError, which carries a backend's answer to the
//     client, the router's deadline errors and the client's error answers;
//   - metrics.go: the router's Prometheus series, resolved once;
//   - labels.go: roles, modes and outcomes (metric labels).
//
// Every wait has a deadline. A leg is retried on another backend only
// while nothing reached the client; afterwards a failure ends the stream
// with an OpenAI error event and data: [DONE], never a silent truncation.
// A client disconnect cancels both legs and releases the transfer in the
// engine.
package router

import (
	"context"
	"crypto/subtle"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/labstack/echo/v4"
	"github.com/prometheus/client_golang/prometheus"
)

// The completion endpoints, on the router and on every backend.
const (
	pathCompletions     = "/v1/completions"
	pathChatCompletions = "/v1/chat/completions"
)

// Deps are the router's collaborators.
type Deps struct {
	Logger     *slog.Logger
	Registerer prometheus.Registerer // nil: metrics are kept but not exported
	KVReady    KVReadySource         // nil: only /kv_ready reports count
	Resolver   Resolver              // dns:// backends; nil: net.DefaultResolver
	// KVIndex answers the engines' lookups for --lb kv (nil: --lb kv is
	// refused at New).
	KVIndex KVIndex
}

// Router proxies OpenAI requests to P/D or aggregated backends. It is safe
// for concurrent use; all its fields are set by New.
type Router struct {
	cfg     Config
	log     *slog.Logger
	kv      KVReadySource
	kvs     *kvState // --lb kv, else nil
	m       *metrics
	prefill *pool // P/D mode, else nil
	decode  *pool // P/D mode, else nil
	agg     *pool // aggregated mode, else nil
	// The legs' backends and retries (retry.go): prefill (P/D only), the
	// answer leg and GET /v1/models, on the answer leg's pool.
	prefillLeg legPolicy
	answer     answerLeg
	models     legPolicy
	transfers  *transfers
	budget     *answerBudget // answer bytes held (buffered.go)
	legs       legClient     // the legs (send), --upstream-client
	client     *http.Client  // GET /v1/models
	checker    *healthChecker
	resolver   Resolver
	readyURL   string

	// Causes of the router's own deadlines, so a client reads which
	// limit was hit instead of "context deadline exceeded".
	errPrefillTimeout, errFirstByteTimeout, errIdleTimeout, errDecodeTimeout error
}

// New builds a router from a Config that passes Validate.
func New(cfg Config, deps Deps) (*Router, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	log := deps.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	mode := modePD
	if cfg.Aggregated() {
		mode = modeAggregated
	}
	var kvs *kvState
	if cfg.LB == LBKV {
		var err error
		if kvs, err = newKVState(cfg, deps.KVIndex); err != nil {
			return nil, err
		}
	}
	m, err := newMetrics(deps.Registerer, mode, kvs != nil)
	if err != nil {
		return nil, fmt.Errorf("router metrics: %w", err)
	}
	// The legs go through upstream (the hot path: a few allocations per
	// leg where http.Transport takes ~40) or, with --upstream-client
	// nethttp, net/http; health polls and /v1/models through net/http. Neither has a response-header timeout: every
	// leg's deadlines come from its context, which names the limit that
	// was hit. No proxy from the environment: backends are on the cluster
	// network.
	transport := &http.Transport{
		DialContext:         (&net.Dialer{Timeout: cfg.ConnectTimeout, KeepAlive: 30 * time.Second}).DialContext,
		MaxIdleConns:        256,
		MaxIdleConnsPerHost: 4,
		IdleConnTimeout:     90 * time.Second,
		DisableCompression:  true, // relay bytes as they come
	}
	r := &Router{
		cfg: cfg, log: log, kv: deps.KVReady, kvs: kvs, m: m,
		transfers: newTransfers(),
		budget:    newAnswerBudget(cfg.MaxBufferedBytes, m),
		legs:      newLegClient(cfg),
		client:    &http.Client{Transport: transport},
		readyURL:  cfg.readyURL(),

		errPrefillTimeout:   deadlineErrorf("no prefill answer within %s (--prefill-timeout)", cfg.PrefillTimeout),
		errFirstByteTimeout: deadlineErrorf("no first event within %s (--first-byte-timeout)", cfg.FirstByteTimeout),
		errIdleTimeout:      deadlineErrorf("stream stalled for %s (--idle-stream-timeout)", cfg.IdleStreamTimeout),
		errDecodeTimeout:    deadlineErrorf("answer not complete within %s (--decode-timeout)", cfg.DecodeTimeout),
	}
	if cfg.Aggregated() {
		r.agg = newPool(roleAggregated, cfg.Backends, newSelector(cfg.LB, cfg.KVFallbackLB))
		r.answer = answerLeg{legPolicy: newLegPolicy(cfg, r.agg, cfg.DecodeAttempts)}
	} else {
		r.prefill = newPool(rolePrefill, cfg.Prefill, newSelector(cfg.LB, cfg.KVFallbackLB))
		r.decode = newPool(roleDecode, cfg.Decode, newSelector(cfg.LB, cfg.KVFallbackLB))
		r.prefillLeg = newLegPolicy(cfg, r.prefill, cfg.PrefillAttempts)
		r.answer = answerLeg{legPolicy: newLegPolicy(cfg, r.decode, cfg.DecodeAttempts), firstBytePhase: true}
	}
	if r.prefill != nil {
		r.prefillLeg.retries = m.retries.WithLabelValues(rolePrefill)
	}
	r.answer.retries = m.retries.WithLabelValues(r.answer.pool.role)
	r.models = r.answer.legPolicy
	r.models.probe = true
	r.resolver = deps.Resolver
	if r.resolver == nil {
		r.resolver = net.DefaultResolver
	}
	for _, p := range r.pools() {
		p.attach, p.detach = r.attach, m.detach
		for _, b := range p.backends() {
			r.attach(b)
		}
		for _, t := range p.targets {
			t.errors = m.resolveErrors.WithLabelValues(t.name)
		}
	}
	r.checker = &healthChecker{
		client: &http.Client{Transport: transport}, backends: r.allBackends,
		interval: cfg.HealthInterval, timeout: cfg.HealthTimeout,
		onChange: func(b *backend, ok bool) {
			r.log.Info("backend health changed", "role", b.role, "backend", b.name, "healthy", ok)
			r.setHealthGauge(b)
		},
	}
	return r, nil
}

// attach readies a backend that joined a pool, before it is published:
// its metric series and the engine serving it.
func (r *Router) attach(b *backend) {
	r.m.attach(b)
	if r.kvs != nil {
		b.kvEngine, b.kvKnown = r.kvs.engines.engineFor(b.base)
	}
}

// allBackends are the current members of every pool.
func (r *Router) allBackends() []*backend {
	var all []*backend
	for _, p := range r.pools() {
		all = append(all, p.backends()...)
	}
	return all
}

// pools are the backend pools of the router's mode.
func (r *Router) pools() []*pool {
	if r.agg != nil {
		return []*pool{r.agg}
	}
	return []*pool{r.prefill, r.decode}
}

// Register mounts the OpenAI endpoints (and /kv_ready in P/D mode, unless
// it has its own address) on e, and gives every write of every route on e
// the client write deadline (writeDeadlines: a deadline is the
// connection's, so it cannot be the router routes' alone).
func (r *Router) Register(e *echo.Echo) {
	e.Use(r.writeDeadlines)
	e.POST(pathCompletions, r.auth(r.handleCompletion(pathCompletions, false)))
	e.POST(pathChatCompletions, r.auth(r.handleCompletion(pathChatCompletions, true)))
	e.GET("/v1/models", r.auth(r.handleModels))
	if r.cfg.InternalAddr == "" && r.agg == nil {
		e.POST("/kv_ready", r.handleKVReady)
	}
}

// InternalHandler serves /kv_ready alone, for --kv-ready-addr.
func (r *Router) InternalHandler() http.Handler {
	e := echo.New()
	e.HideBanner, e.HidePort = true, true
	e.Use(r.writeDeadlines)
	e.POST("/kv_ready", r.handleKVReady)
	return e
}

// Healthy is true when every role has a selectable backend (one P and one
// D, or one aggregated backend). detail maps role -> backend -> selectable.
func (r *Router) Healthy() (bool, map[string]any) {
	detail := map[string]any{}
	ok := true
	now := time.Now()
	for _, p := range r.pools() {
		states := map[string]bool{}
		for _, b := range p.backends() {
			states[b.name] = b.healthy(now)
		}
		detail[p.role] = states
		if p.healthyCount() == 0 {
			ok = false
		}
	}
	return ok, detail
}

// Run polls backend health and re-resolves dns:// backends until ctx
// ends. Until a dns:// target first resolves, its pool holds only its
// static backends (none: 503, and /health says so).
func (r *Router) Run(ctx context.Context) error {
	done := make(chan struct{})
	go func() {
		defer close(done)
		r.discover(ctx)
	}()
	r.checker.run(ctx)
	<-done
	return nil
}

// Close releases idle backend connections.
func (r *Router) Close() error {
	r.legs.closeIdle()
	r.client.CloseIdleConnections()
	r.checker.client.CloseIdleConnections()
	return nil
}

func (r *Router) auth(next echo.HandlerFunc) echo.HandlerFunc {
	if r.cfg.APIKey == "" {
		return next
	}
	want := "Bearer " + r.cfg.APIKey
	return func(c echo.Context) error {
		if !constantTimeEqual(c.Request().Header.Get("Authorization"), want) {
			r.m.count(outcomeRejected)
			return apiError(c, http.StatusUnauthorized, "authentication_error", "missing or invalid API key")
		}
		return next(c)
	}
}

// constantTimeEqual compares secrets without leaking their common prefix.
func constantTimeEqual(a, b string) bool {
	return subtle.ConstantTimeCompare([]byte(a), []byte(b)) == 1
}

func (r *Router) handleCompletion(path string, chat bool) echo.HandlerFunc {
	return func(c echo.Context) error {
		in, err := r.readRequest(c, path, chat)
		if in == nil {
			r.m.count(outcomeRejected)
			return err
		}
		var outcome string
		if r.agg != nil {
			rt := r.kvRoute(c.Request().Context(), in, in.aggBody)
			r.m.observe(phaseRouting, time.Since(in.start).Seconds())
			outcome, err = r.runAnswer(c, in, in.aggBody, rt)
		} else {
			outcome, err = r.servePD(c, in)
		}
		// Counted after every cleanup (transfer released, legs closed), so
		// the counter never runs ahead of the state it reports.
		r.m.count(outcome)
		if outcome == outcomeOK {
			r.m.observe(phaseE2E, time.Since(in.start).Seconds())
		}
		return err
	}
}

// servePD runs the prefill leg, the KV-ready wait and the decode leg; or,
// when --lb kv finds a D whose host holds enough of the prompt
// (--pd-bypass-ratio), the decode leg alone, without kv_transfer_params:
// D's connector loads the prefix from its own host and computes the rest.
func (r *Router) servePD(c echo.Context, in *incoming) (string, error) {
	ctx := c.Request().Context()
	rt := r.kvRoute(ctx, in, in.parsed.body)
	r.m.observe(phaseRouting, time.Since(in.start).Seconds())
	if rt != nil && rt.bypass {
		body := getBuf()
		defer putBuf(body)
		in.parsed.decodeBody(body, nil)
		return r.runAnswer(c, in, body.Bytes(), rt)
	}
	t0 := time.Now()
	t, p, fromP, err := r.runPrefill(ctx, in, rt)
	r.m.observe(phasePrefill, time.Since(t0).Seconds())
	if err != nil {
		if ctx.Err() != nil {
			return outcomeCancelled, nil
		}
		return outcomeFailed, r.failLeg(c, rolePrefill, err)
	}
	defer r.dropTransfer(t)
	if rt != nil {
		rt.prefill = p
	}

	kvParams := fromP // sync: P's params pass through unchanged
	if r.cfg.Handoff == HandoffCallback {
		var outcome string
		if kvParams, outcome, err = r.awaitKV(c, in, t, p, fromP); outcome != "" {
			return outcome, err
		}
	} else if isNull(kvParams) {
		kvParams = nil
	}
	body := getBuf() // upstream.Post has written it when it returns
	defer putBuf(body)
	in.parsed.decodeBody(body, kvParams)
	return r.runAnswer(c, in, body.Bytes(), rt)
}
