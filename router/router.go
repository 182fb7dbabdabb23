// Package router is PegaFlow's OpenAI-compatible P/D proxy. Each request is
// prefilled on a P backend with max_tokens=1, then — once the engine says
// the transfer's KV is sealed (in-process or by POST /kv_ready) — decoded on
// a D backend whose stream is relayed to the client.
//
// Pieces: upstream pools with selection and health (upstream.go), the
// KV-ready waiters (handoff.go), the two legs with retries and the SSE relay
// (this file). Every wait has a deadline; a client disconnect cancels both
// legs and releases the transfer in the engine.
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
	"maps"
	"net"
	"net/http"
	"time"

	"github.com/labstack/echo/v4"
	"github.com/prometheus/client_golang/prometheus"
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
	Registerer prometheus.Registerer
	KVReady    KVReadySource // nil: only /kv_ready reports count
}

// Router proxies OpenAI requests across P and D backends.
type Router struct {
	cfg      Config
	log      *slog.Logger
	kv       KVReadySource
	m        *metrics
	prefill  *pool
	decode   *pool
	waiters  *waiters
	client   *http.Client // backend legs; deadlines come from contexts
	health   *http.Client
	readyURL string
}

// New builds a router; cfg must have passed Validate.
func New(cfg Config, deps Deps) (*Router, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	log := deps.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	m, err := newMetrics(deps.Registerer)
	if err != nil {
		return nil, err
	}
	transport := &http.Transport{
		DialContext:           (&net.Dialer{Timeout: cfg.ConnectTimeout, KeepAlive: 30 * time.Second}).DialContext,
		MaxIdleConns:          4096,
		MaxIdleConnsPerHost:   1024,
		IdleConnTimeout:       90 * time.Second,
		ResponseHeaderTimeout: max(cfg.FirstByteTimeout, cfg.PrefillTimeout),
		DisableCompression:    true, // relay bytes as they come
	}
	r := &Router{
		cfg: cfg, log: log, kv: deps.KVReady, m: m,
		prefill: newPool("prefill", cfg.Prefill, cfg.LB),
		decode:  newPool("decode", cfg.Decode, cfg.LB),
		waiters: newWaiters(),
		client:  &http.Client{Transport: transport},
		health:  &http.Client{Transport: transport},
	}
	r.readyURL = cfg.readyURL()
	for _, p := range []*pool{r.prefill, r.decode} {
		for _, b := range p.backends {
			m.healthy.WithLabelValues(b.role, b.base).Set(1)
			m.inflight.WithLabelValues(b.role, b.base).Set(0)
		}
	}
	return r, nil
}

