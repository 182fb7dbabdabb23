package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"math"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

const ms1 = time.Millisecond

func testConfig(base string, prompts ...string) Config {
	cfg := DefaultConfig()
	cfg.BaseURL = base
	cfg.Timeout = 10 * time.Second
	for _, p := range prompts {
		cfg.Prompts = append(cfg.Prompts, Prompt{Text: p, InputLen: 1, OutputLen: 8})
	}
	return cfg
}

// scriptUnit is the time unit of TestMetricsOnScriptedBackend's script:
// its gaps are multiples of 100 units (200 ms), so a wrong definition
// moves a figure by >= 100 ms, while scheduling on a loaded 2-core CI
// machine only ever delays chunks, by tens of ms.
const scriptUnit = 2 * time.Millisecond

// within asserts got (ms) is want (script units) up to that noise: never
// early (but for the clock's granularity), at most 90 ms late.
func within(t *testing.T, want, got float64, what string) {
	t.Helper()
	withinBy(t, want, got, 5, what)
}

// withinGap is within for a figure made of gaps between two chunks (ITL,
// TPOT):
// a delayed earlier chunk makes the next gap shorter, so such a figure may
// be early by as much as a chunk may be late.
func withinGap(t *testing.T, want, got float64, what string) {
	t.Helper()
	withinBy(t, want, got, 90, what)
}

func withinBy(t *testing.T, want, got, early float64, what string) {
	t.Helper()
	want *= float64(scriptUnit) / float64(time.Millisecond)
	require.GreaterOrEqual(t, got, want-early, "%s: want %.1f ms, got %.1f ms (early)", what, want, got)
	require.LessOrEqual(t, got, want+90, "%s: want %.1f ms, got %.1f ms (late)", what, want, got)
}

// The timings below are scripted exactly, in script units; the expected
// values are computed by hand from the definitions in the package doc.
//
//	A: TTFT 100, chunks at 100, 200, 300; usage 3 tokens, prompt 10
//	   -> ITL [100, 100], E2EL 300, TPOT (300-100)/2 = 100
//	B: TTFT 200, chunks at 200, 500; usage 5 tokens (multi-token chunk), prompt 20
//	   -> ITL [300], E2EL 500, TPOT (500-200)/4 = 75
//	C: TTFT 400, one chunk; usage 1 token, prompt 30
//	   -> no ITL, E2EL 400, no TPOT (one output token)
//
// TTFT [100 200 400]: mean 233.3, median 200, p99 = 200 + 0.98*200 = 396
// ITL [100 100 300]: mean 166.7, median 100, p90 = 100 + 0.8*200 = 260
// TPOT [75 100]: mean 87.5, median 87.5
// E2EL [300 400 500]: mean 400, median 400
// tokens: in 60, out 9
func TestMetricsOnScriptedBackend(t *testing.T) {
	for _, endpoint := range []string{EndpointCompletions, EndpointChat} {
		t.Run(endpoint, func(t *testing.T) {
			srv := newScripted(t, map[string]script{
				"A": {done: true, steps: []step{
					{wait: 100 * scriptUnit, text: "a"}, {wait: 100 * scriptUnit, text: "b"}, {wait: 100 * scriptUnit, text: "c"},
					{usage: usage(10, 3)},
				}},
				"B": {done: true, steps: []step{
					{wait: 0, text: ""}, // role chunk: carries no text, not a token
					{wait: 200 * scriptUnit, text: "x"}, {wait: 300 * scriptUnit, text: "yyyy"},
					{raw: `{"choices":[{"index":0,"text":"","delta":{},"finish_reason":"length"}]}`},
					{usage: usage(20, 5)},
				}},
				"C": {done: true, steps: []step{{wait: 400 * scriptUnit, text: "z"}, {usage: usage(30, 1)}}},
			})
			cfg := testConfig(srv.URL, "A", "B", "C")
			cfg.Endpoint = endpoint
			cfg.Percentiles = []float64{90, 99}
			res, err := Run(context.Background(), cfg, nil)
			require.NoError(t, err)
			require.Equal(t, "sim-model", res.Model, "model defaults to the first listed")
			require.Equal(t, 3, res.Completed)
			require.Zero(t, res.Failed)
			require.Equal(t, 60, res.TotalInputTokens)
			require.Equal(t, 9, res.TotalOutputTokens)
			require.Equal(t, "abc", res.Records[0].Text)
			require.Equal(t, "xyyyy", res.Records[1].Text)

			require.Equal(t, 3, res.TTFT.Count)
			within(t, 233.3, res.TTFT.Mean, "TTFT mean")
			within(t, 200, res.TTFT.Median, "TTFT median")
			within(t, 396, res.TTFT.Percentiles["99"], "TTFT p99")
			require.Equal(t, 3, res.ITL.Count, "ITL pools every gap: 2 from A, 1 from B")
			withinGap(t, 166.7, res.ITL.Mean, "ITL mean")
			withinGap(t, 100, res.ITL.Median, "ITL median")
			withinGap(t, 260, res.ITL.Percentiles["90"], "ITL p90")
			require.Equal(t, 2, res.TPOT.Count, "a 1-token request has no TPOT")
			withinGap(t, 87.5, res.TPOT.Mean, "TPOT mean")
			within(t, 300, res.Records[0].Latency.Seconds()*1000, "E2EL A")
			within(t, 400, res.E2EL.Mean, "E2EL mean")

			// Throughput is over the benchmark duration (~500 ms: all
			// three were sent at once and B ends last).
			within(t, 500, res.Duration.Seconds()*1000+0, "duration")
			d := res.Duration.Seconds()
			require.InDelta(t, 3/d, res.RequestThroughput, 1e-9)
			require.InDelta(t, 9/d, res.OutputThroughput, 1e-9)
			require.InDelta(t, 69/d, res.TotalTokenThroughput, 1e-9)

			for _, b := range srv.requestBodies() {
				require.Equal(t, "sim-model", b["model"])
				require.Equal(t, true, b["stream"])
				require.Equal(t, map[string]any{"include_usage": true}, b["stream_options"])
				require.Equal(t, true, b["ignore_eos"])
				require.EqualValues(t, 8, b["min_tokens"])
				if endpoint == EndpointChat {
					require.EqualValues(t, 8, b["max_completion_tokens"])
				} else {
					require.EqualValues(t, 8, b["max_tokens"])
				}
			}
		})
	}
}

