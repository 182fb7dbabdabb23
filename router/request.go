package router

import (
	"bytes"
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
	"sync"
)

// Keys of kv_transfer_params (docs/design.md).
const (
	kvDoRemoteDecode  = "do_remote_decode"
	kvDoRemotePrefill = "do_remote_prefill"
	kvTransferID      = "pegaflow_transfer_id"
	kvReadyURL        = "pegaflow_ready_url"
	kvReadyToken      = "pegaflow_ready_token"
)

// openAIRequest is a validated client body kept as its top-level fields in
// raw form: the router rewrites a few keys for each leg and never decodes
// (or re-encodes) prompts and messages, which are most of the bytes.
type openAIRequest struct {
	fields map[string]json.RawMessage
	keys   []string // sorted, for deterministic encoding
	model  string
	stream bool
}

// badRequest is a validation failure: 400 with message.
type badRequest struct{ msg string }

func (e *badRequest) Error() string { return e.msg }

func invalid(format string, a ...any) error { return &badRequest{fmt.Sprintf(format, a...)} }

// parseRequest validates one /v1/completions (chat=false) or
// /v1/chat/completions (chat=true) body. Batched prompts and n>1 are
// rejected: one request is one P/D transfer.
func parseRequest(body []byte, chat bool) (*openAIRequest, error) {
	body = bytes.TrimSpace(body)
	if len(body) == 0 || body[0] != '{' {
		return nil, invalid("request body must be a JSON object")
	}
	fields := map[string]json.RawMessage{}
	if err := json.Unmarshal(body, &fields); err != nil {
		return nil, invalid("request body is not valid JSON: %v", err)
	}
	req := &openAIRequest{fields: fields}
	if err := json.Unmarshal(fields["model"], &req.model); err != nil || req.model == "" {
		return nil, invalid("'model' is required (a non-empty string)")
	}
	if raw, ok := fields["stream"]; ok && !isNull(raw) {
		if err := json.Unmarshal(raw, &req.stream); err != nil {
			return nil, invalid("'stream' must be a boolean")
		}
	}
	if raw, ok := fields["n"]; ok && !isNull(raw) {
		var n float64
		if err := json.Unmarshal(raw, &n); err != nil || n != 1 {
			return nil, invalid("'n' must be 1: the P/D router serves one completion per request")
		}
	}
	if raw, ok := fields["best_of"]; ok && !isNull(raw) {
		var n float64
		if err := json.Unmarshal(raw, &n); err != nil || n > 1 {
			return nil, invalid("'best_of' > 1 is not supported by the P/D router")
		}
	}
	if chat {
		if err := checkMessages(fields["messages"]); err != nil {
			return nil, err
		}
	} else if err := checkPrompt(fields["prompt"]); err != nil {
		return nil, err
	}
	req.keys = make([]string, 0, len(fields))
	for k := range fields {
		req.keys = append(req.keys, k)
	}
	slices.Sort(req.keys) // deterministic legs, as encoding/json would
	return req, nil
}

// Prompt errors (400).
var (
	errPromptRequired = invalid("'prompt' is required (a string or an array of token ids)")
	errPromptEmpty    = invalid("'prompt' is empty")
	errPromptShape    = invalid("'prompt' must be a string or an array of token ids")
)

// checkPrompt accepts one prompt in a shape the OpenAI API defines: a
// non-empty string, a non-empty array of token ids, or a one-element array
// of either ("s", [ids], ["s"], [[ids]]); more elements are a batch. It is
// one pass over raw that descends at most two levels, so any body is
// judged in time linear in its size: deeper nesting is no prompt and is
// refused where it starts, without looking further.
func checkPrompt(raw json.RawMessage) error {
	s := promptScanner{b: raw}
	switch s.peek() {
	case 0:
		return errPromptRequired
	case 'n':
		if isNull(raw) {
			return errPromptRequired
		}
		return errPromptShape
	case '"':
		empty, ok := s.str()
		return s.end(1, empty, ok)
	case '[':
	default:
		return errPromptShape
	}
	open := s.i
	s.i++
	switch s.peek() {
	case ']':
		return errPromptEmpty
	case '"': // ["s", ...]
		return s.end(s.prompts(s.str))
	case '[': // [[ids], ...]
		return s.end(s.prompts(func() (bool, bool) {
			k, ok := s.ids()
			return k == 0, ok
		}))
	}
	s.i = open // [ids]
	k, ok := s.ids()
	return s.end(1, k == 0, ok)
}

// promptScanner walks a prompt's JSON (already known to be well formed,
// but nothing below relies on it: malformed input is a shape error).
type promptScanner struct {
	b []byte
	i int
}

// peek skips white space and returns the next byte (0 at the end).
func (s *promptScanner) peek() byte {
	for s.i < len(s.b) {
		switch c := s.b[s.i]; c {
		case ' ', '\t', '\n', '\r':
			s.i++
		default:
			return c
		}
	}
	return 0
}

