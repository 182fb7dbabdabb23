// Package bench is PegaFlow's serving benchmark: the measuring tool behind
// `pegaflow bench`. It drives any OpenAI-compatible endpoint with streaming
// requests and reports the metrics of vLLM's `bench serve` with the same
// definitions:
//
//   - TTFT: time from sending a request to the first chunk carrying text;
//   - ITL: every gap between consecutive text chunks, pooled over requests;
//   - TPOT_i = (latency_i - TTFT_i) / (output_tokens_i - 1), output tokens
//     from the stream's usage (stream_options.include_usage), requests with
//     one output token excluded;
//   - E2EL: latency_i, from sending to the last text chunk;
//   - throughput: completed requests, output tokens, and input+output
//     tokens per second of benchmark duration.
//
// A request fails on a connection error, a non-200 status, an error event in
// the stream, a stream that ends without [DONE], or its deadline; failed
// requests are counted and reported, never folded into the latencies.
//
// Files: bench.go Config, its validation and Run (the send loop);
// flags.go the flags (BindFlags); dataset.go the random prompts
// (RandomDataset); arrival.go the send times (Arrivals); request.go one
// streaming request and what it measured (Record); metrics.go the
// summaries (Result, Stats, Percentile); report.go the table and JSON
// output; plot.go the SVG of the latency distributions; scrape.go
// reading /metrics pages (Scrape, Sample); multiturn.go the multi-turn chat
// workload (Users > 0); progress.go the
// progress bar.
package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"
)

// Bounds of the multi-turn workload: enough for any lab, small enough
// that a typo cannot plan gigabytes of text.
const (
	maxUsers = 100000
	maxTurns = 1000
	maxWords = 1 << 20
)

// Endpoints.
const (
	EndpointCompletions = "/v1/completions"
	EndpointChat        = "/v1/chat/completions"
)

// Config describes one benchmark run. Start from DefaultConfig.
type Config struct {
	// BaseURL is the server, e.g. http://127.0.0.1:8080.
	BaseURL string
	// Endpoint is EndpointCompletions or EndpointChat.
	Endpoint string
	// Model is sent in every request; empty means the first model listed
	// by GET /v1/models.
	Model string
	// APIKey, when set, is sent as a Bearer token.
	APIKey     string
	NumPrompts int
	// RequestRate in requests/s; +Inf sends every request at once.
	RequestRate float64
	// Burstiness is the gamma shape of the gaps (1 = Poisson).
	Burstiness float64
	// MaxConcurrency caps requests in flight (0 = no cap). A request that
	// arrives while the cap is reached waits; its latencies start when sent.
	MaxConcurrency int
	Seed           int64
	// Random dataset: lengths in tokens (words), see RandomDataset.
	InputLen, OutputLen, PrefixLen int
	RangeRatio                     float64
	// IgnoreEOS sends ignore_eos and min_tokens = max_tokens so every
	// request generates exactly its output length (vLLM extensions).
	IgnoreEOS bool
	// Timeout bounds each request, from send to the end of its stream.
	Timeout time.Duration
	// Percentiles to report besides mean and median, each in (0, 100].
	Percentiles []float64
	// Multi-turn chat (multiturn.go): Users > 0 runs Users conversations
	// of Turns turns (user messages of InputLen words, answers of
	// OutputLen tokens) sharing a system prompt of SystemPromptLen words,
	// each turn sent ThinkTime (mean, exponential) after the previous
	// answer; NumPrompts and Prompts are then unused.
	Users, Turns, SystemPromptLen int
	ThinkTime                     time.Duration
	// Prompts, when non-nil, replaces the random dataset (NumPrompts is
	// then len(Prompts)).
	Prompts []Prompt
	// HTTPClient, when non-nil, sends the requests (its Timeout should be
	// zero: Timeout above bounds each request).
	HTTPClient *http.Client
}

// DefaultConfig returns the defaults of `pegaflow bench`.
func DefaultConfig() Config {
	return Config{
		BaseURL:     "http://127.0.0.1:8080",
		Endpoint:    EndpointCompletions,
		NumPrompts:  100,
		RequestRate: math.Inf(1),
		Burstiness:  1,
		InputLen:    1024,
		OutputLen:   128,
		Turns:       4,
		IgnoreEOS:   true,
		Timeout:     5 * time.Minute,
		Percentiles: []float64{99},
	}
}

// Validate reports the first invalid field.
func (c *Config) Validate() error {
	switch {
	case c.BaseURL == "" || !(strings.HasPrefix(c.BaseURL, "http://") || strings.HasPrefix(c.BaseURL, "https://")):
		return fmt.Errorf("base URL %q: want http://host:port", c.BaseURL)
	case c.Endpoint != EndpointCompletions && c.Endpoint != EndpointChat:
		return fmt.Errorf("endpoint %q: want %s or %s", c.Endpoint, EndpointCompletions, EndpointChat)
	case c.Prompts == nil && c.NumPrompts < 1:
		return fmt.Errorf("num-prompts %d: want at least 1", c.NumPrompts)
	case c.Prompts != nil && len(c.Prompts) == 0:
		return errors.New("empty prompt list")
	case math.IsNaN(c.RequestRate) || c.RequestRate <= 0:
		return fmt.Errorf("request rate %v: want a positive number or inf", c.RequestRate)
	case math.IsNaN(c.Burstiness) || math.IsInf(c.Burstiness, 0) || c.Burstiness <= 0:
		return fmt.Errorf("burstiness %v: want a positive number", c.Burstiness)
	case c.MaxConcurrency < 0:
		return fmt.Errorf("max concurrency %d: want 0 (no cap) or more", c.MaxConcurrency)
	case c.Prompts == nil && (c.InputLen < 0 || c.PrefixLen < 0 || c.InputLen+c.PrefixLen < 1):
		return fmt.Errorf("input length %d + prefix %d: want at least 1 token", c.InputLen, c.PrefixLen)
	case c.Prompts == nil && c.OutputLen < 1:
		return fmt.Errorf("output length %d: want at least 1", c.OutputLen)
	case math.IsNaN(c.RangeRatio) || c.RangeRatio < 0 || c.RangeRatio >= 1:
		return fmt.Errorf("range ratio %v: want 0 <= ratio < 1", c.RangeRatio)
	case c.Users < 0 || c.Users > maxUsers || (c.Users > 0 && (c.Turns < 1 || c.Turns > maxTurns)):
		return fmt.Errorf("users %d x turns %d: want 1..%d users and 1..%d turns (or no users: one-turn prompts)", c.Users, c.Turns, maxUsers, maxTurns)
	case c.Users > 0 && c.Endpoint != EndpointChat:
		return fmt.Errorf("multi-turn (--users) sends chats: use --endpoint %s", EndpointChat)
	case c.Users > 0 && c.Prompts != nil:
		return errors.New("multi-turn (--users) draws its own messages: give no prompt list")
	case c.SystemPromptLen < 0 || c.SystemPromptLen > maxWords:
		return fmt.Errorf("system prompt length %d: want 0..%d", c.SystemPromptLen, maxWords)
	case c.ThinkTime < 0 || c.ThinkTime > time.Hour:
		return fmt.Errorf("think time %s: want 0..1h", c.ThinkTime)
	case c.Timeout <= 0:
		return fmt.Errorf("timeout %s: want a positive duration", c.Timeout)
	}
	for _, p := range c.Percentiles {
		if math.IsNaN(p) || p <= 0 || p > 100 {
			return fmt.Errorf("percentile %v: want 0 < p <= 100", p)
		}
	}
	return nil
}

func (c *Config) url(path string) string { return strings.TrimRight(c.BaseURL, "/") + path }

func (c *Config) rateString() string {
	if math.IsInf(c.RequestRate, 1) {
		return "inf"
	}
	return fmt.Sprintf("%g", c.RequestRate)
}

