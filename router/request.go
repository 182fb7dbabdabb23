package router

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strconv"
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
