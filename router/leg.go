package router

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"time"

	"github.com/labstack/echo/v4"

	"github.com/pegaflow/pegaflow/internal/ids"
	"github.com/pegaflow/pegaflow/internal/retry"
	"github.com/pegaflow/pegaflow/router/upstream"
)

// Bounds on what the router buffers from a backend.
const (
	maxPrefillAnswer = 64 << 20  // P's JSON answer (one token plus params)
	maxAnswerBytes   = 256 << 20 // a non-streaming answer
	maxSmallAnswer   = 1 << 20   // an error body, a model list
)

// answerLeg is the leg whose answer goes to the client: decode in P/D
// mode, the whole request in aggregated mode.
type answerLeg struct {
	legPolicy
	// firstBytePhase: observe decode_first_byte (P/D only; in aggregated
	// mode the first byte includes the prefill and TTFT says it all).
	firstBytePhase bool
}

func (r *Router) track(b *backend, delta int64) {
	b.m.inflight.Set(float64(b.inflight.Add(delta)))
}

// send POSTs body to b. It returns the answer when its status is 2xx,
// else an attemptError holding the backend's answer. A proxy follows no
// redirects: a backend's 3xx is its answer. Like http.Client, credentials
// in a backend URL become Basic auth when the client sent no
// Authorization. A backend that closed the connection after reading the
// request, before answering (it may have run it), is counted and logged
// here; the leg's retry policy decides as for any transport error.
func (r *Router) send(ctx context.Context, b *backend, in *incoming, body []byte) (legAnswer, *attemptError) {
	hdr := in.header
	if b.authLine != nil && in.authz == "" {
		hdr = append(hdr[:len(hdr):len(hdr)], b.authLine...)
	}
	resp, err := r.legs.post(ctx, b, in.path, hdr, body)
	if err != nil {
		if ctx.Err() == nil && errors.Is(err, upstream.ErrUnanswered) {
			r.m.unanswered.WithLabelValues(b.role).Inc()
			r.log.Warn("backend closed the connection after reading the request, before answering: it may have run it; not replayed, the leg's retry policy decides",
				"role", b.role, "backend", b.name, "request_id", in.reqID)
		}
		// The shape http.Client gives its errors, with the URL redacted.
		return legAnswer{}, &attemptError{backend: b, err: causeOf(ctx, &url.Error{Op: "Post", URL: b.name + in.path, Err: err})}
	}
	if resp.status/100 != 2 {
		aerr := &attemptError{backend: b, status: resp.status, ctype: resp.ctype}
		aerr.body, _ = io.ReadAll(io.LimitReader(resp.body, maxSmallAnswer))
		resp.body.Close()
		return legAnswer{}, aerr
	}
	return resp, nil
}

// runPrefill sends the prefill leg (P picked for rt, nil: no route), each attempt on another P with its own
// transfer, and returns the transfer of the attempt that succeeded, its P
// and P's kv_transfer_params. A fresh transfer per attempt keeps a late save
// of a failed attempt from passing for the retry's KV.
func (r *Router) runPrefill(ctx context.Context, in *incoming, rt *route) (*transfer, *backend, json.RawMessage, error) {
	var (
		t      *transfer
		p      *backend
		params json.RawMessage
	)
	err := r.try(ctx, &r.prefillLeg, in.reqID, rt, func(ctx context.Context, b *backend) error {
		t, p = r.transfers.register(ids.Hex(16), ids.Hex(16)), b
		var err error
		if params, err = r.prefillAttempt(ctx, b, in, t); err != nil {
			r.dropTransfer(t)
			return err
		}
		return nil
	})
	if err != nil {
		return nil, nil, nil, err
	}
	return t, p, params, nil
}

