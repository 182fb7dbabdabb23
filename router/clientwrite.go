package router

import (
	"net/http"
	"time"

	"github.com/labstack/echo/v4"
)

// clientWriteChunk bounds one write under one deadline, so the deadline
// says "no progress for --client-write-timeout", not "the whole answer in
// --client-write-timeout", for a large non-streaming answer too.
const clientWriteChunk = 64 << 10

// writeDeadlines gives every write to the client of every route on the
// server a deadline: --client-write-timeout from the start of that write
// (or flush). A client that stops reading therefore cuts its own
// request: the write fails, the relay returns a client error, both legs
// are cancelled and the transfer released, where before the handler sat
// in Write for as long as the client kept the connection open, past
// --idle-stream-timeout and --decode-timeout, which bound only the reads
// from the backends.
//
// The deadline is armed on entry (net/http may write 100 Continue while
// the body is read) and again on exit (it writes what the handler left
// buffered after the handler returns), and it is installed on every route
// because the deadline belongs to the connection: a keep-alive connection
// carries the last one into its next request, whichever route that is.
func (r *Router) writeDeadlines(next echo.HandlerFunc) echo.HandlerFunc {
	return func(c echo.Context) error {
		resp := c.Response()
		w := &deadlineWriter{ResponseWriter: resp.Writer, rc: http.NewResponseController(resp.Writer), timeout: r.cfg.ClientWriteTimeout}
		resp.Writer = w
		w.arm()
		defer w.arm()
		return next(c)
	}
}

// deadlineWriter arms the connection's write deadline before each write
// (at most clientWriteChunk bytes) and flush. Unwrap lets
// http.ResponseController reach the connection's own methods (Hijack,
// SetReadDeadline) through it.
type deadlineWriter struct {
	http.ResponseWriter
	rc      *http.ResponseController // of the wrapped writer
	timeout time.Duration
}

// arm sets the write deadline. An error means the writer has no deadline
// to set (a test recorder); then writes are as unbounded as before.
func (w *deadlineWriter) arm() { _ = w.rc.SetWriteDeadline(time.Now().Add(w.timeout)) }

func (w *deadlineWriter) Write(p []byte) (int, error) {
	n := 0
	for len(p) > 0 {
		w.arm()
		m, err := w.ResponseWriter.Write(p[:min(len(p), clientWriteChunk)])
		n += m
		if err != nil {
			return n, err
		}
		p = p[m:]
	}
	return n, nil
}

// FlushError is what http.ResponseController.Flush calls.
func (w *deadlineWriter) FlushError() error {
	w.arm()
	return w.rc.Flush()
}

// Flush serves callers that want an http.Flusher.
func (w *deadlineWriter) Flush() { _ = w.FlushError() }

func (w *deadlineWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }
