package router

import (
	"bytes"
	"encoding/json"
)

// The router reads and rewrites a few top-level keys of JSON objects (the
// client's body, P's answer, P's kv_transfer_params) without decoding the
// rest: json.Valid (linear, allocation-free) judges the syntax once, then
// eachMember walks the top level, skipping every value by its brackets
// and string quotes, and a leg is the client's members copied verbatim
// with the router's keys replaced.

// isSpace: JSON white space.
func isSpace(c byte) bool { return c == ' ' || c == '\t' || c == '\n' || c == '\r' }

// skipSpace returns the index of the first non-space byte at or after i.
func skipSpace(b []byte, i int) int {
	for i < len(b) && isSpace(b[i]) {
		i++
	}
	return i
}

// skipString returns the index just past the string whose opening quote
// is at b[i], or -1 when it is not closed.
func skipString(b []byte, i int) int {
	for i++; i < len(b); i++ {
		switch b[i] {
		case '\\':
			i++
		case '"':
			return i + 1
		}
	}
	return -1
}

// skipValue returns the index just past the JSON value starting at b[i]
// (no leading space), or -1 when brackets or quotes do not close. It
// judges structure only: the syntax is json.Valid's.
func skipValue(b []byte, i int) int {
	if i >= len(b) {
		return -1
	}
	switch b[i] {
	case '"':
		return skipString(b, i)
	case '{', '[':
	default: // a number or literal: up to the next delimiter
		for i < len(b) && !isSpace(b[i]) && b[i] != ',' && b[i] != '}' && b[i] != ']' && b[i] != ':' {
			i++
		}
		return i
	}
	depth := 0
	for ; i < len(b); i++ {
		switch b[i] {
		case '"':
			j := skipString(b, i)
			if j < 0 {
				return -1
			}
			i = j - 1
		case '{', '[':
			depth++
		case '}', ']':
			depth--
			if depth == 0 {
				return i + 1
			}
		}
	}
	return -1
}

// firstValue returns the first JSON value of b (leading space skipped,
// anything after it ignored, as json.Decoder reads one value), or nil
// when it is no valid JSON.
func firstValue(b []byte) []byte {
	i := skipSpace(b, 0)
	end := skipValue(b, i)
	if end < 0 || !json.Valid(b[i:end]) {
		return nil
	}
	return b[i:end]
}

// jsonMember is one top-level member of an object: b[start:end] is
// `"key": value`, b[val:end] the value, key the raw key between its quotes.
type jsonMember struct {
	key             []byte
	start, val, end int
}

// eachMember calls fn for each member of the object obj, which must be
// valid JSON (json.Valid) starting with '{' (no leading space), in order.
// It stops early when fn returns false.
func eachMember(obj []byte, fn func(m jsonMember) bool) {
	i := skipSpace(obj, 1)
	for i < len(obj) && obj[i] == '"' {
		kEnd := skipString(obj, i)
		m := jsonMember{key: obj[i+1 : kEnd-1], start: i}
		m.val = skipSpace(obj, skipSpace(obj, kEnd)+1) // past ':'
		m.end = skipValue(obj, m.val)
		if m.end < 0 || !fn(m) {
			return
		}
		i = skipSpace(obj, m.end)
		if i < len(obj) && obj[i] == ',' {
			i = skipSpace(obj, i+1)
		}
	}
}

// keyIs: the raw key (between its quotes, escapes as sent) names name.
// An escaped key is unescaped as encoding/json would (rare: no client
// needs to escape these names).
func keyIs(raw []byte, name string) bool {
	if bytes.IndexByte(raw, '\\') < 0 {
		return string(raw) == name
	}
	s, ok := unescapeKey(raw)
	return ok && s == name
}

// unescapeKey decodes a raw key that holds escapes.
func unescapeKey(raw []byte) (string, bool) {
	var s string
	q := make([]byte, 0, len(raw)+2)
	q = append(append(append(q, '"'), raw...), '"')
	return s, json.Unmarshal(q, &s) == nil
}

// isNull: raw is the JSON literal null (space around it allowed).
func isNull(raw []byte) bool { return string(bytes.TrimSpace(raw)) == "null" }
