// Package router is PegaFlow's OpenAI-compatible proxy in front of vLLM.
//
// In P/D mode (--prefill, --decode) each request is prefilled on a P
// backend with max_tokens=1, then, once the engine says the transfer's KV
// is sealed (in-process or by POST /kv_ready), decoded on a D backend whose
// stream is relayed to the client. In aggregated mode (--backend) each
// request goes whole to one backend: the data-parallel baseline that P/D is
// compared against, with the same retries, health and metrics.
//
// The pieces, each in its own file:
//   - config.go: Config, its flags and validation;
//   - pool.go: backends, selection (round-robin, power of two choices) and
//     passive health; health.go: active GET /health polling;
//   - retry.go: the per-leg retry policy (capped, jittered backoff) and
//     attemptError, which carries a backend's answer to the client;
//   - request.go: the validated request and each leg's body;
//   - handoff.go: transfers, /kv_ready reports and the KV-ready wait;
//   - relay.go: the SSE relay, one complete event at a time;
//   - router.go (this file): the handlers and the two legs.
//
// Every wait has a deadline. A leg is retried on another backend only
// while nothing reached the client; afterwards a failure ends the stream
// with an OpenAI error event and data: [DONE], never a silent truncation.
// A client disconnect cancels both legs and releases the transfer in the
// engine.
package router

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/labstack/echo/v4"
	"github.com/prometheus/client_golang/prometheus"
)

// roleAggregated is the role (metric label) of --backend servers.
const roleAggregated = "aggregated"

// Request outcomes (pegaflow_router_requests_total{outcome}).
const (
	outcomeOK        = "ok"
	outcomeFailed    = "failed"
	outcomeCancelled = "client_cancelled"
	outcomeRejected  = "rejected"
)

// Bounds on what the router buffers from a backend.
const (
	maxPrefillAnswer = 64 << 20  // P's JSON answer (one token plus params)
	maxAnswerBytes   = 256 << 20 // a non-streaming answer
)

// KVReadySource reports transfer readiness from an engine in this process.
type KVReadySource interface {
	// AwaitTransfer returns nil when the transfer is ready, ctx.Err() when
	// ctx ends first, any other error when the transfer failed.
	AwaitTransfer(ctx context.Context, transferID string) error
	// ReleaseTransfer drops the engine's pin on the transfer's blocks.
	ReleaseTransfer(transferID string)
}

// Deps are the router's collaborators.
type Deps struct {
	Logger     *slog.Logger
	Registerer prometheus.Registerer // nil: metrics are kept but not exported
	KVReady    KVReadySource         // nil: only /kv_ready reports count
}

// answerLeg is the leg whose answer goes to the client: decode in P/D
// mode, the whole request in aggregated mode.
type answerLeg struct {
	pool  *pool
	retry retryPolicy
	// firstBytePhase: observe decode_first_byte (P/D only; in aggregated
	// mode the first byte includes the prefill and TTFT says it all).
	firstBytePhase bool
}