// prefillAttempt returns P's kv_transfer_params, an *attemptError, or the
// budget's refusal (marked permanent: another P cannot change it).
func (r *Router) prefillAttempt(ctx context.Context, b *backend, in *incoming, t *transfer) (json.RawMessage, error) {
	actx, cancel := context.WithTimeoutCause(ctx, r.cfg.PrefillTimeout, r.errPrefillTimeout)
	defer cancel()
	params := getBuf()
	body := getBuf() // upstream.Post has written it when it returns
	defer putBuf(body)
	in.parsed.prefillBody(body, prefillParams(params, t.id, r.readyURL, t.token))
	putBuf(params)

	r.track(b, 1)
	defer r.track(b, -1)
	resp, aerr := r.send(actx, b, in, body.Bytes())
	if aerr != nil {
		return nil, aerr
	}
	defer resp.body.Close()
	answer, err := r.budget.read(resp.body, resp.length, maxPrefillAnswer)
	var data []byte
	if err == nil {
		defer answer.release()
		data, err = answer.bytes()
	}
	if isBudgetError(err) {
		return nil, retry.Permanent(err)
	}
	var kv json.RawMessage
	if err == nil {
		kv, err = prefillAnswerParams(data)
	}
	if err != nil {
		if actx.Err() != nil {
			return nil, &attemptError{backend: b, err: causeOf(actx, err)}
		}
		return nil, &attemptError{backend: b, err: fmt.Errorf("answer is not JSON: %w", err)}
	}
	return bytes.Clone(kv), nil // answer goes back to the budget
}

// attemptResult is how one answer-leg attempt ended.
type attemptResult struct {
	wrote     bool          // bytes reached the client: no retry any more
	clientErr error         // the client went away
	err       *attemptError // the backend failed
	// errorEvent, when set, is the backend whose stream was relayed whole
	// but carried its own error event: a failed request from a live
	// backend (not retried, not held against its health).
	errorEvent *backend
	refused    error // the answer budget refused it (buffered.go)
}

// runAnswer sends the answer leg (decode, or the whole aggregated
// request), retrying on another backend until a byte reached the client,
// and relays the answer.
func (r *Router) runAnswer(c echo.Context, in *incoming, body []byte, rt *route) (string, error) {
	ctx := c.Request().Context()
	var res attemptResult // the last attempt's
	err := r.try(ctx, &r.answer.legPolicy, in.reqID, rt, func(_ context.Context, b *backend) error {
		res = r.answerAttempt(c, b, in, body)
		switch {
		case res.clientErr != nil:
			return retry.Permanent(res.clientErr)
		case res.refused != nil:
			return retry.Permanent(res.refused)
		case res.err == nil:
			return nil
		case res.wrote:
			return retry.Permanent(res.err)
		}
		return res.err
	})
	switch {
	case err == nil && res.errorEvent != nil:
		b := res.errorEvent
		r.log.Warn("backend ended its stream with an error event", "role", b.role, "backend", b.name, "request_id", in.reqID)
		return outcomeFailed, nil
	case err == nil:
		return outcomeOK, nil
	case errors.Is(res.clientErr, os.ErrDeadlineExceeded):
		r.log.Warn("client stopped reading: cut", "request_id", in.reqID, "limit", r.cfg.ClientWriteTimeout)
		return outcomeStalled, nil
	case res.clientErr != nil || ctx.Err() != nil:
		r.log.Debug("client went away", "request_id", in.reqID)
		return outcomeCancelled, nil
	case res.wrote:
		b := res.err.backend
		r.log.Warn("answer broke after the first byte", "role", b.role, "backend", b.name, "request_id", in.reqID, "err", res.err)
		if in.stream {
			writeStreamError(c, res.err)
		}
		return outcomeFailed, nil
	}
	return outcomeFailed, r.failLeg(c, r.answer.pool.role, err)
}

