package router

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
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

// openAIRequest is a validated client body kept as it came, with the
// place of each top-level member: the router rewrites a few keys for each
// leg by copying the other members verbatim, and never decodes (or
// re-encodes) prompts and messages, which are most of the bytes.
type openAIRequest struct {
	body    []byte
	members []reqMember
	// last[k] is 1 + the index in members of the last member named k (0:
	// absent); the last of duplicate keys is the one that counts, as with
	// encoding/json and the backends' JSON parsers.
	last   [numKeys]int
	inline [12]reqMember // members' storage for ordinary bodies
	model  string
	stream bool
}

// reqMember is one top-level member: body[start:end] is `"key": value`,
// body[val:end] the value.
type reqMember struct {
	key             fieldKey
	start, val, end int32 // a body is at most --max-body-bytes, far below 2 GiB
}

// value is the raw value of the last member named k (nil: absent).
func (r *openAIRequest) value(k fieldKey) []byte {
	if r.last[k] == 0 {
		return nil
	}
	m := r.members[r.last[k]-1]
	return r.body[m.val:m.end]
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
func parseRequest(body []byte, chat bool) (*openAIRequest, error) {
	body = bytes.TrimSpace(body)
	if err := validObject(body); err != nil {
		return nil, err
	}
	req := &openAIRequest{body: body}
	req.members = req.inline[:0]
	eachMember(body, func(m jsonMember) bool {
		k := classifyKey(m.key)
		req.members = append(req.members, reqMember{key: k, start: int32(m.start), val: int32(m.val), end: int32(m.end)})
		if k != keyOther {
			req.last[k] = len(req.members)
		}
		return true
	})
	model := req.value(keyModel)
	if len(model) < 3 || model[0] != '"' || !unquote(model, &req.model) || req.model == "" {
		return nil, invalid("'model' is required (a non-empty string)")
	}
	if raw := req.value(keyStream); raw != nil && !isNull(raw) {
		switch string(raw) {
		case "true":
			req.stream = true
		case "false":
		default:
			return nil, invalid("'stream' must be a boolean")
		}
	}
	if raw := req.value(keyN); raw != nil && !isNull(raw) {
		if n, ok := jsonNumber(raw); !ok || n != 1 {
			return nil, invalid("'n' must be 1: the P/D router serves one completion per request")
		}
	}
	if raw := req.value(keyBestOf); raw != nil && !isNull(raw) {
		if n, ok := jsonNumber(raw); !ok || n > 1 {
			return nil, invalid("'best_of' > 1 is not supported by the P/D router")
		}
	}
	if chat {
		if err := checkMessages(req.value(keyMessages)); err != nil {
			return nil, err
		}
	} else if err := checkPrompt(req.value(keyPrompt)); err != nil {
		return nil, err
	}
	return req, nil
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
// is walked (linear in the body, nothing decoded); what a message holds
// is the backend's to judge. raw is valid JSON (or nil: absent).
func checkMessages(raw []byte) error {
	errRequired := invalid("'messages' is required (a non-empty array)")
	if len(raw) == 0 || raw[0] != '[' {
		return errRequired
	}
	i := skipSpace(raw, 1)
	if i >= len(raw) || raw[i] == ']' {
		return errRequired
	}
	for i < len(raw) && raw[i] != ']' {
		if raw[i] != '{' {
			return invalid("'messages' must be an array of message objects")
		}
		i = skipSpace(raw, skipValue(raw, i))
		if i < len(raw) && raw[i] == ',' {
			i = skipSpace(raw, i+1)
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

// Pre-encoded values for the legs.
var (
	rawOne   = json.RawMessage("1")
	rawFalse = json.RawMessage("false")
	rawTrue  = json.RawMessage("true")
)

// encode writes the request as a JSON object into buf with overrides
// applied (a nil override value removes the key): the client's other
// members verbatim in their order, then the overrides' keys in the order
// given. buf is grown once, to the leg's size.
func (r *openAIRequest) encode(buf *bytes.Buffer, overrides ...override) {
	var overridden [numKeys]bool
	size := len(r.body) + 2
	for _, o := range overrides {
		overridden[o.key] = true
		size += len(keyNames[o.key]) + len(o.value) + 4
	}
	buf.Grow(size)
	buf.WriteByte('{')
	first := true
	sep := func() {
		if !first {
			buf.WriteByte(',')
		}
		first = false
	}
	for _, m := range r.members {
		if !overridden[m.key] {
			sep()
			buf.Write(r.body[m.start:m.end])
		}
	}
	for _, o := range overrides {
		if o.value == nil || (o.onlyIfPresent && r.last[o.key] == 0) {
			continue
		}
		sep()
		buf.WriteByte('"')
		buf.WriteString(keyNames[o.key])
		buf.WriteString(`":`)
		buf.Write(o.value)
	}
	buf.WriteByte('}')
}

type override struct {
	key           fieldKey
	value         json.RawMessage // nil: drop the key
	onlyIfPresent bool            // replace the key only when the client sent it
}

// prefillBody: the client's body with max_tokens=1 (and
// max_completion_tokens=1 when present), stream=false, no stream_options,
// and the router's kv_transfer_params.
func (r *openAIRequest) prefillBody(buf *bytes.Buffer, kvParams json.RawMessage) {
	r.encode(buf,
		override{key: keyMaxTokens, value: rawOne},
		override{key: keyMaxCompletionTokens, value: rawOne, onlyIfPresent: true},
		override{key: keyStream, value: rawFalse},
		override{key: keyStreamOptions},
		override{key: keyKVTransferParams, value: kvParams},
	)
}

// decodeBody: the client's body with the decode leg's kv_transfer_params
// (nil: none).
func (r *openAIRequest) decodeBody(buf *bytes.Buffer, kvParams json.RawMessage) {
	r.encode(buf, override{key: keyKVTransferParams, value: kvParams})
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

// prefillKV is the kv_transfer_params of P's answer: a JSON object, or
// nothing (absent or null).
type prefillKV struct{ obj []byte }

// parsePrefillParams reads the kv_transfer_params of P's answer (raw,
// valid JSON as prefillAnswerParams returns it, may be empty or null:
// none). Anything but an object is an error.
func parsePrefillParams(fromP json.RawMessage) (prefillKV, error) {
	if len(fromP) == 0 || isNull(fromP) {
		return prefillKV{}, nil
	}
	if fromP[0] != '{' || !json.Valid(fromP) {
		return prefillKV{}, errors.New("prefill kv_transfer_params is not a JSON object")
	}
	return prefillKV{obj: fromP}, nil
}

// each calls fn for each member of the params, in order.
func (p prefillKV) each(fn func(m jsonMember) bool) {
	if p.obj != nil {
		eachMember(p.obj, fn)
	}
}

// hasTransferID: P's kv_transfer_params carry pegaflow_transfer_id, which
// the PegaFlow connector returns when it saved (or is saving) the prompt's
// KV. A P without the connector returns none: no KV will ever come.
func hasTransferID(fromP prefillKV) bool {
	found := false
	fromP.each(func(m jsonMember) bool {
		found = keyIs(m.key, kvTransferID)
		return !found
	})
	return found
}

// sourceEngine is P's pegaflow_source_engine (the last one counts) when
// it is a string naming a valid host:port, else "".
func (p prefillKV) sourceEngine() string {
	var raw []byte
	p.each(func(m jsonMember) bool {
		if keyIs(m.key, kvSourceEngine) {
			raw = p.obj[m.val:m.end]
		}
		return true
	})
	var s string
	if len(raw) < 2 || raw[0] != '"' || !unquote(raw, &s) || checkHostPort(s) != nil {
		return ""
	}
	return s
}

// decodeParams merges P's kv_transfer_params (parsePrefillParams) with
// the router's keys, which win: P's other members verbatim, then the
// router's. The ready token and URL never go to D: they only serve the
// engine's report to the router. source ("" unknown) becomes
// pegaflow_source_engine; P's own is dropped (the caller chose source,
// falling back to P's).
func decodeParams(fromP prefillKV, transferID, source string) json.RawMessage {
	var buf bytes.Buffer
	buf.Grow(len(fromP.obj) + len(transferID) + len(source) + 128)
	buf.WriteByte('{')
	fromP.each(func(m jsonMember) bool {
		for _, k := range [...]string{kvReadyToken, kvReadyURL, kvTransferID, kvDoRemotePrefill, kvDoRemoteDecode, kvSourceEngine} {
			if keyIs(m.key, k) {
				return true
			}
		}
		buf.Write(fromP.obj[m.start:m.end])
		buf.WriteByte(',')
		return true
	})
	buf.WriteString(`"pegaflow_transfer_id":`)
	writeJSONString(&buf, transferID)
	buf.WriteString(`,"do_remote_prefill":true,"do_remote_decode":false`)
	if source != "" {
		buf.WriteString(`,"pegaflow_source_engine":`)
		writeJSONString(&buf, source)
	}
	buf.WriteByte('}')
	return buf.Bytes()
}

// prefillAnswerParams returns the kv_transfer_params of P's answer (nil:
// none), found by walking the answer's top level, not decoding it. The
// answer's first JSON value counts (as json.Decoder reads it); it must be
// an object or null.
func prefillAnswerParams(answer []byte) (json.RawMessage, error) {
	v := firstValue(answer)
	switch {
	case v == nil:
		var raw json.RawMessage
		err := json.Unmarshal(bytes.TrimSpace(answer), &raw)
		if err == nil {
			err = errors.New("trailing data") // unreachable: firstValue took it
		}
		return nil, err
	case isNull(v):
		return nil, nil
	case v[0] != '{':
		return nil, fmt.Errorf("answer is a JSON %s, not an object", jsonKind(v[0]))
	}
	var params []byte
	eachMember(v, func(m jsonMember) bool {
		if keyIs(m.key, "kv_transfer_params") {
			params = v[m.val:m.end] // the last one counts
		}
		return true
	})
	return params, nil
}

// jsonKind names the kind of JSON value that starts with c.
func jsonKind(c byte) string {
	switch c {
	case '[':
		return "array"
	case '"':
		return "string"
	case 't', 'f':
		return "boolean"
	}
	return "number"
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
