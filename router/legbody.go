package router

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
)

// The bodies of the legs: the client's members copied verbatim with the
// router's keys replaced, and the kv_transfer_params each leg carries.

// Pre-encoded values for the legs.
var (
	rawOne   = json.RawMessage("1")
	rawFalse = json.RawMessage("false")
)

// encode writes the request as a JSON object into buf with overrides
// applied (a nil override value removes the key): the client's other
// members verbatim in their order, then the overrides' keys in the order
// given. buf is grown once, to the leg's size.
func (rb *requestBody) encode(buf *bytes.Buffer, overrides ...override) {
	var overridden [numKeys]bool
	size := len(rb.body) + 2
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
	for _, m := range rb.members {
		if !overridden[m.key] {
			sep()
			buf.Write(rb.body[m.start:m.end])
		}
	}
	for _, o := range overrides {
		if o.value == nil || (o.onlyIfPresent && rb.last[o.key] == 0) {
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
func (rb *requestBody) prefillBody(buf *bytes.Buffer, kvParams json.RawMessage) {
	rb.encode(buf,
		override{key: keyMaxTokens, value: rawOne},
		override{key: keyMaxCompletionTokens, value: rawOne, onlyIfPresent: true},
		override{key: keyStream, value: rawFalse},
		override{key: keyStreamOptions},
		override{key: keyKVTransferParams, value: kvParams},
	)
}

// decodeBody: the client's body with the decode leg's kv_transfer_params
// (nil: none).
func (rb *requestBody) decodeBody(buf *bytes.Buffer, kvParams json.RawMessage) {
	rb.encode(buf, override{key: keyKVTransferParams, value: kvParams})
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

// aggregatedBody is the client's body for an aggregated backend: verbatim,
// except that every top-level kv_transfer_params object loses the keys
// only the router may set (pegaflow_*, do_remote_*), as P/D mode replaces
// them. A client's pegaflow_ready_url would otherwise make the backend's
// connector POST to an address the client chose, and its do_remote_* would
// make vLLM wait for, or hold, KV no router arranged. body must be valid
// JSON (parseAggregated); a body without such keys is returned as is.
func aggregatedBody(body []byte) []byte {
	obj := bytes.TrimSpace(body)
	scrub := false
	eachMember(obj, func(m jsonMember) bool {
		scrub = keyIs(m.key, keyNames[keyKVTransferParams]) && obj[m.val] == '{' && hasRouterKey(obj[m.val:m.end])
		return !scrub
	})
	if !scrub {
		return body
	}
	out := make([]byte, 0, len(obj))
	out = append(out, '{')
	eachMember(obj, func(m jsonMember) bool {
		if len(out) > 1 {
			out = append(out, ',')
		}
		if !keyIs(m.key, keyNames[keyKVTransferParams]) || obj[m.val] != '{' {
			out = append(out, obj[m.start:m.end]...)
			return true
		}
		out = append(out, obj[m.start:m.val]...)
		params := obj[m.val:m.end]
		n := len(out)
		out = append(out, '{')
		eachMember(params, func(p jsonMember) bool {
			if !routerKey(p.key) {
				if len(out) > n+1 {
					out = append(out, ',')
				}
				out = append(out, params[p.start:p.end]...)
			}
			return true
		})
		out = append(out, '}')
		return true
	})
	return append(out, '}')
}

// hasRouterKey: the kv_transfer_params object holds a router-only key.
func hasRouterKey(params []byte) bool {
	found := false
	eachMember(params, func(m jsonMember) bool {
		found = routerKey(m.key)
		return !found
	})
	return found
}

// routerKey: a raw kv_transfer_params key (escapes as sent) that only the
// router may set. A key that does not unescape counts as one (dropped).
func routerKey(raw []byte) bool {
	name := string(raw)
	if bytes.IndexByte(raw, '\\') >= 0 {
		s, ok := unescapeKey(raw)
		if !ok {
			return true
		}
		name = s
	}
	return strings.HasPrefix(name, "pegaflow_") || strings.HasPrefix(name, "do_remote_")
}