// Router proxies OpenAI requests to P/D or aggregated backends. It is safe
// for concurrent use; all its fields are set by New.
type Router struct {
	cfg       Config
	log       *slog.Logger
	kv        KVReadySource
	m         *metrics
	prefill   *pool // P/D mode, else nil
	decode    *pool // P/D mode, else nil
	agg       *pool // aggregated mode, else nil
	answer    answerLeg
	prefillRP retryPolicy
	transfers *transfers
	client    *http.Client
	checker   *healthChecker
	readyURL  string

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
	m, err := newMetrics(deps.Registerer, mode)
	if err != nil {
		return nil, fmt.Errorf("router metrics: %w", err)
	}
	// No ResponseHeaderTimeout: every leg's deadlines come from its context,
	// which names the limit that was hit. No proxy from the environment:
	// backends are on the cluster network.
	transport := &http.Transport{
		DialContext:         (&net.Dialer{Timeout: cfg.ConnectTimeout, KeepAlive: 30 * time.Second}).DialContext,
		MaxIdleConns:        4096,
		MaxIdleConnsPerHost: 1024,
		IdleConnTimeout:     90 * time.Second,
		DisableCompression:  true, // relay bytes as they come
	}
	retry := func(attempts int) retryPolicy {
		return retryPolicy{attempts: attempts, backoff: cfg.RetryBackoff, backoffMax: cfg.RetryBackoffMax}
	}
	r := &Router{
		cfg: cfg, log: log, kv: deps.KVReady, m: m,
		prefillRP: retry(cfg.PrefillAttempts),
		transfers: newTransfers(),
		client:    &http.Client{Transport: transport},
		readyURL:  cfg.readyURL(),

		errPrefillTimeout:   deadlineErrorf("no prefill answer within %s (--prefill-timeout)", cfg.PrefillTimeout),
		errFirstByteTimeout: deadlineErrorf("no first event within %s (--first-byte-timeout)", cfg.FirstByteTimeout),
		errIdleTimeout:      deadlineErrorf("stream stalled for %s (--idle-stream-timeout)", cfg.IdleStreamTimeout),
		errDecodeTimeout:    deadlineErrorf("answer not complete within %s (--decode-timeout)", cfg.DecodeTimeout),
	}
	if cfg.Aggregated() {
		r.agg = newPool(roleAggregated, cfg.Backends, cfg.LB)
		r.answer = answerLeg{pool: r.agg, retry: retry(cfg.DecodeAttempts)}
	} else {
		r.prefill = newPool(rolePrefill, cfg.Prefill, cfg.LB)
		r.decode = newPool(roleDecode, cfg.Decode, cfg.LB)
		r.answer = answerLeg{pool: r.decode, retry: retry(cfg.DecodeAttempts), firstBytePhase: true}
	}
	var all []*backend
	for _, p := range r.pools() {
		for _, b := range p.backends {
			m.healthy.WithLabelValues(b.role, b.base).Set(1)
			m.inflight.WithLabelValues(b.role, b.base).Set(0)
			all = append(all, b)
		}
	}
	r.checker = &healthChecker{
		client: &http.Client{Transport: transport}, backends: all,
		interval: cfg.HealthInterval, timeout: cfg.HealthTimeout,
		onChange: func(b *backend, ok bool) {
			r.log.Info("backend health changed", "role", b.role, "backend", b.base, "healthy", ok)
			r.setHealthGauge(b)
		},
	}
	return r, nil
}

// pools are the backend pools of the router's mode.
func (r *Router) pools() []*pool {
	if r.agg != nil {
		return []*pool{r.agg}
	}
	return []*pool{r.prefill, r.decode}
}

// Register mounts the OpenAI endpoints (and /kv_ready in P/D mode, unless
// it has its own address) on e.
func (r *Router) Register(e *echo.Echo) {
	e.POST("/v1/completions", r.auth(r.handleCompletion("/v1/completions", false)))
	e.POST("/v1/chat/completions", r.auth(r.handleCompletion("/v1/chat/completions", true)))
	e.GET("/v1/models", r.auth(r.handleModels))
	if r.cfg.InternalAddr == "" && r.agg == nil {
		e.POST("/kv_ready", r.handleKVReady)
	}
}

// InternalHandler serves /kv_ready alone, for --kv-ready-addr.
func (r *Router) InternalHandler() http.Handler {
	e := echo.New()
	e.HideBanner, e.HidePort = true, true
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
		for _, b := range p.backends {
			states[b.base] = b.healthy(now)
		}
		detail[p.role] = states
		if p.healthyCount() == 0 {
			ok = false
		}
	}
	return ok, detail
}

// Run polls backend health until ctx ends.
func (r *Router) Run(ctx context.Context) error {
	r.checker.run(ctx)
	return nil
}

// Close releases idle backend connections.
func (r *Router) Close() error {
	r.client.CloseIdleConnections()
	r.checker.client.CloseIdleConnections()
	return nil
}

func (r *Router) setHealthGauge(b *backend) {
	v := 0.0
	if b.healthy(time.Now()) {
		v = 1
	}
	r.m.healthy.WithLabelValues(b.role, b.base).Set(v)
}

func (r *Router) track(b *backend, delta int64) {
	r.m.inflight.WithLabelValues(b.role, b.base).Set(float64(b.inflight.Add(delta)))
}

