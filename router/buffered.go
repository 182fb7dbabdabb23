package router

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"sync/atomic"

	"github.com/labstack/echo/v4"
	"github.com/prometheus/client_golang/prometheus"
)

// Why answers are buffered at all: a non-streaming answer is retried on
// another backend until its first byte reached the client, so the router
// holds it whole before writing (a backend that breaks halfway is retried,
// never relayed as truncated JSON); P's answer is read whole for its
// kv_transfer_params. Each is capped (maxAnswerBytes, maxPrefillAnswer),
// and all of them together by --max-buffered-bytes: a request whose answer
// finds the budget spent gets 503 with Retry-After, so memory stays bounded
// whatever the number of clients. Streams are relayed event by event and
// hold no more than one event.

// retryAfterBusy is the Retry-After (seconds) of a 503 for a spent budget:
// buffered answers leave within a client write.
const retryAfterBusy = "1"

// firstChunk is the first buffer of an answer of unknown length, and
// maxChunk the largest: an answer grows by chunks (never copied, so never
// held twice), each as large as what came before, up to maxChunk.
const (
	firstChunk = 4 << 10
	maxChunk   = 4 << 20
)

// errBusy: the answer would take the buffered bytes past
// --max-buffered-bytes; the client may retry later (503).
var errBusy = errors.New("the router's buffered answers are at --max-buffered-bytes: retry later")

// errAnswerTooLarge: one answer alone is larger than --max-buffered-bytes
// (502: retrying cannot help).
var errAnswerTooLarge = errors.New("answer larger than the router's --max-buffered-bytes")

// answerBudget is the one account of answer bytes the router holds. Every
// byte of buffer capacity is granted before it is allocated and given back
// when the answer is written (or dropped), so used never exceeds limit.
// Safe for concurrent use; it never waits: a grant that does not fit is
// refused at once.
type answerBudget struct {
	limit   int64
	used    atomic.Int64
	peak    atomic.Int64 // high-water mark of used (tests)
	gauge   prometheus.Gauge
	refused prometheus.Counter
}

func newAnswerBudget(limit int64, m *metrics) *answerBudget {
	return &answerBudget{limit: limit, gauge: m.bufferedBytes, refused: m.bufferRefusals}
}

// take grants n bytes, or returns errBusy (errAnswerTooLarge when n plus
// what this answer already holds could never fit) and counts a refusal.
func (b *answerBudget) take(n, holding int64) error {
	for {
		u := b.used.Load()
		if u+n > b.limit {
			b.refused.Inc()
			if n+holding > b.limit {
				return errAnswerTooLarge
			}
			return errBusy
		}
		if b.used.CompareAndSwap(u, u+n) {
			b.gauge.Add(float64(n))
			for p := b.peak.Load(); u+n > p && !b.peak.CompareAndSwap(p, u+n); p = b.peak.Load() {
			}
			return nil
		}
	}
}

func (b *answerBudget) give(n int64) {
	b.used.Add(-n)
	b.gauge.Sub(float64(n))
}

// heldAnswer is an answer read under the budget: its bytes in chunks.
// release gives them back; it must be called once the answer is used.
type heldAnswer struct {
	b      *answerBudget
	chunks [][]byte
	held   int64 // capacity granted
	size   int64 // bytes read
	hint   int64 // declared length, -1 unknown
}

