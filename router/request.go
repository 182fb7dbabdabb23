package router

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"time"

	"github.com/labstack/echo/v4"

	"github.com/pegaflow/pegaflow/internal/ids"
	"github.com/pegaflow/pegaflow/router/upstream"
)

// incoming is one accepted completion request: what the legs need of the
// client's HTTP request, read once at intake. Its body is kept in the one
// form the router's mode uses.
type incoming struct {
	start  time.Time
	path   string // pathCompletions or pathChatCompletions
	authz  string // client's Authorization, forwarded to both legs
	reqID  string // X-Request-Id, kept or created
	stream bool
	// aggBody is the body sent whole to an aggregated backend (aggregated
	// mode; aggregatedBody).
	aggBody []byte
	// parsed is the validated body the P/D legs are rewritten from (P/D
	// mode; parseRequest).
	parsed *requestBody
	// header is every leg's extra request header lines (Content-Type,
	// X-Request-Id, the client's Authorization), built once.
	header []byte
}

// readRequest reads and validates a completion request, answering the
// client itself (400/413) when it is rejected.
func (r *Router) readRequest(c echo.Context, path string, chat bool) (*incoming, error) {
	in := &incoming{start: time.Now(), path: path}
	httpReq := c.Request()
	body, err := r.readBody(c, r.cfg.MaxBodyBytes)
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return nil, r.bodyTimedOut(c)
		}
		if errors.As(err, &tooBig) {
			return nil, apiError(c, http.StatusRequestEntityTooLarge, "invalid_request_error",
				fmt.Sprintf("request body exceeds %d bytes (--max-body-bytes)", r.cfg.MaxBodyBytes))
		}
		return nil, apiError(c, http.StatusBadRequest, "invalid_request_error", "could not read request body: "+err.Error())
	}
	if r.agg != nil {
		if in.stream, err = parseAggregated(body); err == nil {
			in.aggBody = aggregatedBody(body)
		}
	} else {
		in.parsed, err = parseRequest(body, chat)
		if err == nil {
			in.stream = in.parsed.stream
		}
	}
	if err != nil {
		return nil, apiError(c, http.StatusBadRequest, "invalid_request_error", err.Error())
	}
	in.authz = httpReq.Header.Get("Authorization")
	in.reqID = httpReq.Header.Get("X-Request-Id")
	if in.reqID == "" {
		in.reqID = ids.Hex(16)
	}
	c.Response().Header()["X-Request-Id"] = []string{in.reqID}
	// net/http refused line breaks in the client's fields; a request id
	// the router made is hex. AppendHeader checks again all the same.
	hdr := make([]byte, 0, 64+len(in.reqID)+len(in.authz))
	hdr = append(hdr, "Content-Type: application/json\r\n"...)
	if hdr, err = upstream.AppendHeader(hdr, "X-Request-Id", in.reqID); err == nil && in.authz != "" {
		hdr, err = upstream.AppendHeader(hdr, "Authorization", in.authz)
	}
	if err != nil {
		return nil, apiError(c, http.StatusBadRequest, "invalid_request_error", "X-Request-Id or Authorization: invalid header value")
	}
	in.header = hdr
	return in, nil
}

// bodyTimedOut answers a body that did not arrive within
// --client-read-timeout.
func (r *Router) bodyTimedOut(c echo.Context) error {
	return apiError(c, http.StatusRequestTimeout, "invalid_request_error",
		fmt.Sprintf("request body not received within %s (--client-read-timeout)", r.cfg.ClientReadTimeout))
}