// passive feeds one attempt's result (nil: success) to b's passive health.
func (r *Router) passive(b *backend, aerr *attemptError) {
	ok := aerr == nil || !aerr.backendFault()
	if aerr != nil && aerr.status == http.StatusTooManyRequests {
		return // alive but shedding load: neither a failure nor a recovery
	}
	if b.report(ok, r.cfg.FailThreshold, r.cfg.Cooldown, time.Now()) {
		r.log.Warn("backend ejected", "role", b.role, "backend", b.base, "cooldown", r.cfg.Cooldown)
		r.m.ejections.WithLabelValues(b.role, b.base).Inc()
	}
	r.setHealthGauge(b)
}

// apiError writes the OpenAI error shape.
func apiError(c echo.Context, status int, typ, msg string) error {
	return c.JSON(status, map[string]any{"error": map[string]any{"message": msg, "type": typ, "code": status}})
}

func (r *Router) auth(next echo.HandlerFunc) echo.HandlerFunc {
	if r.cfg.APIKey == "" {
		return next
	}
	want := "Bearer " + r.cfg.APIKey
	return func(c echo.Context) error {
		if !constantTimeEqual(c.Request().Header.Get("Authorization"), want) {
			r.m.requests.WithLabelValues(outcomeRejected).Inc()
			return apiError(c, http.StatusUnauthorized, "authentication_error", "missing or invalid API key")
		}
		return next(c)
	}
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b) // never fails (crypto/rand panics instead)
	return hex.EncodeToString(b)
}

// clientRequest is one accepted completion request.
type clientRequest struct {
	start  time.Time
	path   string
	authz  string // client's Authorization, forwarded to both legs
	reqID  string // X-Request-Id, kept or created
	stream bool
	raw    []byte         // the body as received (aggregated mode)
	req    *openAIRequest // the parsed body (P/D mode)
}

// readRequest reads and validates a completion request, answering the
// client itself (400/413) when it is rejected.
func (r *Router) readRequest(c echo.Context, path string, chat bool) (*clientRequest, error) {
	rq := &clientRequest{start: time.Now(), path: path}
	hr := c.Request()
	body, err := io.ReadAll(http.MaxBytesReader(c.Response(), hr.Body, r.cfg.MaxBodyBytes))
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			return nil, apiError(c, http.StatusRequestEntityTooLarge, "invalid_request_error",
				fmt.Sprintf("request body exceeds %d bytes (--max-body-bytes)", r.cfg.MaxBodyBytes))
		}
		return nil, apiError(c, http.StatusBadRequest, "invalid_request_error", "could not read request body: "+err.Error())
	}
	if r.agg != nil {
		rq.raw = body
		rq.stream, err = parseAggregated(body)
	} else {
		rq.req, err = parseRequest(body, chat)
		if err == nil {
			rq.stream = rq.req.stream
		}
	}
	if err != nil {
		return nil, apiError(c, http.StatusBadRequest, "invalid_request_error", err.Error())
	}
	rq.authz = hr.Header.Get("Authorization")
	rq.reqID = hr.Header.Get("X-Request-Id")
	if rq.reqID == "" {
		rq.reqID = randomHex(16)
	}
	c.Response().Header().Set("X-Request-Id", rq.reqID)
	return rq, nil
}

func (r *Router) handleCompletion(path string, chat bool) echo.HandlerFunc {
	return func(c echo.Context) error {
		rq, err := r.readRequest(c, path, chat)
		if rq == nil {
			r.m.requests.WithLabelValues(outcomeRejected).Inc()
			return err
		}
		var outcome string
		if r.agg != nil {
			r.m.phase.WithLabelValues("routing").Observe(time.Since(rq.start).Seconds())
			outcome, err = r.runAnswer(c, rq, rq.raw)
		} else {
			outcome, err = r.servePD(c, rq)
		}
		// Counted after every cleanup (transfer released, legs closed), so
		// the counter never runs ahead of the state it reports.
		r.m.requests.WithLabelValues(outcome).Inc()
		if outcome == outcomeOK {
			r.m.phase.WithLabelValues("e2e").Observe(time.Since(rq.start).Seconds())
		}
		return err
	}
}