// summarize is checked exactly on records with known durations.
func TestSummarizeExact(t *testing.T) {
	res := &Result{Percentiles: []float64{50, 90, 99}, Duration: 2 * time.Second, Records: []Record{
		{PromptTokens: 100, OutputTokens: 4, TTFT: 10 * ms1, Latency: 40 * ms1, ITL: []time.Duration{10 * ms1, 10 * ms1, 10 * ms1}},
		{PromptTokens: 50, OutputTokens: 3, TTFT: 30 * ms1, Latency: 70 * ms1, ITL: []time.Duration{20 * ms1, 20 * ms1}},
		{Err: "HTTP 500: boom", TTFT: 999 * ms1, Latency: 999 * ms1},
		{Err: "HTTP 500: boom"},
		{Err: "timeout after 1s"},
	}}
	summarize(res)
	require.Equal(t, 2, res.Completed)
	require.Equal(t, 3, res.Failed)
	require.Equal(t, []Failure{{"HTTP 500: boom", 2}, {"timeout after 1s", 1}}, res.Failures)
	require.Equal(t, 150, res.TotalInputTokens)
	require.Equal(t, 7, res.TotalOutputTokens)
	require.InDelta(t, 1.0, res.RequestThroughput, 1e-12)
	require.InDelta(t, 3.5, res.OutputThroughput, 1e-12)
	require.InDelta(t, 78.5, res.TotalTokenThroughput, 1e-12)
	require.InDelta(t, 20.0, res.TTFT.Mean, 1e-9)
	require.InDelta(t, 10.0, res.TTFT.Std, 1e-9)
	require.InDelta(t, 29.8, res.TTFT.Percentiles["99"], 1e-9)
	// TPOT: (40-10)/3 = 10, (70-30)/2 = 20
	require.InDelta(t, 15.0, res.TPOT.Mean, 1e-9)
	// ITL pooled [10 10 10 20 20]: mean 14, median 10, p90 = 20
	require.Equal(t, 5, res.ITL.Count)
	require.InDelta(t, 14.0, res.ITL.Mean, 1e-9)
	require.InDelta(t, 10.0, res.ITL.Median, 1e-9)
	require.InDelta(t, 20.0, res.ITL.Percentiles["90"], 1e-9)
	require.InDelta(t, 55.0, res.E2EL.Mean, 1e-9)
}

