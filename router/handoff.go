package router

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"sync"
	"time"

	"github.com/labstack/echo/v4"
)

// KVReadySource reports transfer readiness from an engine in this process.
type KVReadySource interface {
	// AwaitTransfer returns nil when the transfer is ready, ctx.Err() when
	// ctx ends first, any other error when the transfer failed.
	AwaitTransfer(ctx context.Context, transferID string) error
	// ReleaseTransfer drops the engine's pin on the transfer's blocks.
	ReleaseTransfer(transferID string)
}

// Bounds on remembered settled transfers: a late or repeated /kv_ready for
// a transfer the router is done with is answered 200 (idempotent) for this
// long, then 404.
const (
	settledTTL = 2 * time.Minute
	settledMax = 1 << 16
)

// transfer is one prefill attempt's handoff: the id and token put in
// kv_transfer_params, and the first ready/failed report received.
// ready, reason and source are written once, before done closes, and read
// only after it closed.
type transfer struct {
	id, token string

	once   sync.Once
	done   chan struct{} // closed by the first report
	ready  bool
	reason string
	source string // the report's source_engine (host:port of P's engine peer address), "" none
}

func (t *transfer) settle(ready bool, reason, source string) bool {
	first := false
	t.once.Do(func() {
		t.ready, t.reason, t.source = ready, reason, source
		close(t.done)
		first = true
	})
	return first
}

// reportedSource is the source_engine of the /kv_ready report that
// settled t ("" when none came, or it named none). A transfer found ready
// by the in-process engine may still be settled by a report concurrently:
// done decides what may be read.
func (t *transfer) reportedSource() string {
	select {
	case <-t.done:
		return t.source
	default:
		return ""
	}
}

// transfers matches /kv_ready reports to transfers by id and token. A
// transfer is registered before P is called, so a report that arrives
// before P's HTTP answer is kept on the transfer and the later wait returns
// at once. Finished transfers are remembered (bounded by settledTTL and
// settledMax) so repeats stay idempotent.
//
// A settled transfer is kept as digests of its id and token: ~124 bytes
// of heap each (map and FIFO included) where the strings took ~236. At
// settledMax entries (7.7 vs 14.7 MiB) that is the router's largest
// standing memory.
type transfers struct {
	mu      sync.Mutex
	live    map[string]*transfer
	settled map[digest]settledEntry
	order   []settledKey // FIFO of settled, for expiry; order[head:] is live
	head    int
	epoch   time.Time // expiries count from it (monotonic)
}

// digest is the first 128 bits of a SHA-256: collision- and
// preimage-resistant, so a report cannot pass for another transfer's id
// or token.
type digest [16]byte

func digestOf(s string) digest {
	sum := sha256.Sum256([]byte(s))
	return digest(sum[:16])
}

type settledEntry struct {
	token   digest
	expires time.Duration // since epoch
}

type settledKey struct {
	id      digest
	expires time.Duration
}

func newTransfers() *transfers {
	return &transfers{live: map[string]*transfer{}, settled: map[digest]settledEntry{}, epoch: time.Now()}
}

func (ts *transfers) register(id, token string) *transfer {
	t := &transfer{id: id, token: token, done: make(chan struct{})}
	ts.mu.Lock()
	ts.live[id] = t
	ts.mu.Unlock()
	return t
}

// finish forgets a live transfer, remembering its token for late reports.
func (ts *transfers) finish(t *transfer, now time.Time) {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	if ts.live[t.id] != t {
		return
	}
	delete(ts.live, t.id)
	at := now.Sub(ts.epoch)
	exp := at + settledTTL
	id := digestOf(t.id)
	ts.settled[id] = settledEntry{token: digestOf(t.token), expires: exp}
	ts.order = append(ts.order, settledKey{id, exp})
	// Expire from the front; the FIFO is in expiry order.
	for ts.head < len(ts.order) && (len(ts.order)-ts.head > settledMax || at >= ts.order[ts.head].expires) {
		k := ts.order[ts.head]
		if e, ok := ts.settled[k.id]; ok && e.expires == k.expires {
			delete(ts.settled, k.id)
		}
		ts.order[ts.head] = settledKey{}
		ts.head++
	}
	if ts.head > len(ts.order)/2 { // amortised O(1) compaction
		n := copy(ts.order, ts.order[ts.head:])
		ts.order = ts.order[:n]
		ts.head = 0
	}
}