func (r *Router) answerAttempt(c echo.Context, b *backend, in *incoming, body []byte) attemptResult {
	ctx := c.Request().Context()
	actx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	// A non-streaming answer comes whole, after the generation: only
	// --decode-timeout bounds it. A stream must show its first event
	// within --first-byte-timeout, and then never stall longer than
	// --idle-stream-timeout.
	clock := newLegClock(cancel, r.cfg.DecodeTimeout, r.errDecodeTimeout)
	defer clock.stop()
	if in.stream {
		clock.firstEventWithin(r.cfg.FirstByteTimeout, r.errFirstByteTimeout)
	}
	t0 := time.Now()
	r.track(b, 1)
	defer r.track(b, -1)
	resp, aerr := r.send(actx, b, in, body)
	if aerr != nil {
		return attemptResult{err: aerr}
	}
	defer resp.body.Close()
	w := c.Response()

	if !in.stream {
		answer, err := r.budget.read(resp.body, resp.length, maxAnswerBytes)
		switch {
		case isBudgetError(err):
			return attemptResult{refused: err}
		case err != nil:
			return attemptResult{err: &attemptError{backend: b, err: causeOf(actx, err)}}
		}
		defer answer.release() // written to the client before return
		if r.answer.firstBytePhase {
			r.m.observe(phaseDecodeFirstByte, time.Since(t0).Seconds())
		}
		ct := resp.ctype
		if ct == "" {
			ct = echo.MIMEApplicationJSON
		}
		if err := answer.writeTo(w, resp.status, ct); err != nil {
			return attemptResult{wrote: true, clientErr: err}
		}
		return attemptResult{wrote: true}
	}

	clock.idleWithin(r.cfg.IdleStreamTimeout, r.errIdleTimeout)
	rc := http.NewResponseController(w)
	var firstTok, prevTok time.Time
	res, err := relaySSE(w, rc.Flush, resp.body, relayHooks{
		begin: func() {
			clock.firstEventSent()
			if r.answer.firstBytePhase {
				r.m.observe(phaseDecodeFirstByte, time.Since(t0).Seconds())
			}
			h := w.Header()
			h.Set("Content-Type", "text/event-stream")
			h.Set("Cache-Control", "no-cache")
			h.Set("X-Accel-Buffering", "no") // no buffering in a fronting nginx
			w.WriteHeader(http.StatusOK)
		},
		afterRead: func(int) { clock.read() },
		onEvent: func(kind eventKind, at time.Time) {
			if kind != eventToken {
				return
			}
			if firstTok.IsZero() {
				firstTok = at
				r.m.observe(phaseTTFT, at.Sub(in.start).Seconds())
			} else {
				r.m.observe(phaseITL, at.Sub(prevTok).Seconds())
			}
			prevTok = at
		},
	})
	if res.tokens > 1 {
		r.m.observe(phaseTPOT, prevTok.Sub(firstTok).Seconds()/float64(res.tokens-1))
	}
	if err == nil {
		ar := attemptResult{wrote: res.wrote}
		if res.backendError {
			ar.errorEvent = b
		}
		return ar
	}
	var cwe *clientWriteError
	if errors.As(err, &cwe) {
		return attemptResult{wrote: res.wrote, clientErr: err}
	}
	return attemptResult{wrote: res.wrote, err: &attemptError{backend: b, err: causeOf(actx, err)}}
}

// handleModels answers GET /v1/models from a decode (or aggregated)
// backend: the ones that serve the client's tokens.
func (r *Router) handleModels(c echo.Context) error {
	ctx := c.Request().Context()
	var data []byte
	var ctype string
	err := r.try(ctx, &r.models, c.Request().Header.Get("X-Request-Id"), nil, func(_ context.Context, b *backend) error {
		var aerr *attemptError
		if data, ctype, aerr = r.getModels(c, b); aerr != nil {
			return aerr
		}
		return nil
	})
	switch {
	case err == nil:
		return c.Blob(http.StatusOK, ctype, data)
	case ctx.Err() != nil:
		return nil
	}
	return r.failLeg(c, r.models.pool.role, err)
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
		return nil, "", &attemptError{backend: b, err: redactURLError(err)}
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxSmallAnswer))
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