func TestPercentile(t *testing.T) {
	v := []float64{1, 2, 3, 4}
	for _, tc := range []struct{ p, want float64 }{{0, 1}, {50, 2.5}, {100, 4}, {99, 3.97}, {25, 1.75}} {
		require.InDelta(t, tc.want, Percentile(v, tc.p), 1e-12, "p%v", tc.p)
	}
	require.Zero(t, Percentile(nil, 50))
}

func TestFailuresAreCountedNeverHidden(t *testing.T) {
	ok := script{done: true, steps: []step{{wait: 10 * ms1, text: "ok"}, {text: "!"}, {usage: usage(1, 2)}}}
	srv := newScripted(t, map[string]script{
		"ok":       ok,
		"5xx":      {status: 503},
		"4xx":      {status: 400},
		"no-done":  {steps: []step{{text: "partial"}}},
		"abort":    {abort: true, steps: []step{{text: "partial"}}},
		"errevent": {steps: []step{{text: "partial"}, {raw: `{"error":{"message":"decode backend died","type":"server_error","code":502}}`}}, done: true},
		"empty":    {done: true, steps: []step{{usage: usage(1, 0)}}},
		"hang":     {hang: true},
	})
	cfg := testConfig(srv.URL, "ok", "5xx", "4xx", "no-done", "abort", "errevent", "empty", "hang", "ok")
	cfg.Timeout = 500 * ms1
	start := time.Now()
	res, err := Run(context.Background(), cfg, nil)
	require.NoError(t, err)
	require.Less(t, time.Since(start), 5*time.Second, "the hanging request ends at its deadline")
	require.Equal(t, 2, res.Completed)
	require.Equal(t, 7, res.Failed)
	reasons := map[int]string{}
	for _, r := range res.Records {
		reasons[r.Index] = r.Err
	}
	require.Empty(t, reasons[0])
	require.Contains(t, reasons[1], "HTTP 503: scripted failure 503")
	require.Contains(t, reasons[2], "HTTP 400")
	require.Equal(t, "stream ended without [DONE]", reasons[3])
	require.Contains(t, reasons[4], "reading stream")
	require.Contains(t, reasons[5], "error event in stream: decode backend died")
	require.Contains(t, reasons[6], "without any generated text")
	require.Equal(t, "timeout after 500ms", reasons[7])
	total := 0
	for _, f := range res.Failures {
		total += f.Count
	}
	require.Equal(t, 7, total)
	require.Equal(t, 2, res.TTFT.Count, "failed requests stay out of the latencies")

	var table bytes.Buffer
	require.NoError(t, res.WriteTable(&table))
	require.Contains(t, table.String(), "Failed requests:                         7")
	require.Contains(t, table.String(), "timeout after 500ms")
}

func TestCancelReportsPartialResult(t *testing.T) {
	srv := newScripted(t, map[string]script{"*": {hang: true}})
	cfg := testConfig(srv.URL)
	cfg.Model = "m"
	cfg.Prompts = nil
	cfg.NumPrompts = 10
	cfg.InputLen, cfg.OutputLen = 4, 4
	cfg.RequestRate = 20 // 10 requests over ~0.5 s
	ctx, cancel := context.WithTimeout(context.Background(), 150*ms1)
	defer cancel()
	res, err := Run(ctx, cfg, nil)
	require.ErrorIs(t, err, context.DeadlineExceeded)
	require.Positive(t, res.NotSent)
	require.Equal(t, res.NumPrompts, res.NotSent+res.Failed)
	for _, r := range res.Records {
		require.Equal(t, "canceled", r.Err)
	}
}