// read reads r to its end, at most limit bytes (more is cut, as
// io.LimitReader would). sizeHint is the declared length (-1 unknown): a
// body that declares it is read into one buffer of that size.
func (b *answerBudget) read(r io.Reader, sizeHint, limit int64) (*heldAnswer, error) {
	a := &heldAnswer{b: b, hint: sizeHint}
	for a.size < limit {
		c := a.last()
		if len(c) == cap(c) && a.size > 0 && a.size == sizeHint {
			// The declared length is in: a reader that sends its EOF
			// apart (not with the last bytes) costs no new chunk.
			var probe [1]byte
			n, err := r.Read(probe[:])
			switch {
			case n == 0 && err == io.EOF:
				return a, nil
			case n == 0 && err == nil:
				continue
			case n == 0:
				a.release()
				return nil, err
			}
			sizeHint = -1 // longer than declared: read on, cut at limit
			if err := a.grow(limit); err != nil {
				return nil, err
			}
			a.chunks[len(a.chunks)-1] = append(a.last(), probe[0])
			a.size++
			continue
		}
		if len(c) == cap(c) {
			if err := a.grow(limit); err != nil {
				return nil, err
			}
			c = a.last()
		}
		n, err := r.Read(c[len(c):cap(c)])
		a.chunks[len(a.chunks)-1] = c[:len(c)+n]
		a.size += int64(n)
		if err == io.EOF {
			return a, nil
		}
		if err != nil {
			a.release()
			return nil, err
		}
	}
	return a, nil
}

// grow adds the next chunk: as large as what came before (the first one
// the declared length, when known), at most maxChunk, never past limit.
// On a refusal the answer is released.
func (a *heldAnswer) grow(limit int64) error {
	n := min(max(firstChunk, min(a.size, maxChunk)), limit-a.size)
	if a.size == 0 && a.hint > 0 {
		n = min(a.hint, limit) // EOF comes with the last bytes
	}
	if err := a.b.take(n, a.held); err != nil {
		a.release()
		return err
	}
	a.held += n
	a.chunks = append(a.chunks, make([]byte, 0, n))
	return nil
}

func (a *heldAnswer) last() []byte {
	if len(a.chunks) == 0 {
		return nil
	}
	return a.chunks[len(a.chunks)-1]
}

// bytes is the answer in one slice: its chunk when it has one, else a
// joined copy, granted like the chunks (which it replaces).
func (a *heldAnswer) bytes() ([]byte, error) {
	switch len(a.chunks) {
	case 0:
		return nil, nil
	case 1:
		return a.chunks[0], nil
	}
	if err := a.b.take(a.size, a.held); err != nil {
		return nil, err
	}
	joined := make([]byte, 0, a.size)
	for _, c := range a.chunks {
		joined = append(joined, c...)
	}
	a.b.give(a.held)
	a.chunks, a.held = [][]byte{joined}, a.size
	return joined, nil
}

// writeTo sends the answer as the client's response: status, Content-Type
// and Content-Length (no chunked encoding to undo), then the chunks.
func (a *heldAnswer) writeTo(w http.ResponseWriter, status int, ctype string) error {
	h := w.Header()
	h.Set(echo.HeaderContentType, ctype)
	if a.size > 0 {
		h["Content-Length"] = []string{strconv.FormatInt(a.size, 10)}
	}
	w.WriteHeader(status)
	for _, c := range a.chunks {
		if _, err := w.Write(c); err != nil {
			return err
		}
	}
	return nil
}

// release gives the answer's bytes back; the answer must not be used
// afterwards. Idempotent.
func (a *heldAnswer) release() {
	if a.held > 0 {
		a.b.give(a.held)
	}
	a.chunks, a.held, a.size = nil, 0, 0
}

// budgetError answers a request refused by the budget: 503 with
// Retry-After when it was full, 502 when the one answer could never fit.
func budgetError(c echo.Context, err error) error {
	if errors.Is(err, errBusy) {
		c.Response().Header().Set("Retry-After", retryAfterBusy)
		return apiError(c, http.StatusServiceUnavailable, "service_unavailable", err.Error())
	}
	return apiError(c, http.StatusBadGateway, "upstream_error", fmt.Sprint(err))
}

// isBudgetError: err is the budget's refusal (errBusy, errAnswerTooLarge).
func isBudgetError(err error) bool {
	return errors.Is(err, errBusy) || errors.Is(err, errAnswerTooLarge)
}