// servePD runs the prefill leg, the KV-ready wait and the decode leg.
func (r *Router) servePD(c echo.Context, rq *clientRequest) (string, error) {
	ctx := c.Request().Context()
	r.m.phase.WithLabelValues("routing").Observe(time.Since(rq.start).Seconds())
	t0 := time.Now()
	t, fromP, err := r.runPrefill(ctx, rq)
	r.m.phase.WithLabelValues("prefill").Observe(time.Since(t0).Seconds())
	if err != nil {
		if ctx.Err() != nil {
			return outcomeCancelled, nil
		}
		return outcomeFailed, r.failLeg(c, rolePrefill, err)
	}
	defer r.dropTransfer(t)

	kvParams := fromP // sync: P's params pass through unchanged
	if r.cfg.Handoff == HandoffCallback {
		t1 := time.Now()
		w := awaitTransfer(ctx, t, r.kv, r.cfg.KVReadyTimeout)
		r.m.phase.WithLabelValues("kv_ready_wait").Observe(time.Since(t1).Seconds())
		switch w.outcome {
		case waitCancelled:
			return outcomeCancelled, nil
		case waitReady:
			r.m.kvReadyWhen.WithLabelValues(w.source).Inc()
		default:
			r.m.kvTimeouts.Inc()
			r.log.Warn("transfer KV not ready", "transfer", t.id, "request_id", rq.reqID, "reason", w.reason, "policy", r.cfg.OnKVTimeout)
			if r.cfg.OnKVTimeout == OnKVTimeoutFail {
				return outcomeFailed, apiError(c, http.StatusGatewayTimeout, "timeout_error", "prefill KV was not ready: "+w.reason)
			}
			// decode-anyway: D loads what the engine has and recomputes the rest.
		}
		if kvParams, err = decodeParams(fromP, t.id); err != nil {
			return outcomeFailed, apiError(c, http.StatusBadGateway, "upstream_error", err.Error())
		}
	} else if isNull(kvParams) {
		kvParams = nil
	}
	var body bytes.Buffer // not pooled: the transport may read it after Do returns
	body.Grow(len(kvParams) + 256)
	rq.req.decodeBody(&body, kvParams)
	return r.runAnswer(c, rq, body.Bytes())
}

// dropTransfer forgets t (late reports stay idempotent) and unpins its
// blocks in the engine.
func (r *Router) dropTransfer(t *transfer) {
	r.transfers.finish(t, time.Now())
	if r.kv != nil {
		r.kv.ReleaseTransfer(t.id)
	}
}

// send POSTs body to b. It returns the response when its status is 2xx,
// else an attemptError holding the backend's answer.
func (r *Router) send(ctx context.Context, b *backend, rq *clientRequest, body []byte) (*http.Response, *attemptError) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, b.base+rq.path, bytes.NewReader(body))
	if err != nil {
		return nil, &attemptError{backend: b, err: err}
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("X-Request-Id", rq.reqID)
	if rq.authz != "" {
		req.Header.Set("Authorization", rq.authz)
	}
	resp, err := r.client.Do(req)
	if err != nil {
		return nil, &attemptError{backend: b, err: causeOf(ctx, err)}
	}
	if resp.StatusCode/100 != 2 {
		data, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		resp.Body.Close()
		return nil, &attemptError{backend: b, status: resp.StatusCode, body: data, ctype: resp.Header.Get("Content-Type")}
	}
	return resp, nil
}

// causeOf names the deadline behind err when ctx ended (the router's own
// limits carry a cause), else returns err.
func causeOf(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		if cause := context.Cause(ctx); cause != nil {
			return cause
		}
	}
	return err
}

// runPrefill sends the prefill leg, each attempt on another P with its own
// transfer, and returns the transfer of the attempt that succeeded with
// P's kv_transfer_params. A fresh transfer per attempt keeps a late save
// of a failed attempt from passing for the retry's KV.
func (r *Router) runPrefill(ctx context.Context, rq *clientRequest) (*transfer, json.RawMessage, error) {
	var triedBuf [8]*backend
	tried := triedBuf[:0]
	var last error = errNoBackend
	for attempt := 1; attempt <= r.prefillRP.attempts; attempt++ {
		if attempt > 1 {
			r.m.retries.WithLabelValues(rolePrefill).Inc()
			if err := r.prefillRP.wait(ctx, attempt-1); err != nil {
				return nil, nil, err
			}
		}
		b := r.prefill.pick(tried)
		if b == nil {
			break
		}
		tried = append(tried, b)
		t := r.transfers.register(randomHex(16), randomHex(16))
		params, aerr := r.prefillAttempt(ctx, b, rq, t)
		if aerr == nil {
			r.passive(b, nil)
			return t, params, nil
		}
		r.dropTransfer(t)
		if ctx.Err() != nil {
			return nil, nil, ctx.Err()
		}
		r.passive(b, aerr)
		if !aerr.retryable() {
			return nil, nil, aerr
		}
		r.log.Warn("prefill attempt failed", "backend", b.base, "attempt", attempt, "request_id", rq.reqID, "err", aerr)
		last = aerr
	}
	return nil, nil, last
}