func TestMaxConcurrencyCapsInFlight(t *testing.T) {
	srv := newScripted(t, map[string]script{"*": {done: true, steps: []step{{wait: 30 * ms1, text: "t"}, {usage: usage(1, 1)}}}})
	cfg := testConfig(srv.URL)
	cfg.Prompts = nil
	cfg.NumPrompts, cfg.InputLen, cfg.OutputLen = 12, 4, 1
	cfg.MaxConcurrency = 3
	res, err := Run(context.Background(), cfg, nil)
	require.NoError(t, err)
	require.Equal(t, 12, res.Completed)
	require.EqualValues(t, 3, srv.maxIn.Load())
	// Latencies start when a request gets its slot: queueing does not
	// inflate TTFT (4 waves of 30 ms).
	require.Less(t, res.TTFT.Max, 100.0)
	require.Greater(t, res.Duration, 100*ms1)
}

func TestUsageMissingFallsBackToChunks(t *testing.T) {
	srv := newScripted(t, map[string]script{"*": {done: true, steps: []step{{text: "a"}, {text: "b"}, {text: "c"}}}})
	res, err := Run(context.Background(), testConfig(srv.URL, "x"), nil)
	require.NoError(t, err)
	require.Equal(t, 3, res.TotalOutputTokens)
	require.Equal(t, 1, res.UsageMissing)
	var table bytes.Buffer
	require.NoError(t, res.WriteTable(&table))
	require.Contains(t, table.String(), "carried no usage")
}

func TestArrivalProcess(t *testing.T) {
	const n, rate = 40000, 8.0
	for _, b := range []float64{0.5, 1, 4} {
		gaps := make([]float64, 0, n-1)
		arr := Arrivals(n, rate, b, 42)
		for i := 1; i < n; i++ {
			gaps = append(gaps, (arr[i] - arr[i-1]).Seconds())
		}
		var sum, sq float64
		for _, g := range gaps {
			require.GreaterOrEqual(t, g, 0.0)
			sum += g
		}
		mean := sum / float64(len(gaps))
		for _, g := range gaps {
			sq += (g - mean) * (g - mean)
		}
		cv := math.Sqrt(sq/float64(len(gaps))) / mean
		require.InDelta(t, 1/rate, mean, 0.03/rate, "burstiness %v: mean gap", b)
		require.InDelta(t, 1/math.Sqrt(b), cv, 0.05/math.Sqrt(b), "burstiness %v: CV", b)
	}
	require.Equal(t, Arrivals(50, 3, 1, 7), Arrivals(50, 3, 1, 7), "same seed, same arrivals")
	require.NotEqual(t, Arrivals(50, 3, 1, 7), Arrivals(50, 3, 1, 8))
	for _, a := range Arrivals(10, math.Inf(1), 1, 1) {
		require.Zero(t, a, "rate inf sends everything at once")
	}
}

func TestRequestsFollowArrivals(t *testing.T) {
	srv := newScripted(t, map[string]script{"*": {done: true, steps: []step{{text: "t"}, {usage: usage(1, 1)}}}})
	cfg := testConfig(srv.URL)
	cfg.Prompts = nil
	cfg.NumPrompts, cfg.InputLen, cfg.OutputLen = 20, 4, 1
	cfg.RequestRate, cfg.Seed = 40, 3
	res, err := Run(context.Background(), cfg, nil)
	require.NoError(t, err)
	want := Arrivals(20, 40, 1, 3)
	for i, r := range res.Records {
		require.GreaterOrEqual(t, r.Sent, want[i])
		require.InDelta(t, want[i].Seconds(), r.Sent.Seconds(), 0.03, "request %d", i)
	}
}

