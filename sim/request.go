package sim

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"

	"github.com/labstack/echo/v4"

	"github.com/pegaflow/pegaflow/internal/vllmhash"
)

// maxBodyBytes bounds a request body.
const maxBodyBytes = 32 << 20

type genRequest struct {
	Model               string          `json:"model"`
	Prompt              json.RawMessage `json:"prompt"`
	Messages            []chatMessage   `json:"messages"`
	MaxTokens           *int            `json:"max_tokens"`
	MaxCompletionTokens *int            `json:"max_completion_tokens"`
	Stream              bool            `json:"stream"`
	StreamOptions       *struct {
		IncludeUsage bool `json:"include_usage"`
	} `json:"stream_options"`
	Seed             *int64         `json:"seed"`
	N                *int           `json:"n"`
	CacheSalt        string         `json:"cache_salt"`
	KVTransferParams map[string]any `json:"kv_transfer_params"`
	chatOptions
}

// chatOptions are vLLM's chat-template switches, shared by chat
// completions and /tokenize.
type chatOptions struct {
	AddGenerationPrompt  *bool `json:"add_generation_prompt"` // nil: true
	ContinueFinalMessage bool  `json:"continue_final_message"`
}

// genPrompt is whether the template opens the reply, or the error vLLM
// gives for both switches set.
func (o chatOptions) genPrompt() (bool, error) {
	gen := o.AddGenerationPrompt == nil || *o.AddGenerationPrompt
	if o.ContinueFinalMessage && o.AddGenerationPrompt != nil && gen {
		return false, badRequest("Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
	}
	// The template closes no message, so continuing the last one is
	// rendering without the generation prompt.
	return gen && !o.ContinueFinalMessage, nil
}

type chatMessage struct {
	Role    string          `json:"role"`
	Content json.RawMessage `json:"content"`
}

// httpError is a request failure with its status.
type httpError struct {
	code int
	msg  string
}

func (e *httpError) Error() string { return e.msg }

func badRequest(format string, args ...any) error {
	return &httpError{http.StatusBadRequest, fmt.Sprintf(format, args...)}
}

type role int

const (
	roleAggregated role = iota
	rolePrefill         // P: do_remote_decode
	roleDecode          // D: do_remote_prefill
)

// parsed is a validated request.
type parsed struct {
	chat      bool
	prompt    []uint32
	maxTokens int
	seed      int64
	stream    bool
	usage     bool
	salt      string
	role      role
	params    map[string]any
}

// readBody reads a request body within maxBodyBytes.
func readBody(c echo.Context) ([]byte, error) {
	body, err := io.ReadAll(http.MaxBytesReader(c.Response(), c.Request().Body, maxBodyBytes))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return nil, &httpError{http.StatusRequestEntityTooLarge, fmt.Sprintf("request body over %d bytes", maxBodyBytes)}
		}
		return nil, badRequest("reading body: %v", err)
	}
	return body, nil
}

// checkModel: a named model must be this sim's (404 otherwise, as vLLM).
func (s *Sim) checkModel(model string) error {
	if model != "" && model != s.cfg.Model {
		return &httpError{http.StatusNotFound, fmt.Sprintf("The model `%s` does not exist.", model)}
	}
	return nil
}

// chatMessages reads the messages' roles and text contents.
func chatMessages(raw []chatMessage) ([]Message, error) {
	if len(raw) == 0 {
		return nil, badRequest("messages is missing or empty")
	}
	msgs := make([]Message, len(raw))
	for i, m := range raw {
		text, err := contentText(m.Content)
		if err != nil {
			return nil, badRequest("messages[%d].content: %v", i, err)
		}
		msgs[i] = Message{Role: m.Role, Content: text}
	}
	return msgs, nil
}

// renderChat is the prompt of msgs under the chat template.
func (s *Sim) renderChat(raw []chatMessage, o chatOptions) ([]Message, []uint32, bool, error) {
	msgs, err := chatMessages(raw)
	if err != nil {
		return nil, nil, false, err
	}
	gen, err := o.genPrompt()
	if err != nil {
		return nil, nil, false, err
	}
	ids, err := s.tok.ApplyChatTemplate(msgs, gen)
	if err != nil {
		return nil, nil, false, badRequest("%v", err)
	}
	return msgs, ids, gen, nil
}