func (r *Router) prefillAttempt(ctx context.Context, b *backend, rq *clientRequest, t *transfer) (json.RawMessage, *attemptError) {
	actx, cancel := context.WithTimeoutCause(ctx, r.cfg.PrefillTimeout, r.errPrefillTimeout)
	defer cancel()
	params := getBuf()
	var body bytes.Buffer // not pooled: the transport may read it after Do returns
	body.Grow(256)
	rq.req.prefillBody(&body, prefillParams(params, t.id, r.readyURL, t.token))
	putBuf(params)

	r.track(b, 1)
	defer r.track(b, -1)
	resp, aerr := r.send(actx, b, rq, body.Bytes())
	if aerr != nil {
		return nil, aerr
	}
	defer resp.Body.Close()
	var out struct {
		KV json.RawMessage `json:"kv_transfer_params"`
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, maxPrefillAnswer)).Decode(&out); err != nil {
		if actx.Err() != nil {
			return nil, &attemptError{backend: b, err: causeOf(actx, err)}
		}
		return nil, &attemptError{backend: b, err: fmt.Errorf("answer is not JSON: %w", err)}
	}
	return out.KV, nil
}

// attemptResult is how one answer-leg attempt ended.
type attemptResult struct {
	wrote     bool          // bytes reached the client: no retry any more
	clientErr error         // the client went away
	err       *attemptError // the backend failed
}

// runAnswer sends the answer leg (decode, or the whole aggregated
// request), retrying on another backend until a byte reached the client,
// and relays the answer.
func (r *Router) runAnswer(c echo.Context, rq *clientRequest, body []byte) (string, error) {
	ctx := c.Request().Context()
	leg := &r.answer
	var triedBuf [8]*backend
	tried := triedBuf[:0]
	var last error = errNoBackend
	for attempt := 1; attempt <= leg.retry.attempts; attempt++ {
		if attempt > 1 {
			r.m.retries.WithLabelValues(leg.pool.role).Inc()
			if err := leg.retry.wait(ctx, attempt-1); err != nil {
				return outcomeCancelled, nil
			}
		}
		b := leg.pool.pick(tried)
		if b == nil {
			break
		}
		tried = append(tried, b)
		res := r.answerAttempt(c, b, rq, body)
		switch {
		case res.clientErr == nil && res.err == nil:
			r.passive(b, nil)
			return outcomeOK, nil
		case res.clientErr != nil || ctx.Err() != nil:
			r.log.Debug("client went away", "request_id", rq.reqID, "backend", b.base)
			return outcomeCancelled, nil
		case res.wrote:
			r.passive(b, res.err)
			r.log.Warn("answer broke after the first byte", "role", b.role, "backend", b.base, "request_id", rq.reqID, "err", res.err)
			if rq.stream {
				writeStreamError(c, res.err)
			}
			return outcomeFailed, nil
		}
		r.passive(b, res.err)
		if !res.err.retryable() {
			return outcomeFailed, r.failLeg(c, leg.pool.role, res.err)
		}
		r.log.Warn("attempt failed", "role", b.role, "backend", b.base, "attempt", attempt, "request_id", rq.reqID, "err", res.err)
		last = res.err
	}
	return outcomeFailed, r.failLeg(c, leg.pool.role, last)
}

