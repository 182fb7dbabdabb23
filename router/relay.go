package router

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"
)

// maxEventBytes bounds one SSE event held while incomplete.
const maxEventBytes = 8 << 20

var (
	errStreamTruncated = errors.New("decode stream ended without data: [DONE]")
	errEventTooLarge   = fmt.Errorf("decode stream event larger than %d bytes", maxEventBytes)
)

// clientWriteError: the client could not be written to (it went away).
type clientWriteError struct{ err error }

func (e *clientWriteError) Error() string { return "writing to client: " + e.err.Error() }
func (e *clientWriteError) Unwrap() error { return e.err }

// Kinds of SSE events, for the latency metrics.
type eventKind int

const (
	eventToken eventKind = iota // a chunk with choices: what TTFT/ITL measure (as vLLM's bench serve)
	eventOther                  // usage-only chunk, comment, unknown
	eventError                  // the backend's own error: {"error": ...} or {"object": "error", ...}
	eventDone                   // data: [DONE]
)

// relayHooks connect the relay to its leg. All are optional.
type relayHooks struct {
	// begin runs once, before the first byte goes to the client (headers).
	begin func()
	// afterRead runs after every read from upstream (idle timer reset).
	afterRead func(n int)
	// onEvent runs for every event written, with the time it was flushed.
	onEvent func(kind eventKind, at time.Time)
}

// relayResult says how far a relay got.
type relayResult struct {
	wrote  bool // some byte reached the client: no retry is possible any more
	done   bool // data: [DONE] was relayed
	tokens int  // token events relayed
	// backendError: an error event of the backend's own was relayed. vLLM
	// ends a generation that failed mid-stream with one, then [DONE]: a
	// complete stream, but no answer.
	backendError bool
}

var readBufPool = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}

// relaySSE copies an SSE stream from src to dst one complete event at a
// time: whatever complete events a read brings are written and flushed at
// once (nothing is held back), and a partial event is held until its end
// arrives, so the client never sees half an event followed by an error.
//
// It returns nil as soon as data: [DONE] was relayed (and only then). Errors:
// a *clientWriteError when dst failed, errStreamTruncated, errEventTooLarge,
// or src's read error.
func relaySSE(dst io.Writer, flush func() error, src io.Reader, h relayHooks) (relayResult, error) {
	var res relayResult
	bp := readBufPool.Get().(*[]byte)
	buf := *bp
	defer func() {
		if cap(buf) <= 1<<20 {
			*bp = buf[:cap(buf)]
			readBufPool.Put(bp)
		}
	}()
	held := 0 // bytes of an incomplete event at buf[:held]
	for {
		if held == len(buf) {
			if len(buf) >= maxEventBytes {
				return res, errEventTooLarge
			}
			grown := make([]byte, 2*len(buf))
			copy(grown, buf[:held])
			buf = grown
		}
		n, rerr := src.Read(buf[held:])
		if h.afterRead != nil {
			h.afterRead(n)
		}
		if n > 0 {
			scanFrom := max(held-2, 0) // a boundary may straddle reads
			held += n
			cut := lastEventEnd(buf[:held], scanFrom)
			if cut > 0 {
				if !res.wrote && h.begin != nil {
					h.begin()
				}
				res.wrote = true
				if _, err := dst.Write(buf[:cut]); err != nil {
					return res, &clientWriteError{err}
				}
				if err := flush(); err != nil {
					return res, &clientWriteError{err}
				}
				now := time.Now()
				forEachEvent(buf[:cut], func(kind eventKind) {
					switch kind {
					case eventDone:
						res.done = true
					case eventToken:
						res.tokens++
					case eventError:
						res.backendError = true
					}
					if h.onEvent != nil {
						h.onEvent(kind, now)
					}
				})
				held = copy(buf, buf[cut:held])
				if res.done {
					// [DONE] ends an OpenAI stream: answer complete. Not
					// waiting for the backend's EOF keeps a client that
					// hangs up right after [DONE] (as SDKs may) from
					// turning a finished answer into a cancelled one.
					return res, nil
				}
			}
		}
		switch {
		case rerr == io.EOF:
			if !res.done {
				return res, errStreamTruncated
			}
			return res, nil
		case rerr != nil:
			return res, rerr
		}
	}
}

