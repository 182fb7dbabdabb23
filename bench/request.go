package bench

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/pegaflow/pegaflow/internal/openai"
)

// Record is what one request measured. Durations are from the moment the
// request was sent (after any wait for a concurrency slot).
type Record struct {
	Index int `json:"index"`
	// Sent is when the request was sent, relative to the benchmark start.
	Sent time.Duration `json:"sent_ns"`
	// PromptTokens is usage.prompt_tokens, or the prompt's nominal length
	// when the server reported no usage.
	PromptTokens int `json:"prompt_tokens"`
	// OutputTokens is usage.completion_tokens, or the number of content
	// chunks when the server reported no usage (UsageMissing is then set).
	OutputTokens int  `json:"output_tokens"`
	UsageMissing bool `json:"usage_missing,omitempty"`
	// TTFT is the arrival of the first chunk carrying text.
	TTFT time.Duration `json:"ttft_ns"`
	// ITL holds the gaps between consecutive text-carrying chunks.
	ITL []time.Duration `json:"itl_ns"`
	// Latency ends at the last text-carrying chunk (vLLM's definition: the
	// usage chunk and [DONE] that follow it do not count).
	Latency time.Duration `json:"latency_ns"`
	// CachedTokens is usage.prompt_tokens_details.cached_tokens: prompt
	// tokens the answering instance did not compute.
	CachedTokens int `json:"cached_tokens,omitempty"`
	// User and Turn (from 1) place a multi-turn request; 0 otherwise.
	User int `json:"user,omitempty"`
	Turn int `json:"turn,omitempty"`
	// Messages are a multi-turn request's messages (not written to JSON).
	Messages []ChatMessage `json:"-"`
	// Err is empty on success; a failed request counts in Result.Failed.
	Err string `json:"error,omitempty"`
	// Text is the generated text (not written to JSON).
	Text string `json:"-"`
}

// OK reports whether the request succeeded.
func (r *Record) OK() bool { return r.Err == "" }

type streamChunk struct {
	Choices []struct {
		Text  *string `json:"text"`
		Delta *struct {
			Content          *string `json:"content"`
			ReasoningContent *string `json:"reasoning_content"`
		} `json:"delta"`
	} `json:"choices"`
	Usage *struct {
		PromptTokens        int `json:"prompt_tokens"`
		CompletionTokens    int `json:"completion_tokens"`
		PromptTokensDetails *struct {
			CachedTokens int `json:"cached_tokens"`
		} `json:"prompt_tokens_details"`
	} `json:"usage"`
	Error json.RawMessage `json:"error"`
}

func (c *streamChunk) text() string {
	var b strings.Builder
	for _, ch := range c.Choices {
		if ch.Text != nil {
			b.WriteString(*ch.Text)
		}
		if ch.Delta != nil {
			if ch.Delta.Content != nil {
				b.WriteString(*ch.Delta.Content)
			}
			if ch.Delta.ReasoningContent != nil {
				b.WriteString(*ch.Delta.ReasoningContent)
			}
		}
	}
	return b.String()
}

func requestBody(cfg *Config, p Prompt) ([]byte, error) {
	body := map[string]any{
		"model":          cfg.Model,
		"stream":         true,
		"stream_options": map[string]any{"include_usage": true},
		"temperature":    0,
	}
	if p.Messages != nil {
		body["messages"] = p.Messages
		body["max_completion_tokens"] = p.OutputLen
	} else if cfg.Endpoint == EndpointChat {
		body["messages"] = []map[string]string{{"role": "user", "content": p.Text}}
		body["max_completion_tokens"] = p.OutputLen
	} else {
		body["prompt"] = p.Text
		body["max_tokens"] = p.OutputLen
	}
	if cfg.IgnoreEOS {
		body["ignore_eos"] = true
		body["min_tokens"] = p.OutputLen
	}
	return json.Marshal(body)
}

// doRequest sends one streaming request and measures it. It never returns
// before the request's deadline (cfg.Timeout) has passed or the stream ended.
func doRequest(ctx context.Context, hc *http.Client, cfg *Config, p Prompt, rec *Record) {
	body, err := requestBody(cfg, p)
	if err != nil {
		rec.Err = err.Error()
		return
	}
	reqCtx, cancel := context.WithTimeout(ctx, cfg.Timeout)
	defer cancel()
	rec.PromptTokens = p.InputLen
	start := time.Now()
	err = stream(reqCtx, hc, cfg, body, rec, start)
	if err != nil {
		switch {
		case ctx.Err() != nil:
			rec.Err = "canceled"
		case errors.Is(reqCtx.Err(), context.DeadlineExceeded):
			rec.Err = fmt.Sprintf("timeout after %s", cfg.Timeout)
		default:
			rec.Err = err.Error()
		}
	}
}

func stream(ctx context.Context, hc *http.Client, cfg *Config, body []byte, rec *Record, start time.Time) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, cfg.url(cfg.Endpoint), bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "text/event-stream")
	if cfg.APIKey != "" {
		req.Header.Set("Authorization", "Bearer "+cfg.APIKey)
	}
	resp, err := hc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		return fmt.Errorf("HTTP %d: %s", resp.StatusCode, errorMessage(msg))
	}
	var (
		text      strings.Builder
		chunks    int
		last      time.Time
		usageSeen bool
		event     string
	)
	br := bufio.NewReaderSize(resp.Body, 64<<10)
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			if errors.Is(err, io.EOF) {
				return errors.New("stream ended without [DONE]")
			}
			return fmt.Errorf("reading stream: %w", err)
		}
		now := time.Now()
		line = strings.TrimRight(line, "\r\n")
		switch {
		case line == "":
			event = ""
			continue
		case strings.HasPrefix(line, ":"):
			continue
		case strings.HasPrefix(line, "event:"):
			event = strings.TrimSpace(strings.TrimPrefix(line, "event:"))
			continue
		case !strings.HasPrefix(line, "data:"):
			continue
		}
		data := strings.TrimSpace(strings.TrimPrefix(line, "data:"))
		if data == "[DONE]" {
			if chunks == 0 {
				return errors.New("stream finished without any generated text")
			}
			rec.Text = text.String()
			if !usageSeen {
				rec.OutputTokens = chunks
				rec.UsageMissing = true
			}
			return nil
		}
		var c streamChunk
		if err := json.Unmarshal([]byte(data), &c); err != nil {
			return fmt.Errorf("bad stream chunk %q: %w", truncate(data, 120), err)
		}
		if event == "error" || (len(c.Error) > 0 && string(c.Error) != "null") {
			return fmt.Errorf("error event in stream: %s", errorMessage([]byte(data)))
		}
		if t := c.text(); t != "" {
			if chunks == 0 {
				rec.TTFT = now.Sub(start)
			} else {
				rec.ITL = append(rec.ITL, now.Sub(last))
			}
			chunks++
			last = now
			rec.Latency = now.Sub(start)
			text.WriteString(t)
		}
		if c.Usage != nil {
			usageSeen = true
			rec.OutputTokens = c.Usage.CompletionTokens
			if c.Usage.PromptTokens > 0 {
				rec.PromptTokens = c.Usage.PromptTokens
			}
			if d := c.Usage.PromptTokensDetails; d != nil {
				rec.CachedTokens = d.CachedTokens
			}
		}
	}
}

// errorMessage is the message of an error body (openai.ErrorMessage) or,
// when it has none (an HTML page, say), the start of the body itself.
func errorMessage(body []byte) string {
	if msg := openai.ErrorMessage(body); msg != "" {
		return msg
	}
	return truncate(strings.TrimSpace(string(body)), 200)
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}