func (r *Router) answerAttempt(c echo.Context, b *backend, rq *clientRequest, body []byte) attemptResult {
	ctx := c.Request().Context()
	actx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	actx, cancelT := context.WithTimeoutCause(actx, r.cfg.DecodeTimeout, r.errDecodeTimeout)
	defer cancelT()
	t0 := time.Now()
	r.track(b, 1)
	defer r.track(b, -1)
	// A non-streaming answer comes whole, after the generation: only
	// --decode-timeout bounds it. A stream must show its first event
	// within --first-byte-timeout.
	var firstByte *time.Timer
	if rq.stream {
		firstByte = time.AfterFunc(r.cfg.FirstByteTimeout, func() { cancel(r.errFirstByteTimeout) })
		defer firstByte.Stop()
	}
	resp, aerr := r.send(actx, b, rq, body)
	if aerr != nil {
		return attemptResult{err: aerr}
	}
	defer resp.Body.Close()
	w := c.Response()

	if !rq.stream {
		data, err := io.ReadAll(io.LimitReader(resp.Body, maxAnswerBytes))
		if err != nil {
			return attemptResult{err: &attemptError{backend: b, err: causeOf(actx, err)}}
		}
		if r.answer.firstBytePhase {
			r.m.phase.WithLabelValues("decode_first_byte").Observe(time.Since(t0).Seconds())
		}
		ct := resp.Header.Get("Content-Type")
		if ct == "" {
			ct = echo.MIMEApplicationJSON
		}
		if err := c.Blob(resp.StatusCode, ct, data); err != nil {
			return attemptResult{wrote: true, clientErr: err}
		}
		return attemptResult{wrote: true}
	}

	idle := time.AfterFunc(r.cfg.IdleStreamTimeout, func() { cancel(r.errIdleTimeout) })
	defer idle.Stop()
	rc := http.NewResponseController(w)
	var firstTok, prevTok time.Time
	res, err := relaySSE(w, rc.Flush, resp.Body, relayHooks{
		begin: func() {
			firstByte.Stop()
			if r.answer.firstBytePhase {
				r.m.phase.WithLabelValues("decode_first_byte").Observe(time.Since(t0).Seconds())
			}
			h := w.Header()
			h.Set("Content-Type", "text/event-stream")
			h.Set("Cache-Control", "no-cache")
			h.Set("X-Accel-Buffering", "no") // no buffering in a fronting nginx
			w.WriteHeader(http.StatusOK)
		},
		afterRead: func(int) { idle.Reset(r.cfg.IdleStreamTimeout) },
		onEvent: func(kind eventKind, at time.Time) {
			if kind != eventToken {
				return
			}
			if firstTok.IsZero() {
				firstTok = at
				r.m.phase.WithLabelValues("ttft").Observe(at.Sub(rq.start).Seconds())
			} else {
				r.m.phase.WithLabelValues("itl").Observe(at.Sub(prevTok).Seconds())
			}
			prevTok = at
		},
	})
	if res.tokens > 1 {
		r.m.phase.WithLabelValues("tpot").Observe(prevTok.Sub(firstTok).Seconds() / float64(res.tokens-1))
	}
	if err == nil {
		return attemptResult{wrote: res.wrote}
	}
	var cwe *clientWriteError
	if errors.As(err, &cwe) {
		return attemptResult{wrote: res.wrote, clientErr: err}
	}
	return attemptResult{wrote: res.wrote, err: &attemptError{backend: b, err: causeOf(actx, err)}}
}

// failLeg answers the client after a leg failed before any byte was sent.
func (r *Router) failLeg(c echo.Context, role string, err error) error {
	var aerr *attemptError
	switch {
	case !errors.As(err, &aerr):
		if errors.Is(err, errNoBackend) {
			return apiError(c, http.StatusServiceUnavailable, "service_unavailable", fmt.Sprintf("no healthy %s backend", role))
		}
		return apiError(c, http.StatusBadGateway, "upstream_error", fmt.Sprintf("%s leg failed: %v", role, err))
	case aerr.status != 0 && (!aerr.retryable() || aerr.status == http.StatusTooManyRequests):
		// The backend's own 4xx (and a 429 left after the retries) goes back
		// unchanged: it is about this request, or tells the client to slow down.
		ct := aerr.ctype
		if ct == "" {
			ct = echo.MIMEApplicationJSON
		}
		return c.Blob(aerr.status, ct, aerr.body)
	case aerr.status == 0 && isTimeout(aerr.err):
		return apiError(c, http.StatusGatewayTimeout, "timeout_error", aerr.Error())
	}
	return apiError(c, http.StatusBadGateway, "upstream_error", aerr.Error())
}

// deadlineError is one of the router's own limits, worded for the client.
// It is a timeout (net.Error style) and matches context.DeadlineExceeded.
type deadlineError struct{ msg string }

