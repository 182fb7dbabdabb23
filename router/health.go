package router

import (
	"context"
	"io"
	"net/http"
	"sync"
	"time"
)

// passive feeds one attempt's result (nil: success) to b's passive health.
func (r *Router) passive(b *backend, aerr *attemptError) {
	ok := aerr == nil || !aerr.backendFault()
	if aerr != nil && aerr.status == http.StatusTooManyRequests {
		return // alive but shedding load: neither a failure nor a recovery
	}
	if b.report(ok, r.cfg.FailThreshold, r.cfg.Cooldown, time.Now()) {
		r.log.Warn("backend ejected", "role", b.role, "backend", b.name, "cooldown", r.cfg.Cooldown)
		b.m.ejections.Inc()
	}
	r.setHealthGauge(b)
}

func (r *Router) setHealthGauge(b *backend) {
	v := 0.0
	if b.healthy(time.Now()) {
		v = 1
	}
	b.m.healthy.Set(v)
}

// healthChecker polls GET <backend>/health (vLLM answers 200 when its
// engine is alive). One failed poll makes a backend unselectable, one
// passing poll makes it selectable again; passive ejection is separate.
type healthChecker struct {
	client   *http.Client
	backends func() []*backend // the current members, read each round
	interval time.Duration
	timeout  time.Duration
	onChange func(b *backend, ok bool)
}

// run polls until ctx ends; interval 0 disables polling.
func (h *healthChecker) run(ctx context.Context) {
	if h.interval <= 0 {
		<-ctx.Done()
		return
	}
	t := time.NewTicker(h.interval)
	defer t.Stop()
	for {
		h.checkAll(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// checkAll polls every backend concurrently, so one hung backend delays
// nobody else's verdict beyond the poll timeout.
func (h *healthChecker) checkAll(ctx context.Context) {
	var wg sync.WaitGroup
	for _, b := range h.backends() {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ok := h.check(ctx, b)
			if ctx.Err() != nil {
				return // shutting down: no verdict
			}
			if b.activeOK.Swap(ok) != ok && h.onChange != nil {
				h.onChange(b, ok)
			}
		}()
	}
	wg.Wait()
}

func (h *healthChecker) check(ctx context.Context, b *backend) bool {
	ctx, cancel := context.WithTimeout(ctx, h.timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, b.base+"/health", nil)
	if err != nil {
		return false
	}
	resp, err := h.client.Do(req)
	if err != nil {
		return false
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10)) // keep the connection reusable
	resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}