// Register mounts the OpenAI endpoints (and /kv_ready unless it has its own
// address) on e.
func (r *Router) Register(e *echo.Echo) {
	e.POST("/v1/completions", r.auth(r.handleCompletion(false)))
	e.POST("/v1/chat/completions", r.auth(r.handleCompletion(true)))
	e.GET("/v1/models", r.auth(r.handleModels))
	if r.cfg.InternalAddr == "" {
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

// Healthy is true when at least one P and one D are selectable.
func (r *Router) Healthy() (bool, map[string]any) {
	detail := map[string]any{}
	for _, p := range []*pool{r.prefill, r.decode} {
		now := time.Now()
		states := map[string]bool{}
		for _, b := range p.backends {
			states[b.base] = b.healthy(now)
		}
		detail[p.role] = states
	}
	ok := r.prefill.anyHealthy() && r.decode.anyHealthy()
	return ok, detail
}

// Run polls backend health until ctx ends.
func (r *Router) Run(ctx context.Context) error {
	pollHealth(ctx, r.health, []*pool{r.prefill, r.decode}, r.cfg.HealthInterval, r.cfg.HealthTimeout, func(b *backend, ok bool) {
		r.log.Info("backend health changed", "role", b.role, "backend", b.base, "healthy", ok)
		r.setHealthGauge(b)
	})
	return nil
}

// Close releases idle connections.
func (r *Router) Close() error {
	r.client.CloseIdleConnections()
	return nil
}

func (r *Router) setHealthGauge(b *backend) {
	v := 0.0
	if b.healthy(time.Now()) {
		v = 1
	}
	r.m.healthy.WithLabelValues(b.role, b.base).Set(v)
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
		if c.Request().Header.Get("Authorization") != want {
			r.m.requests.WithLabelValues("rejected").Inc()
			return apiError(c, http.StatusUnauthorized, "authentication_error", "missing or invalid API key")
		}
		return next(c)
	}
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// parseRequest reads and validates an OpenAI request body.
func (r *Router) parseRequest(c echo.Context, chat bool) (map[string]any, error) {
	body, err := io.ReadAll(http.MaxBytesReader(c.Response(), c.Request().Body, r.cfg.MaxBodyBytes))
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			return nil, apiError(c, http.StatusRequestEntityTooLarge, "invalid_request_error",
				fmt.Sprintf("request body exceeds %d bytes", r.cfg.MaxBodyBytes))
		}
		return nil, apiError(c, http.StatusBadRequest, "invalid_request_error", "could not read request body")
	}
	var req map[string]any
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.UseNumber()
	if err := dec.Decode(&req); err != nil || req == nil {
		return nil, apiError(c, http.StatusBadRequest, "invalid_request_error", "request body must be a JSON object")
	}
	if m, ok := req["model"].(string); !ok || m == "" {
		return nil, apiError(c, http.StatusBadRequest, "invalid_request_error", "'model' is required")
	}
	if chat {
		msgs, ok := req["messages"].([]any)
		if !ok || len(msgs) == 0 {
			return nil, apiError(c, http.StatusBadRequest, "invalid_request_error", "'messages' must be a non-empty array")
		}
	} else {
		switch p := req["prompt"].(type) {
		case string:
		case []any:
			// A list of token ids is one prompt; a list of prompts is a batch.
			if len(p) == 0 {
				return nil, apiError(c, http.StatusBadRequest, "invalid_request_error", "'prompt' is empty")
			}
			for _, x := range p {
				if _, isNum := x.(json.Number); !isNum {
					if len(p) > 1 {
						return nil, apiError(c, http.StatusBadRequest, "invalid_request_error", "batched prompts are not supported by the P/D router: send one prompt per request")
					}
				}
			}
		default:
			return nil, apiError(c, http.StatusBadRequest, "invalid_request_error", "'prompt' is required (string or token ids)")
		}
	}
	if n, ok := req["n"].(json.Number); ok && n.String() != "1" {
		return nil, apiError(c, http.StatusBadRequest, "invalid_request_error", "n > 1 is not supported by the P/D router")
	}
	return req, nil
}

// legError is a failed attempt on a backend.
type legError struct {
	status    int    // 0 for transport errors
	body      []byte // backend's answer for status errors
	header    http.Header
	err       error
	retryable bool
}

func (e *legError) Error() string {
	if e.status != 0 {
		return fmt.Sprintf("backend status %d", e.status)
	}
	return e.err.Error()
}

func retryableStatus(code int) bool { return code >= 500 || code == http.StatusTooManyRequests }

// send POSTs body to b and returns the response when its status is 2xx.
func (r *Router) send(ctx context.Context, b *backend, path string, body []byte, hdr http.Header) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, b.base+path, bytes.NewReader(body))
	if err != nil {
		return nil, &legError{err: err}
	}
	req.Header.Set("Content-Type", "application/json")
	for _, k := range []string{"Authorization", "X-Request-Id"} {
		if v := hdr.Get(k); v != "" {
			req.Header.Set(k, v)
		}
	}
	resp, err := r.client.Do(req)
	if err != nil {
		return nil, &legError{err: err, retryable: ctx.Err() == nil || errors.Is(ctx.Err(), context.DeadlineExceeded)}
	}
	if resp.StatusCode/100 != 2 {
		data, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		resp.Body.Close()
		return nil, &legError{status: resp.StatusCode, body: data, header: resp.Header, retryable: retryableStatus(resp.StatusCode)}
	}
	return resp, nil
}

func (r *Router) track(b *backend, delta int64) {
	r.m.inflight.WithLabelValues(b.role, b.base).Set(float64(b.inflight.Add(delta)))
}