// readBody reads the request body, at most limit bytes (a
// *http.MaxBytesError beyond), within --client-read-timeout (an error
// matching os.ErrDeadlineExceeded beyond). With a Content-Length, into
// one buffer of that size, not grown step by step.
//
// The deadline is the connection's read deadline, set for the body alone
// and cleared after it: http.Server.ReadTimeout would also bound net/http's
// background read that watches for a client hang-up, cancelling every
// long (streaming) request. When it passes, it stays, and the connection
// closes after the answer: net/http would otherwise wait to drain the
// rest of a body that is not coming.
func (r *Router) readBody(c echo.Context, limit int64) (body []byte, err error) {
	rc := http.NewResponseController(c.Response())
	if rc.SetReadDeadline(time.Now().Add(r.cfg.ClientReadTimeout)) == nil {
		defer func() {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				c.Response().Header().Set("Connection", "close")
				return
			}
			_ = rc.SetReadDeadline(time.Time{})
		}()
	}
	httpReq := c.Request()
	rd := http.MaxBytesReader(c.Response(), httpReq.Body, limit)
	if n := httpReq.ContentLength; n > 0 && n <= limit {
		body := make([]byte, n)
		if _, err := io.ReadFull(rd, body); err != nil {
			return nil, err
		}
		return body, nil
	}
	return io.ReadAll(rd)
}

// Keys of kv_transfer_params (docs/design.md).
const (
	kvDoRemoteDecode  = "do_remote_decode"
	kvDoRemotePrefill = "do_remote_prefill"
	kvTransferID      = "pegaflow_transfer_id"
	kvReadyURL        = "pegaflow_ready_url"
	kvReadyToken      = "pegaflow_ready_token"
	// kvSourceEngine is the peer address (host:port) of the engine that
	// holds the prefill's KV, for D's engine to fetch from when P and D do
	// not share one: from the /kv_ready report, else P's params.
	kvSourceEngine = "pegaflow_source_engine"
)

// Top-level keys of a client body the router reads or rewrites.
type fieldKey uint8

const (
	keyOther fieldKey = iota
	keyModel
	keyStream
	keyN
	keyBestOf
	keyPrompt
	keyMessages
	keyMaxTokens
	keyMaxCompletionTokens
	keyStreamOptions
	keyKVTransferParams
	numKeys
)

var keyNames = [numKeys]string{"", "model", "stream", "n", "best_of", "prompt", "messages",
	"max_tokens", "max_completion_tokens", "stream_options", "kv_transfer_params"}

// classifyKey names a raw key (between its quotes, as sent).
func classifyKey(raw []byte) fieldKey {
	name := string(raw) // no copy: compared only
	if bytes.IndexByte(raw, '\\') >= 0 {
		s, ok := unescapeKey(raw)
		if !ok {
			return keyOther
		}
		name = s
	}
	for k := keyModel; k < numKeys; k++ {
		if name == keyNames[k] {
			return k
		}
	}
	return keyOther
}

// requestBody is a validated client body kept as it came, with the
// place of each top-level member: the router rewrites a few keys for each
// leg by copying the other members verbatim, and never decodes (or
// re-encodes) prompts and messages, which are most of the bytes.
type requestBody struct {
	body    []byte
	members []bodyMember
	// last[k] is 1 + the index in members of the last member named k (0:
	// absent); the last of duplicate keys is the one that counts, as with
	// encoding/json and the backends' JSON parsers.
	last   [numKeys]int
	inline [12]bodyMember // members' storage for ordinary bodies
	model  string
	stream bool
}

// bodyMember is one top-level member: body[start:end] is `"key": value`,
// body[val:end] the value.
type bodyMember struct {
	key             fieldKey
	start, val, end int32 // a body is at most --max-body-bytes, far below 2 GiB
}

// value is the raw value of the last member named k (nil: absent).
func (rb *requestBody) value(k fieldKey) []byte {
	if rb.last[k] == 0 {
		return nil
	}
	m := rb.members[rb.last[k]-1]
	return rb.body[m.val:m.end]
}

// badRequest is a validation failure: 400 with message.
type badRequest struct{ msg string }

func (e *badRequest) Error() string { return e.msg }

func invalid(format string, a ...any) error { return &badRequest{fmt.Sprintf(format, a...)} }