// str consumes the string at s.i; empty: it was "".
func (s *promptScanner) str() (empty, ok bool) {
	if s.peek() != '"' {
		return false, false
	}
	start := s.i
	for s.i++; s.i < len(s.b); s.i++ {
		switch s.b[s.i] {
		case '\\':
			s.i++
		case '"':
			s.i++
			return s.i-start == 2, true
		}
	}
	return false, false
}

// ids consumes an array of integers (token ids, int64 as vLLM takes them)
// at s.i and returns how many it held.
func (s *promptScanner) ids() (n int, ok bool) {
	if s.peek() != '[' {
		return 0, false
	}
	s.i++
	if s.peek() == ']' {
		s.i++
		return 0, true
	}
	ok = s.list(func() bool {
		s.peek()
		start := s.i
		for s.i < len(s.b) && (s.b[s.i] == '-' || s.b[s.i] >= '0' && s.b[s.i] <= '9') {
			s.i++
		}
		if _, err := strconv.ParseInt(string(s.b[start:s.i]), 10, 64); err != nil {
			return false
		}
		n++
		return true
	})
	return n, ok
}

// prompts consumes a list of prompts (its '[' already consumed), each
// by one, and returns how many there were and whether the first was empty.
func (s *promptScanner) prompts(one func() (empty, ok bool)) (n int, firstEmpty, ok bool) {
	ok = s.list(func() bool {
		empty, ok := one()
		if n == 0 {
			firstEmpty = empty
		}
		n++
		return ok
	})
	return n, firstEmpty, ok
}

// list consumes "elem, elem, ... ]" (the '[' already consumed), elem
// consuming one element.
func (s *promptScanner) list(elem func() bool) bool {
	for {
		if !elem() {
			return false
		}
		switch s.peek() {
		case ',':
			s.i++
		case ']':
			s.i++
			return true
		default:
			return false
		}
	}
}

// end is checkPrompt's verdict once the value was consumed: n prompts
// given, the first empty, ok when the shape held.
func (s *promptScanner) end(n int, empty, ok bool) error {
	switch {
	case !ok || s.peek() != 0:
		return errPromptShape
	case n > 1:
		return invalid("batched prompts (%d) are not supported by the P/D router: send one prompt per request", n)
	case empty:
		return errPromptEmpty
	}
	return nil
}

// checkMessages accepts a non-empty array of message objects. One level
// is decoded (linear in the body); what a message holds is the backend's
// to judge.
func checkMessages(raw json.RawMessage) error {
	var msgs []json.RawMessage
	if err := json.Unmarshal(raw, &msgs); err != nil || len(msgs) == 0 {
		return invalid("'messages' is required (a non-empty array)")
	}
	for _, m := range msgs {
		if len(m) == 0 || m[0] != '{' {
			return invalid("'messages' must be an array of message objects")
		}
	}
	return nil
}

// parseAggregated checks an aggregated-mode body: a JSON object whose
// "stream", when present, is a boolean (the router must know whether to
// relay SSE). Everything else is the backend's to judge, batches and n>1
// included: the body goes through unchanged.
func parseAggregated(body []byte) (stream bool, err error) {
	trimmed := bytes.TrimSpace(body)
	if len(trimmed) == 0 || trimmed[0] != '{' {
		return false, invalid("request body must be a JSON object")
	}
	var probe struct {
		Stream json.RawMessage `json:"stream"`
	}
	if err := json.Unmarshal(trimmed, &probe); err != nil {
		return false, invalid("request body is not valid JSON: %v", err)
	}
	if len(probe.Stream) > 0 && !isNull(probe.Stream) {
		if err := json.Unmarshal(probe.Stream, &stream); err != nil {
			return false, invalid("'stream' must be a boolean")
		}
	}
	return stream, nil
}

func isNull(raw json.RawMessage) bool { return string(bytes.TrimSpace(raw)) == "null" }

// Pre-encoded values for the legs.
var (
	rawOne   = json.RawMessage("1")
	rawFalse = json.RawMessage("false")
	rawTrue  = json.RawMessage("true")
)

// encode writes the request as a JSON object into buf with overrides
// applied (a nil override value removes the key). The client's keys come
// sorted, new keys last in the order given.
func (r *openAIRequest) encode(buf *bytes.Buffer, overrides ...override) {
	buf.WriteByte('{')
	first := true
	writeField := func(k string, v json.RawMessage) {
		if !first {
			buf.WriteByte(',')
		}
		first = false
		writeJSONString(buf, k)
		buf.WriteByte(':')
		buf.Write(v)
	}
	for _, k := range r.keys {
		v := r.fields[k]
		if o, ok := findOverride(overrides, k); ok {
			if o.value == nil {
				continue
			}
			v = o.value
		}
		writeField(k, v)
	}
	for _, o := range overrides {
		if _, exists := r.fields[o.key]; !exists && o.value != nil && !o.onlyIfPresent {
			writeField(o.key, o.value)
		}
	}
	buf.WriteByte('}')
}

