package kvlookup

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/pegaflow/pegaflow/engine"
)

// missesToSkip is how many deadline misses in a row make an engine
// skipped: a router's budget is small, so one miss is no verdict, but an
// engine that never answers in time must not cost every request its
// whole budget.
const missesToSkip = 3

// health remembers the engines that failed, so that a dead or
// blackholed engine is skipped without a call (and without the wait for
// a dial) until its backoff ends; the next call then probes it. Only
// failing engines have an entry (a success removes it), so the map is
// bounded by the configured backends.
type health struct {
	base time.Duration
	log  *slog.Logger

	mu   sync.Mutex
	down map[string]*engineHealth
}

type engineHealth struct {
	misses  int           // deadline misses in a row
	backoff time.Duration // the current one, 0 while not skipped
	until   time.Time
}

// check fails fast while addr is skipped.
func (h *health) check(addr string) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	e := h.down[addr]
	if e == nil || e.backoff == 0 || !time.Now().Before(e.until) {
		return nil
	}
	return fmt.Errorf("%w: %s for %s more", ErrEngineDown, addr, time.Until(e.until).Round(time.Millisecond))
}

// record notes a call's outcome; callerErr is the caller's ctx's error
// after the call. A call the caller cancelled says nothing about the
// engine, nor does a request the engine refused as malformed; a missed
// deadline counts only when it keeps happening.
func (h *health) record(addr string, err, callerErr error) {
	if errors.Is(callerErr, context.Canceled) || errors.Is(err, engine.ErrInvalid) {
		return
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	e := h.down[addr]
	if err == nil {
		if e != nil {
			delete(h.down, addr)
			if e.backoff > 0 {
				h.log.Info("KV lookup engine reachable again", "engine", addr)
			}
		}
		return
	}
	if e == nil {
		e = &engineHealth{}
		h.down[addr] = e
	}
	if errors.Is(err, context.DeadlineExceeded) || callerErr != nil {
		if e.misses++; e.misses < missesToSkip {
			return
		}
	}
	if e.backoff == 0 {
		e.backoff = h.base
		h.log.Warn("KV lookup engine failing; skipped (counted as no hit) for a backoff", "engine", addr, "backoff", e.backoff, "err", err)
	} else {
		e.backoff = min(2*e.backoff, 8*h.base)
	}
	e.misses = 0
	e.until = time.Now().Add(e.backoff)
}
