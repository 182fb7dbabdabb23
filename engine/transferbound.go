package engine

import (
	"fmt"
	"time"
)

// Transfer state is bounded whatever clients send:
//
//   - Only a Save creates a transfer record. A waiter (AwaitTransfer, a
//     Query with transfer_id and wait_ms) on an id with no record joins a
//     transferWait that lives exactly as long as its waiters; when a Save
//     creates the record, the record takes the wait's channel over. Junk
//     waits therefore leave nothing behind.
//   - Records are capped at Config.MaxTransfers and waits at the same
//     number; beyond that the call fails with ErrExhausted.
//   - Records expire from a FIFO in expiry order (the TTL is constant, so
//     expiry times are pushed in order), so an expiry pass costs the
//     records it expires, not the records it keeps.

// transferWait is where callers wait for a transfer this engine has no
// record of. All fields are guarded by e.mu.
type transferWait struct {
	id      string
	done    chan struct{} // closed when the transfer settles or is released
	waiters int
	// t is the record that took done over; nil while there is none.
	t *transfer
	// released: released before any save made a record.
	released bool
	// shared is false for a handle on an existing record (not in e.waits).
	shared bool
}

// joinTransferLocked returns what a waiter on transfer id waits on: the
// record's channel when a Save made one, else the id's shared wait.
// Callers pair it with leaveTransferLocked.
func (e *Engine) joinTransferLocked(id string) (*transferWait, error) {
	if t, ok := e.transfers[id]; ok {
		return &transferWait{id: id, done: t.done, t: t}, nil
	}
	w, ok := e.waits[id]
	if !ok {
		if len(e.waits) >= e.cfg.MaxTransfers {
			return nil, fmt.Errorf("%w: %d transfers waited for and not yet saved, the engine's limit (--max-transfers)",
				ErrExhausted, len(e.waits))
		}
		w = &transferWait{id: id, done: make(chan struct{}), shared: true}
		e.waits[id] = w
	}
	w.waiters++
	return w, nil
}

// leaveTransferLocked ends one waiter's wait; the last one to leave a
// wait no record took over drops it.
func (e *Engine) leaveTransferLocked(w *transferWait) {
	if !w.shared {
		return
	}
	w.waiters--
	if w.waiters == 0 && e.waits[w.id] == w {
		delete(e.waits, w.id)
	}
}

// result is a woken waiter's outcome. Caller holds e.mu.
func (w *transferWait) result() error {
	switch {
	case w.t != nil && w.t.state == transferReady:
		return nil
	case w.t != nil:
		return fmt.Errorf("%w: %s: %s", ErrTransferFailed, w.id, w.t.message)
	case w.released:
		return fmt.Errorf("%w: %s: released before any save reached this engine", ErrTransferFailed, w.id)
	}
	return ErrClosed
}

// transferExpiry is one entry of e.expiry: t expires at `at` unless it was
// rescheduled since (then t.expires differs and the entry is stale).
type transferExpiry struct {
	t  *transfer
	at time.Time
}

// scheduleExpiryLocked (re)sets t's expiry to one TTL from now.
func (e *Engine) scheduleExpiryLocked(t *transfer) {
	t.expires = time.Now().Add(e.cfg.TransferTTL)
	e.expiry = append(e.expiry, transferExpiry{t, t.expires})
}

// expireTransfersLocked drops the records whose TTL passed: pending ones
// fail first. It stops at the first entry still in the future.
func (e *Engine) expireTransfersLocked(now time.Time) {
	for e.expiryHead < len(e.expiry) && now.After(e.expiry[e.expiryHead].at) {
		x := e.expiry[e.expiryHead]
		e.expiry[e.expiryHead] = transferExpiry{}
		e.expiryHead++
		t := x.t
		if e.transfers[t.id] != t || !t.expires.Equal(x.at) {
			continue // rescheduled or already gone
		}
		if t.state == transferPending {
			t.settle(e, transferFailed, "timed out waiting for saves")
		}
		t.release(e)
		delete(e.transfers, t.id)
	}
	if e.expiryHead > len(e.expiry)/2 { // amortised O(1) compaction
		n := copy(e.expiry, e.expiry[e.expiryHead:])
		clear(e.expiry[n:])
		e.expiry = e.expiry[:n]
		e.expiryHead = 0
	}
}

// closeTransfersLocked settles every record and wakes every wait, for
// Close.
func (e *Engine) closeTransfersLocked() {
	for _, t := range e.transfers {
		t.settle(e, transferFailed, "engine closed")
	}
	for id, w := range e.waits {
		close(w.done)
		delete(e.waits, id)
	}
}