type override struct {
	key           string
	value         json.RawMessage // nil: drop the key
	onlyIfPresent bool            // replace the key only when the client sent it
}

func findOverride(list []override, k string) (override, bool) {
	for _, o := range list {
		if o.key == k {
			return o, true
		}
	}
	return override{}, false
}

// prefillBody: the client's body with max_tokens=1 (and
// max_completion_tokens=1 when present), stream=false, no stream_options,
// and the router's kv_transfer_params.
func (r *openAIRequest) prefillBody(buf *bytes.Buffer, kvParams json.RawMessage) {
	r.encode(buf,
		override{key: "max_tokens", value: rawOne},
		override{key: "max_completion_tokens", value: rawOne, onlyIfPresent: true},
		override{key: "stream", value: rawFalse},
		override{key: "stream_options"},
		override{key: "kv_transfer_params", value: kvParams},
	)
}

// decodeBody: the client's body with the decode leg's kv_transfer_params
// (nil: none).
func (r *openAIRequest) decodeBody(buf *bytes.Buffer, kvParams json.RawMessage) {
	if kvParams == nil {
		r.encode(buf, override{key: "kv_transfer_params"})
		return
	}
	r.encode(buf, override{key: "kv_transfer_params", value: kvParams})
}

// prefillParams is the prefill leg's kv_transfer_params.
func prefillParams(buf *bytes.Buffer, transferID, readyURL, token string) json.RawMessage {
	buf.Reset()
	buf.WriteString(`{"do_remote_decode":true,"do_remote_prefill":false,"pegaflow_transfer_id":`)
	writeJSONString(buf, transferID)
	if readyURL != "" {
		buf.WriteString(`,"pegaflow_ready_url":`)
		writeJSONString(buf, readyURL)
	}
	buf.WriteString(`,"pegaflow_ready_token":`)
	writeJSONString(buf, token)
	buf.WriteByte('}')
	return buf.Bytes()
}

// parsePrefillParams reads the kv_transfer_params of P's answer (raw,
// may be empty or null: none). Anything but an object is an error.
func parsePrefillParams(fromP json.RawMessage) (map[string]json.RawMessage, error) {
	params := map[string]json.RawMessage{}
	if len(fromP) > 0 && !isNull(fromP) {
		if err := json.Unmarshal(fromP, &params); err != nil {
			return nil, fmt.Errorf("prefill kv_transfer_params is not a JSON object: %w", err)
		}
	}
	return params, nil
}

// hasTransferID: P's kv_transfer_params carry pegaflow_transfer_id, which
// the PegaFlow connector returns when it saved (or is saving) the prompt's
// KV. A P without the connector returns none: no KV will ever come.
func hasTransferID(fromP map[string]json.RawMessage) bool {
	_, ok := fromP[kvTransferID]
	return ok
}

// decodeParams merges P's kv_transfer_params (parsePrefillParams; nil:
// none) with the router's keys, which win. The ready token never goes to
// D: it only authenticates the engine's report to the router. merged is
// changed.
func decodeParams(merged map[string]json.RawMessage, transferID string) (json.RawMessage, error) {
	if merged == nil {
		merged = map[string]json.RawMessage{}
	}
	delete(merged, kvReadyToken)
	delete(merged, kvReadyURL)
	id, _ := json.Marshal(transferID)
	merged[kvTransferID] = id
	merged[kvDoRemotePrefill] = rawTrue
	merged[kvDoRemoteDecode] = rawFalse
	return json.Marshal(merged)
}

var bufPool = sync.Pool{New: func() any { return new(bytes.Buffer) }}

func getBuf() *bytes.Buffer {
	b := bufPool.Get().(*bytes.Buffer)
	b.Reset()
	return b
}

// putBuf returns b to the pool unless it grew huge (one giant prompt must
// not pin memory forever).
func putBuf(b *bytes.Buffer) {
	if b.Cap() <= 4<<20 {
		bufPool.Put(b)
	}
}

// writeJSONString writes s as a JSON string.
func writeJSONString(buf *bytes.Buffer, s string) {
	if isPlainASCII(s) {
		buf.WriteByte('"')
		buf.WriteString(s)
		buf.WriteByte('"')
		return
	}
	b, _ := json.Marshal(s)
	buf.Write(b)
}

// isPlainASCII: printable ASCII needing no JSON escape (and none of the
// HTML characters encoding/json escapes, so both paths agree).
func isPlainASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c < 0x20 || c >= 0x7f || c == '"' || c == '\\' || c == '<' || c == '>' || c == '&' {
			return false
		}
	}
	return true
}
