package router

import (
	"crypto/subtle"
	"sync"
)

// readySignal is one /kv_ready report.
type readySignal struct {
	ready   bool
	message string
}

// waiters holds the transfers the router is waiting on, so /kv_ready can
// be matched (and authenticated by token) whether it arrives before or
// after the prefill answer.
type waiters struct {
	mu sync.Mutex
	m  map[string]*waiter
}

type waiter struct {
	token string
	ch    chan readySignal // buffered 1: the first report wins
}

func newWaiters() *waiters { return &waiters{m: map[string]*waiter{}} }

func (w *waiters) add(id, token string) *waiter {
	wt := &waiter{token: token, ch: make(chan readySignal, 1)}
	w.mu.Lock()
	w.m[id] = wt
	w.mu.Unlock()
	return wt
}

func (w *waiters) remove(id string) {
	w.mu.Lock()
	delete(w.m, id)
	w.mu.Unlock()
}

type deliverResult int

const (
	delivered deliverResult = iota
	unknownTransfer
	badToken
)

func (w *waiters) deliver(id, token string, sig readySignal) deliverResult {
	w.mu.Lock()
	wt, ok := w.m[id]
	w.mu.Unlock()
	if !ok {
		return unknownTransfer
	}
	if subtle.ConstantTimeCompare([]byte(wt.token), []byte(token)) != 1 {
		return badToken
	}
	select {
	case wt.ch <- sig:
	default: // already reported: idempotent
	}
	return delivered
}
