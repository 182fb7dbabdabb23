package engine

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"time"

	"github.com/pegaflow/pegaflow/internal/retry"
)

type transferState uint8

const (
	transferPending transferState = iota
	transferReady
	transferFailed
)

func (s transferState) String() string {
	switch s {
	case transferReady:
		return "ready"
	case transferFailed:
		return "failed"
	}
	return "pending"
}

// transfer tracks the blocks a prefill saves for one P/D request.
//
// It is ready when every rank sent its last save and every tagged block is
// sealed; failed when a tagged block could not be stored or the TTL passed
// first. Tagged blocks stay pinned until the decode side loaded them on
// every rank, Release, or the TTL. The record outlives settling until the
// TTL so that a waiter arriving late still sees the outcome.
type transfer struct {
	id        string
	ns        *namespace
	blocks    map[*block]struct{} // pinned by this transfer
	pending   int                 // tagged blocks not yet sealed
	lastRanks uint64
	loaded    uint64
	state     transferState
	message   string
	done      chan struct{} // closed when settled
	readyURL  string
	token     string
	expires   time.Time
	released  bool
}

func validateTransfer(id, readyURL, token string) error {
	if err := validateID("transfer_id", id); err != nil {
		return err
	}
	if readyURL != "" {
		u, err := url.Parse(readyURL)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return invalid("ready_url %q is not an http(s) URL", readyURL)
		}
	}
	if len(token) > MaxIDLen {
		return invalid("ready_token longer than %d bytes", MaxIDLen)
	}
	return nil
}

// transferLocked finds or creates a transfer record.
func (e *Engine) transferLocked(id string) *transfer {
	t, ok := e.transfers[id]
	if !ok {
		t = &transfer{id: id, blocks: map[*block]struct{}{}, done: make(chan struct{}),
			expires: time.Now().Add(e.cfg.TransferTTL)}
		e.transfers[id] = t
	}
	return t
}

func (t *transfer) bind(ns *namespace, readyURL, token string) {
	if t.ns == nil {
		t.ns = ns
	}
	if readyURL != "" {
		t.readyURL, t.token = readyURL, token
	}
}

// add tags b with the transfer and pins it.
func (t *transfer) add(e *Engine, b *block) {
	if t.released {
		return
	}
	if _, ok := t.blocks[b]; ok {
		return
	}
	t.blocks[b] = struct{}{}
	e.pinLocked(b)
	if !b.sealed {
		t.pending++
		b.transfers = append(b.transfers, t)
	}
}

func (t *transfer) check(e *Engine) {
	if t.state == transferPending && t.ns != nil && t.lastRanks&t.ns.allRanks == t.ns.allRanks && t.pending == 0 {
		t.settle(e, transferReady, "")
	}
}

// blockFailed drops b, a tagged block that will never seal, and fails the
// transfer. b's pin by the transfer goes without re-admitting b to the
// eviction queues: the caller frees it.
func (t *transfer) blockFailed(e *Engine, b *block, why string) {
	if _, ok := t.blocks[b]; ok {
		delete(t.blocks, b)
		t.pending--
		b.pins--
	}
	t.settle(e, transferFailed, why)
}

// settle publishes the outcome once; later calls are no-ops.
func (t *transfer) settle(e *Engine, state transferState, message string) {
	if t.state != transferPending {
		return
	}
	t.state, t.message = state, message
	close(t.done)
	t.expires = time.Now().Add(e.cfg.TransferTTL)
	if state == transferReady {
		e.stats.transfersReady++
	} else {
		e.stats.transfersFailed++
		e.log.Warn("transfer failed", "transfer", t.id, "reason", message)
	}
	e.m.observeTransfer(state)
	if t.readyURL != "" && !e.closed {
		e.bg.Add(1)
		go e.notify(t.readyURL, t.id, t.token, state.String(), message)
	}
}