// Run executes the benchmark. progress, when non-nil, receives a live
// progress bar (a terminal) or periodic progress lines (anything else).
// When ctx ends early, Run returns the partial result (unsent requests in
// NotSent, in-flight ones failed as "canceled") together with ctx's error.
func Run(ctx context.Context, cfg Config, progress io.Writer) (*Result, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	hc := cfg.HTTPClient
	if hc == nil {
		tr := &http.Transport{
			Proxy:               http.ProxyFromEnvironment,
			DialContext:         (&net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
			MaxIdleConns:        0,
			MaxIdleConnsPerHost: 1024,
			IdleConnTimeout:     90 * time.Second,
			DisableCompression:  true,
		}
		defer tr.CloseIdleConnections()
		hc = &http.Client{Transport: tr}
	}
	if cfg.Model == "" {
		m, err := FirstModel(ctx, hc, cfg.BaseURL, cfg.APIKey, min(cfg.Timeout, 30*time.Second))
		if err != nil {
			return nil, err
		}
		cfg.Model = m
	}
	if cfg.Users > 0 {
		return runTurns(ctx, cfg, hc, progress)
	}
	prompts := cfg.Prompts
	if prompts == nil {
		prompts = RandomDataset(cfg.NumPrompts, cfg.InputLen, cfg.OutputLen, cfg.PrefixLen, cfg.RangeRatio, cfg.Seed)
	}
	arrivals := Arrivals(len(prompts), cfg.RequestRate, cfg.Burstiness, cfg.Seed)
	res := &Result{
		Endpoint: cfg.Endpoint, BaseURL: cfg.BaseURL, Model: cfg.Model, NumPrompts: len(prompts),
		RequestRate: cfg.rateString(), Burstiness: cfg.Burstiness, MaxConcurrency: cfg.MaxConcurrency,
		Percentiles: cfg.Percentiles, Records: make([]Record, len(prompts)),
	}
	var sem chan struct{}
	if cfg.MaxConcurrency > 0 {
		sem = make(chan struct{}, cfg.MaxConcurrency)
	}
	prog := newProgress(progress, len(prompts))
	defer prog.stop()

	start := time.Now()
	res.Started = start
	var (
		wg      sync.WaitGroup
		mu      sync.Mutex
		lastEnd time.Time
		sent    int
	)
	timer := time.NewTimer(0)
	defer timer.Stop()
	<-timer.C
loop:
	for i := range prompts {
		if wait := time.Until(start.Add(arrivals[i])); wait > 0 {
			timer.Reset(wait)
			select {
			case <-timer.C:
			case <-ctx.Done():
				break loop
			}
		}
		if sem != nil {
			select {
			case sem <- struct{}{}:
			case <-ctx.Done():
				break loop
			}
		}
		if ctx.Err() != nil {
			break
		}
		sent++
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			rec := &res.Records[i]
			rec.Index = i
			rec.Sent = time.Since(start)
			doRequest(ctx, hc, &cfg, prompts[i], rec)
			end := time.Now()
			if sem != nil {
				<-sem
			}
			mu.Lock()
			if end.After(lastEnd) {
				lastEnd = end
			}
			mu.Unlock()
			prog.done(rec.OK())
		}(i)
	}
	wg.Wait()
	prog.stop()
	res.NotSent = len(prompts) - sent
	if lastEnd.IsZero() {
		lastEnd = time.Now()
	}
	res.Duration = lastEnd.Sub(start)
	res.Records = res.Records[:sent]
	summarize(res)
	return res, ctx.Err()
}

// runTurns is Run for the multi-turn workload.
func runTurns(ctx context.Context, cfg Config, hc *http.Client, progress io.Writer) (*Result, error) {
	total := cfg.Users * cfg.Turns
	res := &Result{
		Endpoint: cfg.Endpoint, BaseURL: cfg.BaseURL, Model: cfg.Model, NumPrompts: total,
		RequestRate: cfg.rateString(), Burstiness: cfg.Burstiness, MaxConcurrency: cfg.MaxConcurrency,
		Percentiles: cfg.Percentiles, Started: time.Now(),
	}
	prog := newProgress(progress, total)
	runMultiTurn(ctx, &cfg, hc, res, prog)
	prog.stop()
	var last time.Time
	for _, r := range res.Records {
		last = maxTime(last, res.Started.Add(r.Sent+r.Latency))
	}
	if last.IsZero() {
		last = time.Now()
	}
	res.Duration = last.Sub(res.Started)
	summarize(res)
	return res, ctx.Err()
}

func maxTime(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}

// FirstModel returns the first model id listed by GET baseURL/v1/models.
func FirstModel(ctx context.Context, hc *http.Client, baseURL, apiKey string, timeout time.Duration) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	url := strings.TrimRight(baseURL, "/") + "/v1/models"
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return "", err
	}
	if apiKey != "" {
		req.Header.Set("Authorization", "Bearer "+apiKey)
	}
	resp, err := hc.Do(req)
	if err != nil {
		return "", fmt.Errorf("list models: %w", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return "", fmt.Errorf("list models: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("list models: GET %s: HTTP %d: %s", url, resp.StatusCode, errorMessage(body))
	}
	var list struct {
		Data []struct {
			ID string `json:"id"`
		} `json:"data"`
	}
	if err := json.Unmarshal(body, &list); err != nil {
		return "", fmt.Errorf("list models: GET %s: %w", url, err)
	}
	if len(list.Data) == 0 || list.Data[0].ID == "" {
		return "", fmt.Errorf("list models: GET %s lists no model; pass --model", url)
	}
	return list.Data[0].ID, nil
}