// lastEventEnd returns the offset just past the last blank line (event
// terminator: "\n\n" or "\n\r\n") in b, searching from from; 0 if none.
func lastEventEnd(b []byte, from int) int {
	end := 0
	for i := from; i < len(b); {
		j := bytes.IndexByte(b[i:], '\n')
		if j < 0 {
			break
		}
		i += j + 1
		if i < len(b) && b[i] == '\n' {
			end = i + 1
			i++
		} else if i+1 < len(b) && b[i] == '\r' && b[i+1] == '\n' {
			end = i + 2
			i += 2
		}
	}
	return end
}

// forEachEvent classifies each complete event in b.
func forEachEvent(b []byte, fn func(eventKind)) {
	for len(b) > 0 {
		end := nextBlank(b)
		fn(classifyEvent(b[:end]))
		b = b[end:]
	}
}

// nextBlank returns the offset just past the first event terminator in b
// (len(b) when none).
func nextBlank(b []byte) int {
	for i := 0; i < len(b); {
		j := bytes.IndexByte(b[i:], '\n')
		if j < 0 {
			return len(b)
		}
		i += j + 1
		if i < len(b) && b[i] == '\n' {
			return i + 1
		}
		if i+1 < len(b) && b[i] == '\r' && b[i+1] == '\n' {
			return i + 2
		}
	}
	return len(b)
}

// classifyEvent looks at an event's data line. vLLM sends one
// "data: <json>" line per event; multi-line data is classified by its
// first line.
func classifyEvent(ev []byte) eventKind {
	for len(ev) > 0 {
		line := ev
		if i := bytes.IndexByte(ev, '\n'); i >= 0 {
			line, ev = ev[:i], ev[i+1:]
		} else {
			ev = nil
		}
		line = bytes.TrimRight(line, "\r")
		data, ok := bytes.CutPrefix(line, []byte("data:"))
		if !ok {
			continue
		}
		data = bytes.TrimLeft(data, " ")
		switch {
		case bytes.Equal(data, []byte("[DONE]")):
			return eventDone
		case hasNonEmptyArray(data, `"choices"`):
			return eventToken
		case isErrorObject(data):
			return eventError
		}
		return eventOther
	}
	return eventOther
}

// hasNonEmptyArray reports whether data holds key followed by a non-empty
// array, without decoding the JSON (this runs per streamed token).
func hasNonEmptyArray(data []byte, key string) bool {
	i := bytes.Index(data, []byte(key))
	if i < 0 {
		return false
	}
	rest := bytes.TrimLeft(data[i+len(key):], " \t")
	rest, ok := bytes.CutPrefix(rest, []byte(":"))
	if !ok {
		return false
	}
	rest = bytes.TrimLeft(rest, " \t\r\n")
	rest, ok = bytes.CutPrefix(rest, []byte("["))
	if !ok {
		return false
	}
	rest = bytes.TrimLeft(rest, " \t\r\n")
	return len(rest) > 0 && rest[0] != ']'
}

// isErrorObject reports whether data is an OpenAI error: a top-level
// "error" member (vLLM's streaming errors) or "object": "error" (its
// ErrorResponse). It decodes only events that name "error" at all, so
// token chunks (classified before) and plain events cost a byte scan.
func isErrorObject(data []byte) bool {
	if !bytes.Contains(data, []byte(`"error"`)) {
		return false
	}
	var ev struct {
		Object string          `json:"object"`
		Error  json.RawMessage `json:"error"`
	}
	if json.Unmarshal(data, &ev) != nil {
		return false
	}
	return ev.Object == "error" || (len(ev.Error) > 0 && !bytes.Equal(ev.Error, []byte("null")))
}