func (s *Sim) parse(c echo.Context, chat bool) (*parsed, error) {
	body, err := readBody(c)
	if err != nil {
		return nil, err
	}
	var r genRequest
	dec := json.NewDecoder(bytes.NewReader(body))
	if err := dec.Decode(&r); err != nil {
		return nil, badRequest("invalid JSON body: %v", err)
	}
	if err := s.checkModel(r.Model); err != nil {
		return nil, err
	}
	if r.N != nil && *r.N != 1 {
		return nil, badRequest("n=%d is not supported (only n=1)", *r.N)
	}
	if len(r.CacheSalt) > vllmhash.MaxSaltBytes {
		return nil, badRequest("cache_salt has %d bytes, max %d", len(r.CacheSalt), vllmhash.MaxSaltBytes)
	}
	p := &parsed{chat: chat, stream: r.Stream, salt: r.CacheSalt, params: r.KVTransferParams}
	if r.Seed != nil {
		p.seed = *r.Seed
	}
	p.usage = r.StreamOptions != nil && r.StreamOptions.IncludeUsage
	if chat {
		if _, p.prompt, _, err = s.renderChat(r.Messages, r.chatOptions); err != nil {
			return nil, err
		}
	} else {
		if p.prompt, err = s.promptTokens(r.Prompt); err != nil {
			return nil, err
		}
	}
	if len(p.prompt) == 0 {
		return nil, badRequest("the prompt is empty")
	}
	switch {
	case chat && r.MaxCompletionTokens != nil:
		p.maxTokens = *r.MaxCompletionTokens
	case r.MaxTokens != nil:
		p.maxTokens = *r.MaxTokens
	case chat:
		p.maxTokens = s.cfg.MaxModelLen - len(p.prompt)
	default:
		p.maxTokens = 16 // the OpenAI completions default
	}
	if p.maxTokens < 1 {
		return nil, badRequest("max_tokens must be at least 1, got %d", p.maxTokens)
	}
	if total := len(p.prompt) + p.maxTokens; total > s.cfg.MaxModelLen {
		return nil, badRequest("This model's maximum context length is %d tokens. However, you requested %d tokens (%d in the messages, %d in the completion).",
			s.cfg.MaxModelLen, total, len(p.prompt), p.maxTokens)
	}
	bs := s.cfg.Geometry.BlockSize
	if need := (len(p.prompt) + p.maxTokens + bs - 1) / bs; need > s.cfg.Geometry.NumBlocks {
		return nil, badRequest("the request needs %d KV blocks; this instance has %d", need, s.cfg.Geometry.NumBlocks)
	}
	if truthy(r.KVTransferParams["do_remote_decode"]) {
		p.role = rolePrefill
	} else if truthy(r.KVTransferParams["do_remote_prefill"]) {
		p.role = roleDecode
	}
	if p.role != roleAggregated && s.engine == nil {
		s.log.Warn("kv_transfer_params given but the sim has no engine; serving alone")
		p.role = roleAggregated
	}
	return p, nil
}

func truthy(v any) bool { b, ok := v.(bool); return ok && b }

// promptTokens accepts a string, a one-element list of strings, or a list
// of token ids.
func (s *Sim) promptTokens(raw json.RawMessage) ([]uint32, error) {
	if len(raw) == 0 || string(raw) == "null" {
		return nil, badRequest("prompt is missing")
	}
	var text string
	if json.Unmarshal(raw, &text) == nil {
		return s.tok.Encode(text), nil
	}
	var texts []string
	if json.Unmarshal(raw, &texts) == nil {
		if len(texts) != 1 {
			return nil, badRequest("batched prompts (%d) are not supported; send one prompt per request", len(texts))
		}
		return s.tok.Encode(texts[0]), nil
	}
	var ids []int64
	if json.Unmarshal(raw, &ids) == nil {
		out := make([]uint32, len(ids))
		for i, id := range ids {
			if id < 0 || id >= int64(s.cfg.VocabSize) {
				return nil, badRequest("prompt token %d (%d) is outside the vocabulary [0, %d)", i, id, s.cfg.VocabSize)
			}
			out[i] = uint32(id)
		}
		return out, nil
	}
	return nil, badRequest("prompt must be a string, a list with one string, or a list of token ids")
}

// contentText accepts a string or a list of {"type":"text","text":...} parts.
func contentText(raw json.RawMessage) (string, error) {
	if len(raw) == 0 || string(raw) == "null" {
		return "", nil
	}
	var s string
	if json.Unmarshal(raw, &s) == nil {
		return s, nil
	}
	var parts []struct {
		Type string `json:"type"`
		Text string `json:"text"`
	}
	if err := json.Unmarshal(raw, &parts); err != nil {
		return "", errors.New("want a string or a list of text parts")
	}
	var b strings.Builder
	for i, p := range parts {
		if p.Type != "text" {
			return "", fmt.Errorf("part %d has type %q; only text is supported", i, p.Type)
		}
		if i > 0 {
			b.WriteByte(' ')
		}
		b.WriteString(p.Text)
	}
	return b.String(), nil
}
