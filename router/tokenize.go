package router

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
)

// The KV policy's prompt: the token ids vLLM will see, from the request
// itself (a prompt of token ids) or from a backend's POST /tokenize
// (vLLM's, the chat template applied), which is the only way to get
// exactly the ids the backend's tokenizer and template give.

// Bounds on a /tokenize answer: a prompt is at most maxPromptTokens ids
// (far beyond any model's context), each at most 11 bytes of JSON.
const (
	maxPromptTokens     = 1 << 21
	maxTokenizeAnswer   = 24 << 20
	pathTokenize        = "/tokenize"
	tokenizeContentType = "application/json"
)

// Fallback reasons (kv_fallbacks_total{reason}): why a request was routed
// by --kv-fallback-lb instead of by where its KV is.
const (
	fallbackMultimodal     = "multimodal"       // a message part that is not text
	fallbackUnsupported    = "unsupported"      // a request shape the router cannot hash (a batch, truncate_prompt_tokens, a non-string cache_salt)
	fallbackUnknownModel   = "unknown_model"    // /tokenize answered 404
	fallbackTokenizeError  = "tokenize_error"   // /tokenize failed or answered nonsense
	fallbackTokenizeTimout = "tokenize_timeout" // no /tokenize answer within --kv-tokenize-timeout
	fallbackNoTokenizer    = "no_backend"       // no selectable backend to tokenize on
	fallbackHashError      = "hash_error"       // a token id the hash cannot take
)

// kvPrompt is what the KV policy needs of a request body.
type kvPrompt struct {
	salt string
	// ids are the prompt's token ids when the request gave them; else
	// tokenize is the /tokenize request that gets them.
	ids      []uint32
	tokenize []byte
}

// Members of a request copied into its /tokenize request when present:
// what changes the ids (vLLM's TokenizeCompletionRequest and
// TokenizeChatRequest fields).
var tokenizeKeys = map[string]bool{
	"model": true, "add_special_tokens": true, "add_generation_prompt": true,
	"continue_final_message": true, "chat_template": true, "chat_template_kwargs": true, "tools": true,
}

// promptOf reads the KV policy's view of a request body (a valid JSON
// object, as intake checked), or the fallback reason it cannot be routed
// by KV. Linear in the body; prompts and messages are copied, not decoded.
func promptOf(body []byte, chat bool) (kvPrompt, string) {
	body = bytes.TrimSpace(body)
	var (
		p                kvPrompt
		prompt, messages []byte
		copied           [][]byte // members for /tokenize, in order
		genPrompt        bool
		bad              bool
	)
	eachMember(body, func(m jsonMember) bool {
		var key string
		if !unquote(body[m.start:m.start+len(m.key)+2], &key) {
			return true
		}
		val := body[m.val:m.end]
		switch {
		case key == "prompt":
			prompt = val
		case key == "messages":
			messages = val
		case key == "cache_salt":
			p.salt = ""
			if !isNull(val) && (val[0] != '"' || !unquote(val, &p.salt)) {
				bad = true
			}
		case key == "truncate_prompt_tokens":
			bad = bad || !isNull(val)
		case tokenizeKeys[key]:
			genPrompt = genPrompt || key == "add_generation_prompt"
			copied = append(copied, body[m.start:m.end])
		}
		return true
	})
	if bad {
		return kvPrompt{}, fallbackUnsupported
	}
	var req bytes.Buffer
	req.WriteByte('{')
	for _, c := range copied {
		req.Write(c)
		req.WriteByte(',')
	}
	if chat {
		if multimodal(messages) {
			return kvPrompt{}, fallbackMultimodal
		}
		if !genPrompt {
			req.WriteString(`"add_generation_prompt":true,`) // as chat completions default
		}
		req.WriteString(`"messages":`)
		req.Write(messages)
	} else {
		text, ids, ok := onePrompt(prompt, false)
		switch {
		case !ok:
			return kvPrompt{}, fallbackUnsupported
		case text == nil:
			p.ids = ids
			return p, ""
		}
		req.WriteString(`"prompt":`)
		req.Write(text)
	}
	req.WriteByte('}')
	p.tokenize = req.Bytes()
	return p, ""
}

// onePrompt reads a completion prompt: a string ("s" or ["s"], text is
// its JSON) or token ids ([ids] or [[ids]]); ok false for anything else
// (a batch, deeper nesting, an id out of uint32's range).
func onePrompt(raw []byte, nested bool) (text []byte, ids []uint32, ok bool) {
	raw = bytes.TrimSpace(raw)
	switch {
	case len(raw) == 0:
		return nil, nil, false
	case raw[0] == '"':
		return raw, nil, true
	case raw[0] != '[':
		return nil, nil, false
	}
	i := skipSpace(raw, 1)
	if i < len(raw) && (raw[i] == '"' || raw[i] == '[') {
		end := skipValue(raw, i)
		if nested || end < 0 {
			return nil, nil, false
		}
		if rest := skipSpace(raw, end); rest >= len(raw) || raw[rest] != ']' {
			return nil, nil, false // a batch
		}
		return onePrompt(raw[i:end], true)
	}
	ids, ok = tokenIDs(raw)
	return nil, ids, ok && len(ids) > 0
}