func (r *Router) mark(b *backend, ok bool) {
	if b.markResult(ok, r.cfg.FailThreshold, r.cfg.Cooldown, time.Now()) {
		r.log.Warn("backend ejected", "role", b.role, "backend", b.base, "cooldown", r.cfg.Cooldown)
		r.m.ejections.WithLabelValues(b.role, b.base).Inc()
	}
	r.setHealthGauge(b)
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// runPrefill sends the prefill leg with retries across P backends and
// returns P's JSON answer.
func (r *Router) runPrefill(ctx context.Context, path string, body []byte, hdr http.Header) (map[string]any, error) {
	tried := map[*backend]bool{}
	var last error = errNoBackend
	for attempt := 0; attempt < r.cfg.PrefillAttempts; attempt++ {
		if attempt > 0 {
			r.m.retries.WithLabelValues("prefill").Inc()
			if err := sleepCtx(ctx, r.cfg.RetryBackoff<<(attempt-1)); err != nil {
				return nil, err
			}
		}
		b := r.prefill.pick(tried)
		if b == nil {
			break
		}
		tried[b] = true
		actx, cancel := context.WithTimeout(ctx, r.cfg.PrefillTimeout)
		r.track(b, 1)
		resp, err := r.send(actx, b, path, body, hdr)
		var out map[string]any
		if err == nil {
			err = json.NewDecoder(io.LimitReader(resp.Body, 64<<20)).Decode(&out)
			resp.Body.Close()
			if err != nil {
				err = &legError{err: fmt.Errorf("prefill answer is not JSON: %w", err), retryable: true}
			}
		}
		r.track(b, -1)
		cancel()
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		var le *legError
		if err == nil {
			r.mark(b, true)
			return out, nil
		}
		last = err
		if errors.As(err, &le) && !le.retryable {
			r.mark(b, true) // a 4xx is the request's fault, not the backend's
			return nil, err
		}
		r.mark(b, false)
		r.log.Warn("prefill attempt failed", "backend", b.base, "attempt", attempt+1, "err", err)
	}
	return nil, last
}

var errNoBackend = errors.New("no healthy backend")

// awaitReady waits for the transfer: /kv_ready or the in-process engine,
// whichever reports first, bounded by KVReadyTimeout.
func (r *Router) awaitReady(ctx context.Context, id string, wt *waiter) (ready bool, why string) {
	wctx, cancel := context.WithTimeout(ctx, r.cfg.KVReadyTimeout)
	defer cancel()
	engineDone := make(chan error, 1)
	if r.kv != nil {
		go func() { engineDone <- r.kv.AwaitTransfer(wctx, id) }()
	}
	select {
	case sig := <-wt.ch:
		if sig.ready {
			r.m.kvReadyWhen.WithLabelValues("callback").Inc()
			return true, ""
		}
		return false, "transfer failed: " + sig.message
	case err := <-engineDone:
		if err == nil {
			r.m.kvReadyWhen.WithLabelValues("engine").Inc()
			return true, ""
		}
		if wctx.Err() != nil {
			return false, "timed out"
		}
		return false, "transfer failed: " + err.Error()
	case <-wctx.Done():
		return false, "timed out"
	}
}

func (r *Router) handleCompletion(chat bool) echo.HandlerFunc {
	path := "/v1/completions"
	if chat {
		path = "/v1/chat/completions"
	}
	return func(c echo.Context) error {
		start := time.Now()
		ctx := c.Request().Context()
		req, perr := r.parseRequest(c, chat)
		if req == nil {
			r.m.requests.WithLabelValues("rejected").Inc()
			return perr
		}
		hdr := c.Request().Header.Clone()
		if hdr.Get("X-Request-Id") == "" {
			hdr.Set("X-Request-Id", randomHex(16))
		}
		c.Response().Header().Set("X-Request-Id", hdr.Get("X-Request-Id"))
		stream, _ := req["stream"].(bool)
		transferID, token := randomHex(16), randomHex(16)
		ours := map[string]any{"pegaflow_transfer_id": transferID}

		// Prefill leg.
		pre := maps.Clone(req)
		pre["max_tokens"] = 1
		if _, ok := pre["max_completion_tokens"]; ok {
			pre["max_completion_tokens"] = 1
		}
		pre["stream"] = false
		delete(pre, "stream_options")
		kvp := map[string]any{"do_remote_decode": true, "do_remote_prefill": false,
			"pegaflow_transfer_id": transferID, "pegaflow_ready_url": r.readyURL, "pegaflow_ready_token": token}
		pre["kv_transfer_params"] = kvp
		preBody, _ := json.Marshal(pre)
		wt := r.waiters.add(transferID, token)
		defer r.waiters.remove(transferID)
		released := false
		release := func() {
			if !released && r.kv != nil {
				released = true
				r.kv.ReleaseTransfer(transferID)
			}
		}
		r.m.phase.WithLabelValues("routing").Observe(time.Since(start).Seconds())

		t0 := time.Now()
		preResp, err := r.runPrefill(ctx, path, preBody, hdr.Clone())
		r.m.phase.WithLabelValues("prefill").Observe(time.Since(t0).Seconds())
		if err != nil {
			release()
			return r.failLeg(c, ctx, "prefill", err)
		}
		decodeParams := map[string]any{}
		if p, ok := preResp["kv_transfer_params"].(map[string]any); ok {
			decodeParams = p
		}
		if r.cfg.Handoff == HandoffCallback {
			t1 := time.Now()
			ready, why := r.awaitReady(ctx, transferID, wt)
			r.m.phase.WithLabelValues("kv_ready_wait").Observe(time.Since(t1).Seconds())
			if ctx.Err() != nil {
				release()
				r.m.requests.WithLabelValues("client_cancelled").Inc()
				return nil
			}
			if !ready {
				r.m.kvTimeouts.Inc()
				r.log.Warn("kv not ready", "transfer", transferID, "reason", why, "policy", r.cfg.OnKVTimeout)
				if r.cfg.OnKVTimeout == OnTimeoutFail {
					release()
					r.m.requests.WithLabelValues("failed").Inc()
					return apiError(c, http.StatusGatewayTimeout, "timeout_error", "prefill KV was not ready: "+why)
				}
			}
			maps.Copy(decodeParams, ours)
			decodeParams["do_remote_prefill"] = true
			decodeParams["do_remote_decode"] = false
		}
		dec := maps.Clone(req)
		dec["kv_transfer_params"] = decodeParams
		decBody, _ := json.Marshal(dec)
		err = r.runDecode(c, ctx, path, decBody, hdr, stream, start)
		release()
		return err
	}
}

// failLeg answers the client after a leg failed before any byte was sent.
func (r *Router) failLeg(c echo.Context, ctx context.Context, leg string, err error) error {
	if ctx.Err() != nil {
		r.m.requests.WithLabelValues("client_cancelled").Inc()
		return nil
	}
	r.m.requests.WithLabelValues("failed").Inc()
	var le *legError
	switch {
	case errors.As(err, &le) && le.status != 0 && !le.retryable:
		// A backend's 4xx goes back unchanged.
		ct := le.header.Get("Content-Type")
		if ct == "" {
			ct = "application/json"
		}
		return c.Blob(le.status, ct, le.body)
	case errors.Is(err, errNoBackend):
		return apiError(c, http.StatusServiceUnavailable, "service_unavailable", fmt.Sprintf("no healthy %s backend", leg))
	case errors.As(err, &le) && le.status != 0:
		return apiError(c, http.StatusBadGateway, "upstream_error", fmt.Sprintf("%s backend answered %d", leg, le.status))
	}
	return apiError(c, http.StatusBadGateway, "upstream_error", fmt.Sprintf("%s failed: %v", leg, err))
}

// runDecode sends the decode leg, retrying on another D until the first
// byte reaches the client, and relays the answer.
func (r *Router) runDecode(c echo.Context, ctx context.Context, path string, body []byte, hdr http.Header, stream bool, start time.Time) error {
	tried := map[*backend]bool{}
	var last error = errNoBackend
	for attempt := 0; attempt < r.cfg.DecodeAttempts; attempt++ {
		if attempt > 0 {
			r.m.retries.WithLabelValues("decode").Inc()
			if err := sleepCtx(ctx, r.cfg.RetryBackoff<<(attempt-1)); err != nil {
				break
			}
		}
		b := r.decode.pick(tried)
		if b == nil {
			break
		}
		tried[b] = true
		t0 := time.Now()
		lctx, cancel := context.WithCancel(ctx)
		r.track(b, 1)
		resp, err := r.send(lctx, b, path, body, hdr)
		if err != nil {
			r.track(b, -1)
			cancel()
			last = err
			var le *legError
			if errors.As(err, &le) && !le.retryable {
				r.mark(b, true)
				break
			}
			r.mark(b, false)
			r.log.Warn("decode attempt failed", "backend", b.base, "attempt", attempt+1, "err", err)
			continue
		}
		r.m.phase.WithLabelValues("decode_first_byte").Observe(time.Since(t0).Seconds())
		sent, rerr := r.relay(c, lctx, cancel, resp, stream, start)
		resp.Body.Close()
		r.track(b, -1)
		cancel()
		if rerr == nil {
			r.mark(b, true)
			r.m.requests.WithLabelValues("ok").Inc()
			r.m.phase.WithLabelValues("e2e").Observe(time.Since(start).Seconds())
			return nil
		}
		if ctx.Err() != nil {
			r.m.requests.WithLabelValues("client_cancelled").Inc()
			return nil
		}
		r.mark(b, false)
		if sent {
			// Bytes already reached the client: end the stream loudly.
			r.m.requests.WithLabelValues("failed").Inc()
			r.log.Warn("decode stream broke after first byte", "backend", b.base, "err", rerr)
			if stream {
				writeStreamError(c, rerr)
			}
			return nil
		}
		last = &legError{err: rerr, retryable: true}
	}
	return r.failLeg(c, ctx, "decode", last)
}

func writeStreamError(c echo.Context, err error) {
	payload, _ := json.Marshal(map[string]any{"error": map[string]any{
		"message": "decode stream interrupted: " + err.Error(), "type": "upstream_error", "code": http.StatusBadGateway}})
	w := c.Response()
	fmt.Fprintf(w, "data: %s\n\ndata: [DONE]\n\n", payload)
	w.Flush()
}

// relay copies D's answer to the client. For streams it flushes per SSE
// event, enforces the idle timeout, and records TTFT/ITL/TPOT. It reports
// whether any byte was sent to the client.
func (r *Router) relay(c echo.Context, ctx context.Context, cancel context.CancelFunc, resp *http.Response, stream bool, start time.Time) (bool, error) {
	w := c.Response()
	if !stream {
		data, err := io.ReadAll(io.LimitReader(resp.Body, 256<<20))
		if err != nil {
			return false, err
		}
		ct := resp.Header.Get("Content-Type")
		if ct == "" {
			ct = "application/json"
		}
		return true, c.Blob(resp.StatusCode, ct, data)
	}
	// The idle timer cancels the leg when D stalls between reads.
	idle := time.AfterFunc(r.cfg.IdleStreamTimeout, cancel)
	defer idle.Stop()
	buf := make([]byte, 32<<10)
	sent := false
	var first, prev time.Time
	events := 0
	done := false
	var pending []byte
	for {
		n, err := resp.Body.Read(buf)
		idle.Reset(r.cfg.IdleStreamTimeout)
		if n > 0 {
			if !sent {
				w.Header().Set("Content-Type", "text/event-stream")
				w.Header().Set("Cache-Control", "no-cache")
				w.WriteHeader(http.StatusOK)
				sent = true
			}
			if _, werr := w.Write(buf[:n]); werr != nil {
				return true, werr
			}
			w.Flush()
			// Count complete data events for the latency metrics.
			pending = append(pending, buf[:n]...)
			for {
				i := bytes.Index(pending, []byte("\n\n"))
				if i < 0 {
					break
				}
				ev := pending[:i]
				pending = pending[i+2:]
				if bytes.Equal(ev, []byte("data: [DONE]")) {
					done = true
					continue
				}
				if !bytes.HasPrefix(ev, []byte("data: ")) {
					continue
				}
				now := time.Now()
				if events == 0 {
					first = now
					r.m.phase.WithLabelValues("ttft").Observe(now.Sub(start).Seconds())
				} else {
					r.m.phase.WithLabelValues("itl").Observe(now.Sub(prev).Seconds())
				}
				prev = now
				events++
			}
		}
		if err == io.EOF {
			if events > 1 {
				r.m.phase.WithLabelValues("tpot").Observe(prev.Sub(first).Seconds() / float64(events-1))
			}
			if !done {
				return sent, errors.New("decode stream ended without [DONE]")
			}
			return sent, nil
		}
		if err != nil {
			if ctx.Err() != nil && !sent {
				return false, fmt.Errorf("decode stalled: %w", err)
			}
			return sent, err
		}
	}
}

func (r *Router) handleModels(c echo.Context) error {
	tried := map[*backend]bool{}
	for {
		b := r.decode.pick(tried)
		if b == nil {
			return apiError(c, http.StatusServiceUnavailable, "service_unavailable", "no healthy decode backend")
		}
		tried[b] = true
		ctx, cancel := context.WithTimeout(c.Request().Context(), r.cfg.HealthTimeout+r.cfg.ConnectTimeout)
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, b.base+"/v1/models", nil)
		if a := c.Request().Header.Get("Authorization"); a != "" {
			req.Header.Set("Authorization", a)
		}
		resp, err := r.client.Do(req)
		if err == nil {
			data, rerr := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
			resp.Body.Close()
			if rerr == nil && resp.StatusCode == http.StatusOK {
				cancel()
				return c.Blob(http.StatusOK, "application/json", data)
			}
		}
		cancel()
		r.mark(b, false)
	}
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
	switch r.waiters.deliver(rep.TransferID, rep.Token, readySignal{ready: rep.Status == "ready", message: rep.Message}) {
	case unknownTransfer:
		r.m.kvRejected.WithLabelValues("unknown_transfer").Inc()
		return apiError(c, http.StatusNotFound, "not_found_error", "unknown transfer id")
	case badToken:
		r.m.kvRejected.WithLabelValues("bad_token").Inc()
		return apiError(c, http.StatusForbidden, "permission_error", "wrong token for transfer")
	}
	return c.JSON(http.StatusOK, map[string]bool{"ok": true})
}
