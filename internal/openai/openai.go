// Package openai holds the OpenAI error shape PegaFlow reads and writes:
// the router relays a backend's error message to its client, the bench
// reports it, and the simulator and the router answer in it.
package openai

import (
	"bytes"
	"encoding/json"
	"unicode/utf8"
)

// MaxMessageLen bounds a message ErrorMessage returns (before "...").
const MaxMessageLen = 512

// ErrorMessage extracts the error message of an HTTP error body: the
// OpenAI/vLLM {"error": {"message": ...}} shape, {"error": "..."},
// {"message": ...}, FastAPI's {"detail": ...}, or a plain-text body. The
// message is cut to MaxMessageLen bytes on a rune boundary. "" when there
// is nothing readable (empty, malformed JSON, an HTML page, not UTF-8).
func ErrorMessage(body []byte) string {
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
			return truncate(inner.Message)
		case json.Unmarshal(e.Error, &s) == nil && s != "":
			return truncate(s)
		case e.Message != "":
			return truncate(e.Message)
		case json.Unmarshal(e.Detail, &s) == nil && s != "":
			return truncate(s)
		case len(e.Detail) > 0:
			return truncate(string(e.Detail))
		}
		return ""
	}
	if body[0] == '<' || !utf8.Valid(body) {
		return ""
	}
	return truncate(string(body))
}

// truncate cuts s to MaxMessageLen bytes without splitting a rune.
func truncate(s string) string {
	if len(s) <= MaxMessageLen {
		return s
	}
	cut := MaxMessageLen
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + "..."
}

// errorBody is the OpenAI error answer: {"error": {"message", "type", "code"}}.
type errorBody struct {
	Error struct {
		Message string `json:"message"`
		Type    string `json:"type"`
		Code    int    `json:"code"`
	} `json:"error"`
}

// ErrorBody is the OpenAI error answer with message msg, type typ (e.g.
// "invalid_request_error", "server_error") and code (the HTTP status), to
// be marshalled as JSON.
func ErrorBody(msg, typ string, code int) any {
	var b errorBody
	b.Error.Message, b.Error.Type, b.Error.Code = msg, typ, code
	return b
}