// liveCount is the number of transfers in flight (tests, /health).
func (ts *transfers) liveCount() int {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	return len(ts.live)
}

type reportResult int

const (
	reportAccepted reportResult = iota
	reportUnknown
	reportBadToken
)

// report delivers one /kv_ready report; source is its source_engine
// (validated, "" none). Tokens compare in constant time.
func (ts *transfers) report(id, token string, ready bool, reason, source string, now time.Time) reportResult {
	ts.mu.Lock()
	t, live := ts.live[id]
	var want, got digest
	if live {
		want = digestOf(t.token)
	} else if e, ok := ts.settled[digestOf(id)]; ok && now.Sub(ts.epoch) < e.expires {
		want = e.token
	} else {
		ts.mu.Unlock()
		return reportUnknown
	}
	ts.mu.Unlock()
	got = digestOf(token)
	if subtle.ConstantTimeCompare(want[:], got[:]) != 1 {
		return reportBadToken
	}
	if live {
		t.settle(ready, reason, source)
	}
	return reportAccepted
}

// waitOutcome is how a KV-ready wait ended.
type waitOutcome int

const (
	waitReady     waitOutcome = iota
	waitFailed                // a "failed" report or the engine's transfer error
	waitTimeout               // the deadline passed first
	waitCancelled             // the client went away
)

// Sources of a ready signal (metric label).
const (
	sourceCallback = "callback"
	sourceEngine   = "engine"
)

type waitResult struct {
	outcome waitOutcome
	source  string // sourceCallback or sourceEngine when ready or failed
	reason  string
}

// awaitTransfer waits until t is ready or failed (whichever of the
// /kv_ready report and the in-process engine says so first), the timeout
// passes, or ctx ends. kv may be nil. The engine wait is cancelled on
// return, so no goroutine outlives the call for longer than AwaitTransfer
// takes to honour its context.
func awaitTransfer(ctx context.Context, t *transfer, kv KVReadySource, timeout time.Duration) waitResult {
	select { // fast path: reported before P answered
	case <-t.done:
		return callbackResult(t)
	default:
	}
	wctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var engineDone chan error
	if kv != nil {
		engineDone = make(chan error, 1)
		go func() { engineDone <- kv.AwaitTransfer(wctx, t.id) }()
	}
	select {
	case <-t.done:
		return callbackResult(t)
	case err := <-engineDone:
		switch {
		case err == nil:
			return waitResult{outcome: waitReady, source: sourceEngine}
		case ctx.Err() != nil:
			return waitResult{outcome: waitCancelled}
		case wctx.Err() != nil:
			return waitResult{outcome: waitTimeout, reason: "timed out after " + timeout.String()}
		}
		return waitResult{outcome: waitFailed, source: sourceEngine, reason: err.Error()}
	case <-wctx.Done():
		if ctx.Err() != nil {
			return waitResult{outcome: waitCancelled}
		}
		return waitResult{outcome: waitTimeout, reason: "timed out after " + timeout.String()}
	}
}

func callbackResult(t *transfer) waitResult {
	if t.ready {
		return waitResult{outcome: waitReady, source: sourceCallback}
	}
	reason := t.reason
	if reason == "" {
		reason = "reported failed"
	}
	return waitResult{outcome: waitFailed, source: sourceCallback, reason: reason}
}

// dropTransfer forgets t (late reports stay idempotent) and unpins its
// blocks in the engine.
func (r *Router) dropTransfer(t *transfer) {
	r.transfers.finish(t, time.Now())
	if r.kv != nil {
		r.kv.ReleaseTransfer(t.id)
	}
}

// kvReadyReport is the body of POST /kv_ready (docs/design.md).
type kvReadyReport struct {
	TransferID string `json:"transfer_id"`
	Token      string `json:"token"`
	Status     string `json:"status"`
	Message    string `json:"message"`
	// SourceEngine is the peer address (host:port of --peer-addr) of the
	// engine holding the KV, optional: D's engine fetches from there when
	// P and D do not share one.
	SourceEngine string `json:"source_engine"`
}

