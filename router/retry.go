package router

import (
	"context"
	"errors"
	"syscall"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/pegaflow/pegaflow/internal/retry"
)

// legPolicy is how one leg picks and retries its backends: the one retry
// loop of the router (try) runs every leg under one of these, as Caddy's
// proxy loop runs under its LoadBalancing policy.
type legPolicy struct {
	pool   *pool
	policy retry.Policy
	// probe: the leg is no completion (GET /v1/models). Its retries stay
	// out of retries_total (which counts the prefill and answer legs), and
	// its success is no passive-health recovery: a backend that lists its
	// models may still fail every completion.
	probe bool
	// retries is retries_total of the leg's role (nil for a probe).
	retries prometheus.Counter
}

// newLegPolicy is a leg on p with the configured backoff (doubled per
// retry, capped, jittered) and the given number of attempts.
func newLegPolicy(cfg Config, p *pool, attempts int) legPolicy {
	return legPolicy{pool: p, policy: retry.Policy{Attempts: attempts, Backoff: cfg.RetryBackoff, BackoffMax: cfg.RetryBackoffMax}}
}

// try runs op under l: each attempt on a selectable backend this call has
// not tried yet, picked for the request's route rt (nil: none), with l's attempt limit and backoff in between. op returns
// nil on success, an *attemptError for a backend's failure (another
// backend is tried when it is retryable), or retry.Permanent(err) for an
// end no other backend can change (the client left, bytes reached it).
//
// try returns nil once op succeeded; errNoBackend when no backend was
// selectable for the first attempt; an error matching ctx's when ctx
// ended; else op's last error (the mark of Permanent removed). It owns
// what every leg shares: retries_total, the backoff, passive health (an
// attempt that ended with ctx counts for nobody) and the retry log line.
func (r *Router) try(ctx context.Context, l *legPolicy, reqID string, rt *route, op func(ctx context.Context, b *backend) error) error {
	var triedBuf [8]*backend
	tried := triedBuf[:0]
	var last error = errNoBackend
	return retry.Do(ctx, l.policy, retryableAttempt, func(ctx context.Context, attempt int) error {
		if attempt > 1 && !l.probe {
			l.retries.Inc()
		}
		b := l.pool.pick(tried, rt)
		if b == nil {
			return retry.Permanent(last)
		}
		if !l.probe {
			r.kvDecided(b, rt)
		}
		tried = append(tried, b)
		err := op(ctx, b)
		if err == nil {
			if !l.probe {
				r.passive(b, nil)
			}
			return nil
		}
		last = err
		var aerr *attemptError
		if ctx.Err() != nil || !errors.As(err, &aerr) {
			return err
		}
		r.passive(b, aerr)
		if !retryableAttempt(err) {
			return err
		}
		r.log.Warn("attempt failed", "role", b.role, "backend", b.name, "attempt", attempt, "request_id", reqID, "err", err)
		if refused(aerr) && !l.pool.hasCandidate(tried) {
			// Nothing listens there and no other backend is left: a retry
			// would wait out the backoff only to find no backend, so the
			// client hears at once (counted and ejecting as any failure).
			// A timeout or a 5xx keeps the backoff: the backend is there and
			// may be back by then, or another may have recovered.
			return retry.Permanent(err)
		}
		return err
	})
}

// refused: the backend's host refused the connection (ECONNREFUSED):
// nothing listens on its port.
func refused(aerr *attemptError) bool {
	return aerr.status == 0 && errors.Is(aerr.err, syscall.ECONNREFUSED)
}

// retryableAttempt is try's verdict: a backend's retryable failure, not
// one marked Permanent.
func retryableAttempt(err error) bool {
	var aerr *attemptError
	return !retry.IsPermanent(err) && errors.As(err, &aerr) && aerr.retryable()
}