func deadlineErrorf(format string, a ...any) error {
	return &deadlineError{fmt.Sprintf(format, a...)}
}

func (e *deadlineError) Error() string        { return e.msg }
func (e *deadlineError) Timeout() bool        { return true }
func (e *deadlineError) Is(target error) bool { return target == context.DeadlineExceeded }

// isTimeout: one of the router's deadlines or a dial/transport timeout.
func isTimeout(err error) bool {
	if errors.Is(err, context.DeadlineExceeded) {
		return true
	}
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// writeStreamError ends a stream that broke after its first byte: an
// OpenAI error event, then [DONE] so SDKs stop reading cleanly.
func writeStreamError(c echo.Context, err error) {
	payload, _ := json.Marshal(map[string]any{"error": map[string]any{
		"message": "stream interrupted: " + err.Error(), "type": "upstream_error", "code": http.StatusBadGateway}})
	w := c.Response()
	_, _ = fmt.Fprintf(w, "data: %s\n\ndata: [DONE]\n\n", payload)
	_ = http.NewResponseController(w).Flush()
}

// handleModels answers GET /v1/models from a decode (or aggregated)
// backend: the ones that serve the client's tokens.
func (r *Router) handleModels(c echo.Context) error {
	p := r.answer.pool
	var triedBuf [8]*backend
	tried := triedBuf[:0]
	var last error = errNoBackend
	for {
		b := p.pick(tried)
		if b == nil {
			break
		}
		tried = append(tried, b)
		data, ctype, aerr := r.getModels(c, b)
		if aerr == nil {
			return c.Blob(http.StatusOK, ctype, data)
		}
		if c.Request().Context().Err() != nil {
			return nil
		}
		r.passive(b, aerr)
		if !aerr.retryable() {
			return r.failLeg(c, p.role, aerr)
		}
		last = aerr
	}
	return r.failLeg(c, p.role, last)
}

func (r *Router) getModels(c echo.Context, b *backend) ([]byte, string, *attemptError) {
	ctx, cancel := context.WithTimeout(c.Request().Context(), r.cfg.ConnectTimeout+r.cfg.HealthTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, b.base+"/v1/models", nil)
	if err != nil {
		return nil, "", &attemptError{backend: b, err: err}
	}
	if a := c.Request().Header.Get("Authorization"); a != "" {
		req.Header.Set("Authorization", a)
	}
	resp, err := r.client.Do(req)
	if err != nil {
		return nil, "", &attemptError{backend: b, err: err}
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return nil, "", &attemptError{backend: b, err: err}
	}
	ct := resp.Header.Get("Content-Type")
	if resp.StatusCode != http.StatusOK {
		return nil, "", &attemptError{backend: b, status: resp.StatusCode, body: data, ctype: ct}
	}
	if ct == "" {
		ct = echo.MIMEApplicationJSON
	}
	return data, ct, nil
}

type kvReadyReport struct {
	TransferID string `json:"transfer_id"`
	Token      string `json:"token"`
	Status     string `json:"status"`
	Message    string `json:"message"`
}

func (r *Router) handleKVReady(c echo.Context) error {
	var rep kvReadyReport
	body := http.MaxBytesReader(c.Response(), c.Request().Body, 64<<10)
	if err := json.NewDecoder(body).Decode(&rep); err != nil || rep.TransferID == "" || rep.Token == "" ||
		(rep.Status != "ready" && rep.Status != "failed") {
		r.m.kvRejected.WithLabelValues("bad_request").Inc()
		return apiError(c, http.StatusBadRequest, "invalid_request_error", `want {"transfer_id", "token", "status": "ready"|"failed"}`)
	}
	switch r.transfers.report(rep.TransferID, rep.Token, rep.Status == "ready", rep.Message, time.Now()) {
	case reportUnknown:
		r.m.kvRejected.WithLabelValues("unknown_transfer").Inc()
		return apiError(c, http.StatusNotFound, "not_found_error", "unknown transfer id")
	case reportBadToken:
		r.m.kvRejected.WithLabelValues("bad_token").Inc()
		return apiError(c, http.StatusForbidden, "permission_error", "wrong token for transfer")
	}
	return c.JSON(http.StatusOK, map[string]bool{"ok": true})
}