func TestRandomDataset(t *testing.T) {
	a := RandomDataset(200, 100, 20, 8, 0.5, 1)
	require.Equal(t, a, RandomDataset(200, 100, 20, 8, 0.5, 1))
	require.NotEqual(t, a, RandomDataset(200, 100, 20, 8, 0.5, 2))
	prefix := strings.Join(strings.Fields(a[0].Text)[:8], " ")
	seenLo, seenHi := false, false
	for _, p := range a {
		w := strings.Fields(p.Text)
		require.Len(t, w, p.InputLen, "one word per nominal token")
		require.True(t, strings.HasPrefix(p.Text, prefix+" "), "shared prefix")
		in := p.InputLen - 8
		require.GreaterOrEqual(t, in, 50)
		require.LessOrEqual(t, in, 150)
		require.GreaterOrEqual(t, p.OutputLen, 10)
		require.LessOrEqual(t, p.OutputLen, 30)
		seenLo = seenLo || in < 70
		seenHi = seenHi || in > 130
	}
	require.True(t, seenLo && seenHi, "lengths spread over the range")
	for _, p := range RandomDataset(5, 16, 4, 0, 0, 9) {
		require.Equal(t, 16, p.InputLen)
		require.Equal(t, 4, p.OutputLen)
	}
}

func TestValidate(t *testing.T) {
	for name, mut := range map[string]func(*Config){
		"base url":    func(c *Config) { c.BaseURL = "localhost:80" },
		"endpoint":    func(c *Config) { c.Endpoint = "/v1/embeddings" },
		"prompts":     func(c *Config) { c.NumPrompts = 0 },
		"rate":        func(c *Config) { c.RequestRate = 0 },
		"burstiness":  func(c *Config) { c.Burstiness = -1 },
		"concurrency": func(c *Config) { c.MaxConcurrency = -1 },
		"range":       func(c *Config) { c.RangeRatio = 1 },
		"output":      func(c *Config) { c.OutputLen = 0 },
		"timeout":     func(c *Config) { c.Timeout = 0 },
		"percentile":  func(c *Config) { c.Percentiles = []float64{101} },
	} {
		c := DefaultConfig()
		mut(&c)
		require.Error(t, c.Validate(), name)
		_, err := Run(context.Background(), c, nil)
		require.Error(t, err, name)
	}
	c := DefaultConfig()
	require.NoError(t, c.Validate())
}

func TestReportsJSONAndSVG(t *testing.T) {
	srv := newScripted(t, map[string]script{"*": {done: true, steps: []step{{text: "a"}, {wait: 5 * ms1, text: "b"}, {usage: usage(3, 2)}}}, "bad": {status: 500}})
	cfg := testConfig(srv.URL, "x", "y", "bad")
	cfg.Percentiles = []float64{50, 90, 99.9}
	var prog bytes.Buffer
	res, err := Run(context.Background(), cfg, &prog)
	require.NoError(t, err)
	require.Contains(t, prog.String(), "3/3 requests done, 1 failed")

	var js bytes.Buffer
	require.NoError(t, res.WriteJSON(&js))
	var back map[string]any
	require.NoError(t, json.Unmarshal(js.Bytes(), &back))
	require.EqualValues(t, 2, back["completed"])
	require.EqualValues(t, 1, back["failed"])
	require.Contains(t, back["ttft_ms"].(map[string]any)["percentiles"], "99.9")
	reqs := back["requests"].([]any)
	require.Len(t, reqs, 3)
	first := reqs[0].(map[string]any)
	require.Len(t, first["itl_ms"], 1)
	// The gap is measured between the two text chunks' arrivals, the last
	// of which ends the latency: ITL = E2EL - TTFT exactly. (The scripted
	// 5 ms says nothing about the arrivals on a loaded machine: a first
	// chunk held up by the scheduler can arrive just before the second.)
	itl := first["itl_ms"].([]any)[0].(float64)
	require.InDelta(t, first["e2el_ms"].(float64)-first["ttft_ms"].(float64), itl, 1e-3)
	require.GreaterOrEqual(t, itl, 0.0)

	var table bytes.Buffer
	require.NoError(t, res.WriteTable(&table))
	for _, s := range []string{"P99.9 TTFT (ms):", "P50 ITL (ms):", "Median E2EL (ms):", "Successful requests:                     2"} {
		require.Contains(t, table.String(), s)
	}

	var svg bytes.Buffer
	require.NoError(t, res.WriteSVG(&svg))
	require.True(t, strings.HasPrefix(svg.String(), "<svg "))
	require.Equal(t, 3, strings.Count(svg.String(), "<polyline"))
	require.Contains(t, svg.String(), "p99.9")
}