// release unpins the transfer's blocks.
func (t *transfer) release(e *Engine) {
	if t.released {
		return
	}
	t.released = true
	for b := range t.blocks {
		if !b.sealed {
			b.transfers = removeTransfer(b.transfers, t)
		}
		e.unpinLocked(b)
	}
	clear(t.blocks)
	t.pending = 0
	if t.state != transferPending {
		return
	}
	if t.ns == nil {
		// No save ever named this transfer: this engine holds nothing of
		// it (a waiter or a query created the record; e.g. a router's
		// in-process engine while vLLM saves into another one). Wake any
		// waiter, but record no failure and log nothing: there was no
		// transfer here to fail.
		t.state, t.message = transferFailed, "released before any save reached this engine"
		close(t.done)
		t.expires = time.Now().Add(e.cfg.TransferTTL)
		return
	}
	t.settle(e, transferFailed, "released before ready")
}

func removeTransfer(ts []*transfer, t *transfer) []*transfer {
	for i, x := range ts {
		if x == t {
			return append(ts[:i], ts[i+1:]...)
		}
	}
	return ts
}

// readyReport is the body POSTed to a transfer's ready_url (the router's
// /kv_ready contract).
type readyReport struct {
	TransferID string `json:"transfer_id"`
	Token      string `json:"token"`
	Status     string `json:"status"`
	Message    string `json:"message,omitempty"`
}

// callbackRetry spaces the attempts of a ready_url POST: 50ms, 200ms,
// 800ms between four attempts.
var callbackRetry = retry.Policy{Attempts: 4, Backoff: 50 * time.Millisecond, Factor: 4}

// notify POSTs the outcome to ready_url with bounded retries. Close stops
// the retries (not a POST in flight, which CallbackTimeout bounds).
func (e *Engine) notify(readyURL, id, token, status, message string) {
	defer e.bg.Done()
	body, _ := json.Marshal(readyReport{TransferID: id, Token: token, Status: status, Message: message})
	_ = retry.Do(e.stopped, callbackRetry, nil, func(ctx context.Context, attempt int) error {
		err := e.postReady(context.WithoutCancel(ctx), readyURL, body)
		if err != nil && !retry.IsPermanent(err) {
			e.log.Warn("kv_ready callback failed", "transfer", id, "url", readyURL, "attempt", attempt, "err", err)
		}
		return err
	})
}

// postReady makes one POST; a 4xx answer is a permanent error.
func (e *Engine) postReady(ctx context.Context, readyURL string, body []byte) error {
	ctx, cancel := context.WithTimeout(ctx, e.cfg.CallbackTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, readyURL, bytes.NewReader(body))
	if err != nil {
		return retry.Permanent(err)
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := e.http.Do(req)
	if err != nil {
		return err
	}
	resp.Body.Close()
	switch {
	case resp.StatusCode < 300:
		return nil
	case resp.StatusCode >= 400 && resp.StatusCode < 500:
		// The router rejected it (unknown or wrong token): retrying won't help.
		e.log.Warn("kv_ready callback rejected", "url", readyURL, "status", resp.StatusCode)
		return retry.Permanent(fmt.Errorf("status %d", resp.StatusCode))
	}
	return fmt.Errorf("status %d", resp.StatusCode)
}

// AwaitTransfer blocks until the transfer is ready (nil), failed (an error
// wrapping ErrTransferFailed), the engine closes (ErrClosed), or ctx ends
// (ctx.Err()). It may be called before the first save of the transfer.
func (e *Engine) AwaitTransfer(ctx context.Context, id string) error {
	if err := validateID("transfer_id", id); err != nil {
		return err
	}
	e.mu.Lock()
	if err := e.checkOpen(); err != nil {
		e.mu.Unlock()
		return err
	}
	t := e.transferLocked(id)
	done := t.done
	e.mu.Unlock()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-done:
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if t.state == transferReady {
		return nil
	}
	return fmt.Errorf("%w: %s: %s", ErrTransferFailed, id, t.message)
}

// ReleaseTransfer drops the pins of a transfer (e.g. its client went away).
func (e *Engine) ReleaseTransfer(id string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if t, ok := e.transfers[id]; ok {
		t.release(e)
	}
}
