// Package retry is PegaFlow's one retry policy: a bounded number of
// attempts, capped exponential backoff with jitter between them, and a
// caller-supplied verdict on which failures deserve another attempt. The
// router's legs and the engine's kv_ready callbacks all run through Do, so
// limits and spacing are decided in one place (as Caddy's reverse proxy
// lets one LoadBalancing policy own tryAgain).
//
// A Policy is a value; it is safe for concurrent use.
package retry

import (
	"context"
	"errors"
	"math/rand/v2"
	"time"
)

// Policy bounds the attempts of one operation and spaces them out.
type Policy struct {
	// Attempts is the most times the operation runs (values < 1 mean 1).
	Attempts int
	// Backoff is the delay before the first retry; 0 retries at once.
	Backoff time.Duration
	// BackoffMax caps the delay (0: no cap beyond Backoff's growth).
	BackoffMax time.Duration
	// Factor multiplies the delay per retry (values < 2 mean 2).
	Factor int
	// NoJitter makes delays exact (tests, and callers that want them).
	NoJitter bool
}

// Delay is the wait before retry n (1 = the first retry): Backoff times
// Factor^(n-1), capped by BackoffMax, with "equal jitter" (half fixed,
// half random) so retries of many operations that failed together do not
// arrive together.
func (p Policy) Delay(n int) time.Duration {
	if p.Backoff <= 0 || n < 1 {
		return 0
	}
	f := time.Duration(max(p.Factor, 2))
	d := p.Backoff
	for i := 1; i < n && (p.BackoffMax <= 0 || d < p.BackoffMax); i++ {
		d *= f
	}
	if p.BackoffMax > 0 {
		d = min(d, p.BackoffMax)
	}
	half := d / 2
	if p.NoJitter || half <= 0 {
		return d
	}
	return half + rand.N(half+1)
}

// Wait sleeps for retry n's delay or until ctx ends (then ctx.Err()).
func (p Policy) Wait(ctx context.Context, n int) error {
	d := p.Delay(n)
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// Do runs op (attempt numbers from 1) until it returns nil, returns an
// error that retryable rejects, the attempts run out, or ctx ends. It
// returns op's last error, or ctx's error when ctx ended first (joined with
// the last attempt's error when there was one). A nil retryable retries
// every error except those marked Permanent. Do never sleeps after the
// last attempt.
func Do(ctx context.Context, p Policy, retryable func(error) bool, op func(ctx context.Context, attempt int) error) error {
	attempts := max(p.Attempts, 1)
	var last error
	for attempt := 1; ; attempt++ {
		if err := ctx.Err(); err != nil {
			return errors.Join(err, last)
		}
		last = op(ctx, attempt)
		if last == nil {
			return nil
		}
		if attempt >= attempts || IsPermanent(last) || (retryable != nil && !retryable(last)) {
			return Unwrap(last)
		}
		if err := p.Wait(ctx, attempt); err != nil {
			return errors.Join(err, Unwrap(last))
		}
	}
}

// permanent marks an error that no retry can fix.
type permanent struct{ err error }

func (e permanent) Error() string { return e.err.Error() }
func (e permanent) Unwrap() error { return e.err }

// Permanent wraps err so Do stops at once and returns err itself.
func Permanent(err error) error {
	if err == nil {
		return nil
	}
	return permanent{err}
}

// IsPermanent reports whether err was marked by Permanent.
func IsPermanent(err error) bool {
	var p permanent
	return errors.As(err, &p)
}

// Unwrap removes a Permanent mark (other errors are returned as they are).
func Unwrap(err error) error {
	if p, ok := err.(permanent); ok {
		return p.err
	}
	return err
}
