package router

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"

	"github.com/labstack/echo/v4"

	"github.com/pegaflow/pegaflow/internal/openai"
)

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
		if msg := openai.ErrorMessage(e.body); msg != "" {
			return fmt.Sprintf("%s backend %s answered %d: %s", e.backend.role, e.backend.name, e.status, msg)
		}
		return fmt.Sprintf("%s backend %s answered %d", e.backend.role, e.backend.name, e.status)
	}
	return fmt.Sprintf("%s backend %s: %v", e.backend.role, e.backend.name, e.err)
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

// deadlineError is one of the router's own limits, worded for the client.
// It is a timeout (net.Error style) and matches context.DeadlineExceeded.
type deadlineError struct{ msg string }

func deadlineErrorf(format string, a ...any) error {
	return &deadlineError{fmt.Sprintf(format, a...)}
}

func (e *deadlineError) Error() string        { return e.msg }
func (e *deadlineError) Timeout() bool        { return true }
func (e *deadlineError) Is(target error) bool { return target == context.DeadlineExceeded }

// isTimeout: one of the router's deadlines or a dial/transport timeout.
func isTimeout(err error) bool {
	if errors.Is(err, context.DeadlineExceeded) {
		return true
	}
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// causeOf names the deadline behind err when ctx ended (the router's own
// limits carry a cause), else returns err.
func causeOf(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		if cause := context.Cause(ctx); cause != nil {
			return cause
		}
	}
	return err
}

// apiError writes the OpenAI error shape.
func apiError(c echo.Context, status int, typ, msg string) error {
	return c.JSON(status, openai.ErrorBody(msg, typ, status))
}

// failLeg answers the client after a leg failed before any byte was sent.
func (r *Router) failLeg(c echo.Context, role string, err error) error {
	var aerr *attemptError
	switch {
	case isBudgetError(err):
		return budgetError(c, err)
	case !errors.As(err, &aerr):
		if errors.Is(err, errNoBackend) {
			return apiError(c, http.StatusServiceUnavailable, "service_unavailable", fmt.Sprintf("no healthy %s backend", role))
		}
		return apiError(c, http.StatusBadGateway, "upstream_error", fmt.Sprintf("%s leg failed: %v", role, err))
	case aerr.status != 0 && (!aerr.retryable() || aerr.status == http.StatusTooManyRequests):
		// The backend's own 4xx (and a 429 left after the retries) goes back
		// unchanged: it is about this request, or tells the client to slow down.
		ct := aerr.ctype
		if ct == "" {
			ct = echo.MIMEApplicationJSON
		}
		return c.Blob(aerr.status, ct, aerr.body)
	case aerr.status == 0 && isTimeout(aerr.err):
		return apiError(c, http.StatusGatewayTimeout, "timeout_error", aerr.Error())
	}
	return apiError(c, http.StatusBadGateway, "upstream_error", aerr.Error())
}

// writeStreamError ends a stream that broke after its first byte: an
// OpenAI error event, then [DONE] so SDKs stop reading cleanly.
func writeStreamError(c echo.Context, err error) {
	payload, _ := json.Marshal(openai.ErrorBody("stream interrupted: "+err.Error(), "upstream_error", http.StatusBadGateway))
	w := c.Response()
	_, _ = fmt.Fprintf(w, "data: %s\n\ndata: [DONE]\n\n", payload)
	_ = http.NewResponseController(w).Flush()
}