func (r *Router) handleKVReady(c echo.Context) error {
	var rep kvReadyReport
	body, err := r.readBody(c, 64<<10)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		r.m.kvRejected.WithLabelValues("bad_request").Inc()
		return r.bodyTimedOut(c)
	}
	if err == nil {
		err = json.Unmarshal(body, &rep)
	}
	if err != nil || rep.TransferID == "" || rep.Token == "" ||
		(rep.Status != "ready" && rep.Status != "failed") {
		r.m.kvRejected.WithLabelValues("bad_request").Inc()
		return apiError(c, http.StatusBadRequest, "invalid_request_error", `want {"transfer_id", "token", "status": "ready"|"failed"}`)
	}
	if rep.SourceEngine != "" {
		if err := checkHostPort(rep.SourceEngine); err != nil {
			r.m.kvRejected.WithLabelValues("bad_request").Inc()
			return apiError(c, http.StatusBadRequest, "invalid_request_error", "source_engine: "+err.Error())
		}
	}
	switch r.transfers.report(rep.TransferID, rep.Token, rep.Status == "ready", rep.Message, rep.SourceEngine, time.Now()) {
	case reportUnknown:
		r.m.kvRejected.WithLabelValues("unknown_transfer").Inc()
		return apiError(c, http.StatusNotFound, "not_found_error", "unknown transfer id")
	case reportBadToken:
		r.m.kvRejected.WithLabelValues("bad_token").Inc()
		return apiError(c, http.StatusForbidden, "permission_error", "wrong token for transfer")
	}
	return c.JSON(http.StatusOK, map[string]bool{"ok": true})
}

// awaitKV is the callback handoff: it reads P's kv_transfer_params first
// and acts on them at once (a malformed answer is a 502; an answer without
// pegaflow_transfer_id, from a P without the PegaFlow connector, applies
// --on-kv-timeout without waiting, since no KV will come), else waits
// until the transfer is ready. It returns the decode leg's
// kv_transfer_params, or the request's outcome (and answer) when it ends
// here.
func (r *Router) awaitKV(c echo.Context, in *incoming, t *transfer, p *backend, fromP json.RawMessage) (json.RawMessage, string, error) {
	params, err := parsePrefillParams(fromP)
	if err != nil {
		return nil, outcomeFailed, apiError(c, http.StatusBadGateway, "upstream_error", fmt.Sprintf("prefill backend %s: %v", p.name, err))
	}
	reason := ""
	if hasTransferID(params) {
		t1 := time.Now()
		w := awaitTransfer(c.Request().Context(), t, r.kv, r.cfg.KVReadyTimeout)
		r.m.observe(phaseKVReadyWait, time.Since(t1).Seconds())
		switch w.outcome {
		case waitCancelled:
			return nil, outcomeCancelled, nil
		case waitReady:
			r.m.readyBy[w.source].Inc()
		default:
			r.m.kvTimeouts.Inc()
			r.log.Warn("transfer KV not ready", "transfer", t.id, "request_id", in.reqID, "reason", w.reason, "policy", string(r.cfg.OnKVTimeout))
			reason = w.reason
		}
	} else {
		reason = "prefill backend " + p.name + " returned no " + kvTransferID + " (no PegaFlow connector?)"
		p.m.noKVParams.Inc()
		if p.warnedNoKVParams.CompareAndSwap(false, true) { // once per backend: it is a deployment fault, not a request's
			r.log.Warn("prefill answer without PegaFlow kv_transfer_params: decoding without waiting for KV; is P running the PegaFlow connector?",
				"backend", p.name, "policy", string(r.cfg.OnKVTimeout))
		}
	}
	if reason != "" && r.cfg.OnKVTimeout == OnKVTimeoutFail {
		return nil, outcomeFailed, apiError(c, http.StatusGatewayTimeout, "timeout_error", "prefill KV was not ready: "+reason)
	}
	// Ready, or decode-anyway: D loads what the engine has and recomputes
	// the rest. Where the KV is: the report says, else P's params.
	source := t.reportedSource()
	if source == "" {
		source = params.sourceEngine()
	}
	return decodeParams(params, t.id, source), "", nil
}