// validObject checks that body (space trimmed) is a JSON object: linear,
// and allocation-free unless it is not (the error names the fault).
func validObject(body []byte) error {
	if len(body) == 0 || body[0] != '{' {
		return invalid("request body must be a JSON object")
	}
	if !json.Valid(body) {
		var v json.RawMessage
		return invalid("request body is not valid JSON: %v", json.Unmarshal(body, &v))
	}
	return nil
}

// parseRequest validates one /v1/completions (chat=false) or
// /v1/chat/completions (chat=true) body. Batched prompts and n>1 are
// rejected: one request is one P/D transfer. body is kept (not copied).
func parseRequest(body []byte, chat bool) (*requestBody, error) {
	body = bytes.TrimSpace(body)
	if err := validObject(body); err != nil {
		return nil, err
	}
	rb := &requestBody{body: body}
	rb.members = rb.inline[:0]
	eachMember(body, func(m jsonMember) bool {
		k := classifyKey(m.key)
		rb.members = append(rb.members, bodyMember{key: k, start: int32(m.start), val: int32(m.val), end: int32(m.end)})
		if k != keyOther {
			rb.last[k] = len(rb.members)
		}
		return true
	})
	model := rb.value(keyModel)
	if len(model) < 3 || model[0] != '"' || !unquote(model, &rb.model) || rb.model == "" {
		return nil, invalid("'model' is required (a non-empty string)")
	}
	if raw := rb.value(keyStream); raw != nil && !isNull(raw) {
		switch string(raw) {
		case "true":
			rb.stream = true
		case "false":
		default:
			return nil, invalid("'stream' must be a boolean")
		}
	}
	if raw := rb.value(keyN); raw != nil && !isNull(raw) {
		if n, ok := jsonNumber(raw); !ok || n != 1 {
			return nil, invalid("'n' must be 1: the P/D router serves one completion per request")
		}
	}
	if raw := rb.value(keyBestOf); raw != nil && !isNull(raw) {
		if n, ok := jsonNumber(raw); !ok || n > 1 {
			return nil, invalid("'best_of' > 1 is not supported by the P/D router")
		}
	}
	if chat {
		if err := checkMessages(rb.value(keyMessages)); err != nil {
			return nil, err
		}
	} else if err := checkPrompt(rb.value(keyPrompt)); err != nil {
		return nil, err
	}
	return rb, nil
}

// unquote decodes the valid JSON string raw into s.
func unquote(raw []byte, s *string) bool {
	if bytes.IndexByte(raw, '\\') < 0 {
		*s = string(raw[1 : len(raw)-1])
		return true
	}
	return json.Unmarshal(raw, s) == nil
}

// jsonNumber reads a valid JSON value as a float64, as encoding/json
// would (ok false: not a number, or out of range).
func jsonNumber(raw []byte) (float64, bool) {
	if c := raw[0]; c != '-' && (c < '0' || c > '9') {
		return 0, false
	}
	n, err := strconv.ParseFloat(string(raw), 64)
	return n, err == nil
}

// parseAggregated checks an aggregated-mode body: a JSON object whose
// "stream", when present, is a boolean (the router must know whether to
// relay SSE). Everything else is the backend's to judge, batches and n>1
// included: the body goes through unchanged.
func parseAggregated(body []byte) (stream bool, err error) {
	trimmed := bytes.TrimSpace(body)
	if err := validObject(trimmed); err != nil {
		return false, err
	}
	var raw []byte
	eachMember(trimmed, func(m jsonMember) bool {
		if keyIs(m.key, "stream") {
			raw = trimmed[m.val:m.end]
		}
		return true
	})
	if raw != nil && !isNull(raw) {
		switch string(raw) {
		case "true":
			return true, nil
		case "false":
		default:
			return false, invalid("'stream' must be a boolean")
		}
	}
	return false, nil
}
