package engine

import (
	"context"
	"fmt"
	"time"
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

// transferLocked finds or creates the record of a transfer a Save names,
// bound to ns and (first binding wins) to readyURL and token. A new
// record takes over the waiters of the id. Creation fails beyond
// Config.MaxTransfers records.
func (e *Engine) transferLocked(id string, ns *namespace, readyURL, token string) (*transfer, error) {
	t, ok := e.transfers[id]
	if ok {
		return t, t.bind(ns, readyURL, token)
	}
	if len(e.transfers) >= e.cfg.MaxTransfers {
		return nil, fmt.Errorf("%w: %d transfers tracked, the engine's limit (--max-transfers); "+
			"transfers are kept for --transfer-ttl %s", ErrExhausted, len(e.transfers), e.cfg.TransferTTL)
	}
	t = &transfer{id: id, blocks: map[*block]struct{}{}, done: make(chan struct{})}
	if w, ok := e.waits[id]; ok {
		t.done = w.done
		w.t = t
		delete(e.waits, id)
	}
	e.transfers[id] = t
	e.scheduleExpiryLocked(t)
	return t, t.bind(ns, readyURL, token)
}

// bind sets the transfer's namespace and callback once. The first ready
// URL and token win: a Save naming another one is refused, so that no
// client can redirect the report (or learn its token) of a transfer it
// does not own.
func (t *transfer) bind(ns *namespace, readyURL, token string) error {
	if t.ns == nil {
		t.ns = ns
	}
	if readyURL == "" {
		return nil
	}
	if t.readyURL == "" {
		t.readyURL, t.token = readyURL, token
		return nil
	}
	if t.readyURL != readyURL || t.token != token {
		return invalid("transfer %q is already bound to another ready_url/ready_token (the first binding wins)", t.id)
	}
	return nil
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
	e.scheduleExpiryLocked(t)
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
	w, err := e.joinTransferLocked(id)
	e.mu.Unlock()
	if err != nil {
		return err
	}
	select {
	case <-ctx.Done():
	case <-w.done:
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	e.leaveTransferLocked(w)
	if err := ctx.Err(); err != nil {
		select {
		case <-w.done:
		default:
			return err
		}
	}
	return w.result()
}

// ReleaseTransfer drops the pins of a transfer (e.g. its client went away).
func (e *Engine) ReleaseTransfer(id string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.releaseTransferLocked(id)
}

// releaseTransferLocked releases a transfer's record or, when no save
// made one, wakes the waiters of the id.
func (e *Engine) releaseTransferLocked(id string) {
	if t, ok := e.transfers[id]; ok {
		t.release(e)
		return
	}
	if w, ok := e.waits[id]; ok {
		// No save ever named this transfer: this engine holds nothing of
		// it (e.g. a router's in-process engine while vLLM saves into
		// another one). Wake the waiters, but record no failure and log
		// nothing: there was no transfer here to fail.
		w.released = true
		close(w.done)
		delete(e.waits, id)
	}
}
