package router

import (
	"context"
	"sync"
	"time"
)

// legClock ends an answer attempt with the cause of the first of its
// limits to pass: the attempt's end (--decode-timeout), and for a stream
// the first event's (--first-byte-timeout) and the gap since the last read
// (--idle-stream-timeout). One timer serves all of them: the answer leg is
// the router's hot path, and a derived context or timer per limit costs
// allocations on every request.
//
// Concurrency: the methods are safe for concurrent use; fire runs on the
// timer's goroutine.
type legClock struct {
	cancel context.CancelCauseFunc

	mu    sync.Mutex
	timer *time.Timer
	at    time.Time // when the armed limit passes
	cause error     // and its cause

	end      time.Time // the attempt's end
	endErr   error
	first    time.Time // the first event's limit; zero once it went out, or for no stream
	firstErr error
	idle     time.Duration // the longest gap between reads; 0 until the relay starts
	idleErr  error
	lastRead time.Time
}

// newLegClock arms the attempt's end, d from now.
func newLegClock(cancel context.CancelCauseFunc, d time.Duration, err error) *legClock {
	k := &legClock{cancel: cancel, end: time.Now().Add(d), endErr: err}
	k.mu.Lock()
	k.at, k.cause = k.end, k.endErr
	k.timer = time.AfterFunc(d, k.fire)
	k.mu.Unlock()
	return k
}

// firstEventWithin adds the first event's limit, d from now.
func (k *legClock) firstEventWithin(d time.Duration, err error) {
	k.mu.Lock()
	k.first, k.firstErr = time.Now().Add(d), err
	k.rearmLocked()
	k.mu.Unlock()
}

// idleWithin adds the limit on the gap between reads, d from now and
// after each read.
func (k *legClock) idleWithin(d time.Duration, err error) {
	k.mu.Lock()
	k.idle, k.idleErr, k.lastRead = d, err, time.Now()
	k.rearmLocked()
	k.mu.Unlock()
}

// read restarts the gap limit.
func (k *legClock) read() {
	k.mu.Lock()
	k.lastRead = time.Now()
	k.rearmLocked()
	k.mu.Unlock()
}

// firstEventSent drops the first event's limit.
func (k *legClock) firstEventSent() {
	k.mu.Lock()
	k.first = time.Time{}
	k.rearmLocked()
	k.mu.Unlock()
}

// stop disarms the clock; the attempt is over.
func (k *legClock) stop() {
	k.mu.Lock()
	k.timer.Stop()
	k.mu.Unlock()
}

func (k *legClock) rearmLocked() {
	at, cause := k.end, k.endErr
	if !k.first.IsZero() && k.first.Before(at) {
		at, cause = k.first, k.firstErr
	}
	if k.idle > 0 {
		if t := k.lastRead.Add(k.idle); t.Before(at) {
			at, cause = t, k.idleErr
		}
	}
	k.at, k.cause = at, cause
	k.timer.Reset(time.Until(at))
}

// fire cancels with the armed cause, unless the clock was re-armed for
// later since the timer went off (a fire racing a Reset).
func (k *legClock) fire() {
	k.mu.Lock()
	if time.Now().Before(k.at) {
		k.mu.Unlock()
		return
	}
	cause := k.cause
	k.mu.Unlock()
	k.cancel(cause)
}