// tokenIDs reads a JSON array of token ids (valid JSON), each in
// [0, 2^32), at most maxPromptTokens of them.
func tokenIDs(raw []byte) ([]uint32, bool) {
	i := skipSpace(raw, 0)
	if i >= len(raw) || raw[i] != '[' {
		return nil, false
	}
	ids := make([]uint32, 0, min(len(raw)/2, maxPromptTokens))
	i = skipSpace(raw, i+1)
	if i < len(raw) && raw[i] == ']' {
		return ids, true
	}
	for i < len(raw) {
		j := i
		for j < len(raw) && raw[j] >= '0' && raw[j] <= '9' {
			j++
		}
		n, err := strconv.ParseUint(string(raw[i:j]), 10, 32)
		if err != nil || len(ids) == maxPromptTokens {
			return nil, false
		}
		ids = append(ids, uint32(n))
		i = skipSpace(raw, j)
		if i >= len(raw) {
			return nil, false
		}
		switch raw[i] {
		case ']':
			return ids, true
		case ',':
			i = skipSpace(raw, i+1)
		default:
			return nil, false
		}
	}
	return nil, false
}

// multimodal: a message whose content is a list holding a part that is
// not text (an image, audio, a video, a file): its placeholder tokens and
// the media's hashes are vLLM's, beyond the router. messages is valid JSON.
func multimodal(messages []byte) bool {
	var msgs []struct {
		Content json.RawMessage `json:"content"`
	}
	if json.Unmarshal(messages, &msgs) != nil {
		return true // not the shape the router can judge: treat it as unroutable
	}
	for _, m := range msgs {
		c := bytes.TrimSpace(m.Content)
		if len(c) == 0 || c[0] != '[' {
			continue
		}
		var parts []struct {
			Type string `json:"type"`
		}
		if json.Unmarshal(c, &parts) != nil {
			return true
		}
		for _, part := range parts {
			if part.Type != "text" {
				return true
			}
		}
	}
	return false
}

// tokenizeError is a failed /tokenize with its fallback reason.
type tokenizeError struct {
	reason string
	err    error
}

func (e *tokenizeError) Error() string { return e.reason + ": " + e.err.Error() }

// tokenize asks b for the prompt's token ids (POST /tokenize with req),
// within ctx's deadline, forwarding the client's Authorization. Anything
// but a 200 with {"tokens": [ids]} within the bounds is an error.
func (r *Router) tokenize(ctx context.Context, b *backend, authz string, req []byte) ([]uint32, error) {
	hreq, err := http.NewRequestWithContext(ctx, http.MethodPost, b.base+pathTokenize, bytes.NewReader(req))
	if err != nil {
		return nil, &tokenizeError{fallbackTokenizeError, err}
	}
	hreq.Header.Set("Content-Type", tokenizeContentType)
	if authz != "" {
		hreq.Header.Set("Authorization", authz)
	}
	fail := func(err error) error {
		if ctx.Err() != nil {
			return &tokenizeError{fallbackTokenizeTimout, err}
		}
		return &tokenizeError{fallbackTokenizeError, err}
	}
	resp, err := r.client.Do(hreq)
	if err != nil {
		return nil, fail(redactURLError(err))
	}
	defer resp.Body.Close()
	switch {
	case resp.StatusCode == http.StatusNotFound:
		return nil, &tokenizeError{fallbackUnknownModel, fmt.Errorf("%s answered 404", b.name+pathTokenize)}
	case resp.StatusCode != http.StatusOK:
		return nil, &tokenizeError{fallbackTokenizeError, fmt.Errorf("%s answered %d", b.name+pathTokenize, resp.StatusCode)}
	case resp.ContentLength > maxTokenizeAnswer:
		return nil, &tokenizeError{fallbackTokenizeError, errors.New("tokenize answer too large")}
	}
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxTokenizeAnswer+1))
	if err != nil {
		return nil, fail(err)
	}
	if len(data) > maxTokenizeAnswer {
		return nil, &tokenizeError{fallbackTokenizeError, errors.New("tokenize answer too large")}
	}
	ids, err := tokenizeAnswer(data)
	if err != nil {
		return nil, &tokenizeError{fallbackTokenizeError, err}
	}
	return ids, nil
}

// tokenizeAnswer reads vLLM's {"tokens": [ids], "count": n, ...}.
func tokenizeAnswer(data []byte) ([]uint32, error) {
	data = bytes.TrimSpace(data)
	if err := validObject(data); err != nil {
		return nil, errors.New("tokenize answer is not a JSON object")
	}
	var raw []byte
	eachMember(data, func(m jsonMember) bool {
		if keyIs(m.key, "tokens") {
			raw = data[m.val:m.end]
		}
		return true
	})
	if raw == nil {
		return nil, errors.New(`tokenize answer has no "tokens"`)
	}
	ids, ok := tokenIDs(raw)
	if !ok {
		return nil, fmt.Errorf(`tokenize answer's "tokens" is not a list of at most %d token ids`, maxPromptTokens)
	}
	return ids, nil
}
