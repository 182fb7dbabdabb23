package bench

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"time"
)

// MarshalJSON writes durations in milliseconds.
func (r Record) MarshalJSON() ([]byte, error) {
	itl := make([]float64, len(r.ITL))
	for i, g := range r.ITL {
		itl[i] = ms(g)
	}
	return json.Marshal(struct {
		Index        int       `json:"index"`
		SentMs       float64   `json:"sent_ms"`
		PromptTokens int       `json:"prompt_tokens"`
		OutputTokens int       `json:"output_tokens"`
		UsageMissing bool      `json:"usage_missing,omitempty"`
		TTFTMs       float64   `json:"ttft_ms"`
		LatencyMs    float64   `json:"e2el_ms"`
		ITLMs        []float64 `json:"itl_ms"`
		CachedTokens int       `json:"cached_tokens,omitempty"`
		User         int       `json:"user,omitempty"`
		Turn         int       `json:"turn,omitempty"`
		Err          string    `json:"error,omitempty"`
	}{r.Index, ms(r.Sent), r.PromptTokens, r.OutputTokens, r.UsageMissing, ms(r.TTFT), ms(r.Latency), itl,
		r.CachedTokens, r.User, r.Turn, r.Err})
}

// WriteJSON writes the result, per-request records included, as indented
// JSON (durations in milliseconds unless named _ns).
func (r *Result) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}

// WriteJSONFile writes WriteJSON's output to path.
func (r *Result) WriteJSONFile(path string) error {
	return writeFile(path, r.WriteJSON)
}

func writeFile(path string, write func(io.Writer) error) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if err := write(f); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	return f.Close()
}

// WriteTable prints the result in the layout of vLLM's `bench serve`.
func (r *Result) WriteTable(w io.Writer) error {
	var b strings.Builder
	line := func(label string, v any) {
		switch x := v.(type) {
		case float64:
			fmt.Fprintf(&b, "%-40s %-10.2f\n", label, x)
		default:
			fmt.Fprintf(&b, "%-40s %v\n", label, x)
		}
	}
	head := func(title string, fill byte) {
		pad := 50 - len(title)
		if title != "" {
			pad -= 2
			title = " " + title + " "
		}
		left := pad / 2
		b.WriteString(strings.Repeat(string(fill), left) + title + strings.Repeat(string(fill), pad-left) + "\n")
	}
	head("Serving Benchmark Result", '=')
	line("Endpoint:", strings.TrimRight(r.BaseURL, "/")+r.Endpoint)
	line("Model:", r.Model)
	line("Traffic request rate:", r.RequestRate)
	if r.RequestRate != "inf" {
		line("Burstiness factor:", r.Burstiness)
	}
	mc := "none"
	if r.MaxConcurrency > 0 {
		mc = fmt.Sprint(r.MaxConcurrency)
	}
	line("Maximum request concurrency:", mc)
	line("Successful requests:", r.Completed)
	line("Failed requests:", r.Failed)
	if r.NotSent > 0 {
		line("Requests not sent (cancelled):", r.NotSent)
	}
	line("Benchmark duration (s):", r.Duration.Seconds())
	line("Total input tokens:", r.TotalInputTokens)
	line("Total generated tokens:", r.TotalOutputTokens)
	line("Request throughput (req/s):", r.RequestThroughput)
	line("Output token throughput (tok/s):", r.OutputThroughput)
	line("Total Token throughput (tok/s):", r.TotalTokenThroughput)
	metric := func(title, short string, s Stats) {
		head(title, '-')
		line("Mean "+short+" (ms):", s.Mean)
		line("Median "+short+" (ms):", s.Median)
		for _, p := range r.Percentiles {
			line("P"+pctKey(p)+" "+short+" (ms):", s.Percentiles[pctKey(p)])
		}
	}
	metric("Time to First Token", "TTFT", r.TTFT)
	metric("Time per Output Token (excl. 1st token)", "TPOT", r.TPOT)
	metric("Inter-token Latency", "ITL", r.ITL)
	metric("End-to-end Latency", "E2EL", r.E2EL)
	if r.FollowUps != nil {
		head("Multi-turn", '-')
		turn := func(label string, t TurnStats) {
			fmt.Fprintf(&b, "%-12s %5d req  TTFT mean %8.2f ms", label, t.Requests, t.TTFT.Mean)
			for _, p := range r.Percentiles {
				fmt.Fprintf(&b, "  P%s %8.2f", pctKey(p), t.TTFT.Percentiles[pctKey(p)])
			}
			fmt.Fprintf(&b, "  cached %5.1f%%\n", 100*t.CachedRatio())
		}
		for _, t := range r.Turns {
			turn(fmt.Sprintf("turn %d", t.Turn), t)
		}
		turn("turns >= 2", *r.FollowUps)
	}
	if len(r.Failures) > 0 {
		head("Failures", '-')
		for _, f := range r.Failures {
			fmt.Fprintf(&b, "%6d x %s\n", f.Count, truncate(f.Reason, 200))
		}
	}
	if r.UsageMissing > 0 {
		fmt.Fprintf(&b, "note: %d responses carried no usage; their output tokens were counted as text chunks\n", r.UsageMissing)
	}
	head("", '=')
	_, err := io.WriteString(w, b.String())
	return err
}

// Samples returns the successful requests' TTFT, ITL (pooled) and E2EL.
func (r *Result) Samples() (ttft, itl, e2el []time.Duration) {
	for i := range r.Records {
		rec := &r.Records[i]
		if !rec.OK() {
			continue
		}
		ttft = append(ttft, rec.TTFT)
		itl = append(itl, rec.ITL...)
		e2el = append(e2el, rec.Latency)
	}
	return ttft, itl, e2el
}
