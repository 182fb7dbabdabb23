package router

import (
	"bytes"
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"time"
	"unicode/utf8"
)

// retryPolicy bounds the attempts of one leg and spaces them out.
type retryPolicy struct {
	attempts   int
	backoff    time.Duration
	backoffMax time.Duration
}

// delay before retry number n (1 = the first retry): backoff doubled per
// retry, capped, with "equal jitter" (half fixed, half random) so retries
// of many requests that failed together do not arrive together.
func (p retryPolicy) delay(n int) time.Duration {
	if p.backoff <= 0 || n < 1 {
		return 0
	}
	d := p.backoff
	for i := 1; i < n && d < p.backoffMax; i++ {
		d *= 2
	}
	d = min(d, p.backoffMax)
	half := d / 2
	if half <= 0 {
		return d
	}
	return half + rand.N(half+1)
}

// wait sleeps for retry n's delay or until ctx ends.
func (p retryPolicy) wait(ctx context.Context, n int) error {
	d := p.delay(n)
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

// attemptError is one failed attempt on one backend.
type attemptError struct {
	backend *backend
	status  int    // backend's HTTP status; 0 for transport errors and timeouts
	body    []byte // backend's answer for status errors (bounded)
	ctype   string // its Content-Type
	err     error  // transport error or cause
}

func (e *attemptError) Error() string {
	if e.status != 0 {
		if msg := upstreamMessage(e.body); msg != "" {
			return fmt.Sprintf("%s backend %s answered %d: %s", e.backend.role, e.backend.base, e.status, msg)
		}
		return fmt.Sprintf("%s backend %s answered %d", e.backend.role, e.backend.base, e.status)
	}
	return fmt.Sprintf("%s backend %s: %v", e.backend.role, e.backend.base, e.err)
}

func (e *attemptError) Unwrap() error { return e.err }

// retryable: transport errors, timeouts, 5xx and 429 move on to another
// backend; any other status is the request's own fault and goes back to
// the client unchanged.
func (e *attemptError) retryable() bool {
	return e.status == 0 || e.status >= 500 || e.status == http.StatusTooManyRequests
}

// backendFault: whether the failure counts against the backend's passive
// health. 429 is load shedding by a live backend, and a 4xx is the
// client's doing; ejecting for either would only move the load around.
func (e *attemptError) backendFault() bool {
	return e.status == 0 || e.status >= 500
}

// errNoBackend: no selectable backend was left for a leg.
var errNoBackend = errors.New("no healthy backend")

// upstreamMessage extracts a backend's error message for the client: the
// OpenAI/vLLM {"error": {"message": ...}} shape, {"error": "..."},
// {"message": ...}, FastAPI's {"detail": ...}, or a short plain-text body.
// "" when there is nothing readable (e.g. an HTML error page).
func upstreamMessage(body []byte) string {
	body = bytes.TrimSpace(body)
	if len(body) == 0 {
		return ""
	}
	if body[0] == '{' {
		var e struct {
			Error   json.RawMessage `json:"error"`
			Message string          `json:"message"`
			Detail  json.RawMessage `json:"detail"`
		}
		if json.Unmarshal(body, &e) != nil {
			return ""
		}
		var inner struct {
			Message string `json:"message"`
		}
		var s string
		switch {
		case json.Unmarshal(e.Error, &inner) == nil && inner.Message != "":
			return truncateMessage(inner.Message)
		case json.Unmarshal(e.Error, &s) == nil && s != "":
			return truncateMessage(s)
		case e.Message != "":
			return truncateMessage(e.Message)
		case json.Unmarshal(e.Detail, &s) == nil && s != "":
			return truncateMessage(s)
		case len(e.Detail) > 0:
			return truncateMessage(string(e.Detail))
		}
		return ""
	}
	if body[0] == '<' || !utf8.Valid(body) {
		return ""
	}
	return truncateMessage(string(body))
}

// truncateMessage bounds a backend message relayed to the client.
func truncateMessage(s string) string {
	const maxLen = 512
	if len(s) <= maxLen {
		return s
	}
	cut := maxLen
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + "..."
}

// constantTimeEqual compares secrets without leaking their common prefix.
func constantTimeEqual(a, b string) bool {
	return subtle.ConstantTimeCompare([]byte(a), []byte(b)) == 1
}
