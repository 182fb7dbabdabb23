package sim

import (
	"encoding/json"
	"fmt"
	"net/http"
	"time"

	"github.com/labstack/echo/v4"

	"github.com/pegaflow/pegaflow/internal/ids"
	"github.com/pegaflow/pegaflow/internal/openai"
)

type usage struct {
	Prompt, Completion, Cached int
}

func (u usage) json() map[string]any {
	out := map[string]any{"prompt_tokens": u.Prompt, "completion_tokens": u.Completion, "total_tokens": u.Prompt + u.Completion}
	if u.Cached > 0 {
		out["prompt_tokens_details"] = map[string]any{"cached_tokens": u.Cached}
	}
	return out
}

// respWriter renders tokens as an OpenAI completion or chat completion,
// streamed (SSE, one event per token, flushed) or whole.
type respWriter struct {
	c       echo.Context
	p       *parsed
	model   string
	id      string
	created int64
	sentAny bool
}

func newWriter(c echo.Context, p *parsed, model string) *respWriter {
	prefix := "cmpl-"
	if p.chat {
		prefix = "chatcmpl-"
	}
	return &respWriter{c: c, p: p, model: model, id: ids.New(prefix), created: time.Now().Unix()}
}

func (w *respWriter) object(stream bool) string {
	switch {
	case w.p.chat && stream:
		return "chat.completion.chunk"
	case w.p.chat:
		return "chat.completion"
	}
	return "text_completion"
}

func (w *respWriter) start() {
	h := w.c.Response().Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	h.Set("Connection", "keep-alive")
	w.c.Response().WriteHeader(http.StatusOK)
	w.c.Response().Flush()
}

func (w *respWriter) event(v any) {
	b, _ := json.Marshal(v)
	fmt.Fprintf(w.c.Response(), "data: %s\n\n", b)
	w.c.Response().Flush()
}

func (w *respWriter) base(stream bool, choices []map[string]any) map[string]any {
	m := map[string]any{"id": w.id, "object": w.object(stream), "created": w.created, "model": w.model, "choices": choices}
	if stream && w.p.usage {
		m["usage"] = nil
	}
	return m
}

// chunk streams one token; last marks the final one (finish_reason).
func (w *respWriter) chunk(text string, last bool) {
	var finish any
	if last {
		finish = "length"
	}
	if w.p.chat {
		if !w.sentAny {
			w.event(w.base(true, []map[string]any{{"index": 0, "delta": map[string]any{"role": "assistant", "content": ""}, "logprobs": nil, "finish_reason": nil}}))
		}
		w.event(w.base(true, []map[string]any{{"index": 0, "delta": map[string]any{"content": text}, "logprobs": nil, "finish_reason": finish}}))
	} else {
		w.event(w.base(true, []map[string]any{{"index": 0, "text": text, "logprobs": nil, "finish_reason": finish, "stop_reason": nil}}))
	}
	w.sentAny = true
}

func (w *respWriter) finish(u usage) {
	if w.p.usage {
		m := w.base(true, []map[string]any{})
		m["usage"] = u.json()
		w.event(m)
	}
	fmt.Fprint(w.c.Response(), "data: [DONE]\n\n")
	w.c.Response().Flush()
}

// streamError ends a stream that already started with an error event in
// the OpenAI error shape (and [DONE], as vLLM does): never a silent cut.
func (w *respWriter) streamError(err error) {
	w.event(openai.ErrorBody(err.Error(), "server_error", http.StatusInternalServerError))
	fmt.Fprint(w.c.Response(), "data: [DONE]\n\n")
	w.c.Response().Flush()
}

func (w *respWriter) whole(text string, u usage, kvParams map[string]any) error {
	var choice map[string]any
	if w.p.chat {
		choice = map[string]any{"index": 0, "message": map[string]any{"role": "assistant", "content": text}, "logprobs": nil, "finish_reason": "length", "stop_reason": nil}
	} else {
		choice = map[string]any{"index": 0, "text": text, "logprobs": nil, "finish_reason": "length", "stop_reason": nil}
	}
	m := w.base(false, []map[string]any{choice})
	m["usage"] = u.json()
	m["kv_transfer_params"] = nil
	if kvParams != nil {
		m["kv_transfer_params"] = kvParams
	}
	return w.c.JSON(http.StatusOK, m)
}
