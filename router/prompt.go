package router

import (
	"encoding/json"
	"strconv"
)

// Prompt and messages validation: one linear pass over the raw JSON, so
// any body up to --max-body-bytes is judged in time linear in its size.

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
