package sim

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"

	"github.com/pegaflow/pegaflow/bench"
	"github.com/pegaflow/pegaflow/internal/kvtest"
)

type running struct {
	url string
	sim *Sim
	reg *prometheus.Registry
}

func testLogger(t *testing.T) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}

// startSim runs a sim on a loopback port until the test ends.
func startSim(t *testing.T, cfg Config) *running {
	t.Helper()
	reg := prometheus.NewRegistry()
	s, err := New(cfg, testLogger(t).With("sim", cfg.InstanceID), reg)
	require.NoError(t, err)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			require.NoError(t, err)
		case <-time.After(30 * time.Second):
			t.Error("sim did not stop")
		}
		for _, p := range s.kv.Paths {
			_, err := os.Stat(p)
			require.True(t, os.IsNotExist(err), "KV file %s removed", p)
		}
	})
	return &running{url: "http://" + ln.Addr().String(), sim: s, reg: reg}
}

func fastConfig() Config {
	cfg := DefaultConfig()
	cfg.Geometry = Geometry{NumLayers: 2, NumBlocks: 256, BlockSize: 4, NumKVHeads: 2, HeadSize: 8}
	cfg.Cost = CostModel{StepBase: time.Millisecond, PrefillPerToken: time.Microsecond}
	cfg.MaxModelLen = 512
	cfg.ShmDir = kvtest.ShmDir() // where the engine accepts shared memory
	return cfg
}

func post(t *testing.T, url string, body any) (int, map[string]any) {
	t.Helper()
	b, err := json.Marshal(body)
	require.NoError(t, err)
	resp, err := http.Post(url, "application/json", bytes.NewReader(b))
	require.NoError(t, err)
	defer resp.Body.Close()
	var out map[string]any
	raw, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	require.NoError(t, json.Unmarshal(raw, &out), "body %s", raw)
	return resp.StatusCode, out
}

func completionText(t *testing.T, resp map[string]any) string {
	t.Helper()
	ch := resp["choices"].([]any)[0].(map[string]any)
	if msg, ok := ch["message"].(map[string]any); ok {
		return msg["content"].(string)
	}
	return ch["text"].(string)
}

func metricValue(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	require.NoError(t, err)
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		var sum float64
		for _, m := range mf.GetMetric() {
			switch {
			case m.Counter != nil:
				sum += m.Counter.GetValue()
			case m.Gauge != nil:
				sum += m.Gauge.GetValue()
			case m.Histogram != nil:
				sum += float64(m.Histogram.GetSampleCount())
			}
		}
		return sum
	}
	t.Fatalf("metric %s not found", name)
	return 0
}

func TestCompletionsAggregated(t *testing.T) {
	r := startSim(t, fastConfig())
	code, resp := post(t, r.url+"/v1/completions", map[string]any{"model": "pegaflow-sim", "prompt": "one two three four five six seven", "max_tokens": 5, "seed": 3})
	require.Equal(t, http.StatusOK, code)
	text := completionText(t, resp)
	require.Len(t, strings.Fields(text), 5)
	require.Equal(t, map[string]any{"prompt_tokens": 7.0, "completion_tokens": 5.0, "total_tokens": 12.0}, resp["usage"])
	require.Nil(t, resp["kv_transfer_params"])
	require.Equal(t, "text_completion", resp["object"])

	// Same prompt and seed: same text; the text is the sampler's.
	_, again := post(t, r.url+"/v1/completions", map[string]any{"prompt": "one two three four five six seven", "max_tokens": 5, "seed": 3})
	require.Equal(t, text, completionText(t, again))
	want := ""
	d := Digest(r.sim.tok.Encode("one two three four five six seven"), 3)
	for k := 0; k < 5; k++ {
		w, _ := Sampler{tok: r.sim.tok}.Token(d, k)
		want += w
	}
	require.Equal(t, want, text)
	_, other := post(t, r.url+"/v1/completions", map[string]any{"prompt": "one two three four five six seven", "max_tokens": 5, "seed": 4})
	require.NotEqual(t, text, completionText(t, other))

	// Token-id prompts are the same prompt.
	ids := []any{}
	for _, id := range r.sim.tok.Encode("one two three four five six seven") {
		ids = append(ids, id)
	}
	_, byIDs := post(t, r.url+"/v1/completions", map[string]any{"prompt": ids, "max_tokens": 5, "seed": 3})
	require.Equal(t, text, completionText(t, byIDs))

	code, chat := post(t, r.url+"/v1/chat/completions", map[string]any{"messages": []map[string]any{{"role": "user", "content": "hi there"}}, "max_completion_tokens": 3})
	require.Equal(t, http.StatusOK, code)
	require.Equal(t, "chat.completion", chat["object"])
	require.Len(t, strings.Fields(completionText(t, chat)), 3)
	require.EqualValues(t, 4, chat["usage"].(map[string]any)["prompt_tokens"], "[user] hi there [assistant]")

	require.EqualValues(t, 7*4+4, metricValue(t, r.reg, "vllm:prompt_tokens_total"))
	require.EqualValues(t, 5*4+3, metricValue(t, r.reg, "vllm:generation_tokens_total"))
	require.EqualValues(t, 5, metricValue(t, r.reg, "vllm:time_to_first_token_seconds"))
}

func TestBadRequests(t *testing.T) {
	r := startSim(t, fastConfig())
	for _, tc := range []struct {
		path string
		body string
		code int
		msg  string
	}{
		{"/v1/completions", `{"prompt": "x"`, 400, "invalid JSON"},
		{"/v1/completions", `{"max_tokens": 3}`, 400, "prompt is missing"},
		{"/v1/completions", `{"prompt": ""}`, 400, "empty"},
		{"/v1/completions", `{"prompt": ["a", "b"]}`, 400, "batched prompts"},
		{"/v1/completions", `{"prompt": [1, 99999999]}`, 400, "outside the vocabulary"},
		{"/v1/completions", `{"prompt": {"x": 1}}`, 400, "prompt must be"},
		{"/v1/completions", `{"prompt": "a", "model": "gpt-9"}`, 404, "does not exist"},
		{"/v1/completions", `{"prompt": "a", "n": 2}`, 400, "n=2"},
		{"/v1/completions", `{"prompt": "a", "max_tokens": 0}`, 400, "at least 1"},
		{"/v1/completions", `{"prompt": "a", "max_tokens": 100000}`, 400, "maximum context length is 512"},
		{"/v1/chat/completions", `{"messages": []}`, 400, "messages"},
		{"/v1/chat/completions", `{"messages": [{"role": "bard", "content": "x"}]}`, 400, "unknown role"},
		{"/v1/chat/completions", `{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}`, 400, "only text"},
	} {
		resp, err := http.Post(r.url+tc.path, "application/json", strings.NewReader(tc.body))
		require.NoError(t, err)
		var e struct {
			Error struct {
				Message string `json:"message"`
				Code    int    `json:"code"`
			} `json:"error"`
		}
		require.NoError(t, json.NewDecoder(resp.Body).Decode(&e), tc.body)
		resp.Body.Close()
		require.Equal(t, tc.code, resp.StatusCode, tc.body)
		require.Equal(t, tc.code, e.Error.Code, tc.body)
		require.Contains(t, e.Error.Message, tc.msg, tc.body)
	}
	// The server still serves.
	code, _ := post(t, r.url+"/v1/completions", map[string]any{"prompt": "fine", "max_tokens": 1})
	require.Equal(t, 200, code)
	require.Positive(t, metricValue(t, r.reg, "sim_request_errors_total"))
}

func TestModelsHealthMetrics(t *testing.T) {
	r := startSim(t, fastConfig())
	resp, err := http.Get(r.url + "/v1/models")
	require.NoError(t, err)
	var models struct {
		Data []struct {
			ID          string `json:"id"`
			MaxModelLen int    `json:"max_model_len"`
		} `json:"data"`
	}
	require.NoError(t, json.NewDecoder(resp.Body).Decode(&models))
	resp.Body.Close()
	require.Equal(t, "pegaflow-sim", models.Data[0].ID)
	require.Equal(t, 512, models.Data[0].MaxModelLen)

	resp, err = http.Get(r.url + "/health")
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, 200, resp.StatusCode)

	resp, err = http.Get(r.url + "/metrics")
	require.NoError(t, err)
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, m := range []string{"vllm:prompt_tokens_total", "vllm:num_requests_running", "sim_kv_blocks_loaded_total", "sim_kv_blocks_saved_total", "sim_kv_verify_failures_total"} {
		require.Contains(t, string(body), m)
	}
}

// readSSE returns the data payloads of a stream up to [DONE].
func readSSE(t *testing.T, body io.Reader) []string {
	t.Helper()
	var out []string
	sc := bufio.NewScanner(body)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, "data: ") {
			require.Empty(t, line)
			continue
		}
		out = append(out, strings.TrimPrefix(line, "data: "))
	}
	return out
}

func TestStreamingFormat(t *testing.T) {
	r := startSim(t, fastConfig())
	for _, chat := range []bool{false, true} {
		body := map[string]any{"prompt": "a b c", "max_tokens": 3, "stream": true, "stream_options": map[string]any{"include_usage": true}}
		path := "/v1/completions"
		if chat {
			body = map[string]any{"messages": []map[string]any{{"role": "user", "content": "a b c"}}, "max_tokens": 3, "stream": true, "stream_options": map[string]any{"include_usage": true}}
			path = "/v1/chat/completions"
		}
		b, _ := json.Marshal(body)
		resp, err := http.Post(r.url+path, "application/json", bytes.NewReader(b))
		require.NoError(t, err)
		require.Equal(t, "text/event-stream", resp.Header.Get("Content-Type"))
		events := readSSE(t, resp.Body)
		resp.Body.Close()
		require.Equal(t, "[DONE]", events[len(events)-1])
		var text string
		var finish []any
		for _, ev := range events[:len(events)-2] {
			var c map[string]any
			require.NoError(t, json.Unmarshal([]byte(ev), &c))
			ch := c["choices"].([]any)[0].(map[string]any)
			if chat {
				require.Equal(t, "chat.completion.chunk", c["object"])
				text += ch["delta"].(map[string]any)["content"].(string)
			} else {
				text += ch["text"].(string)
			}
			finish = append(finish, ch["finish_reason"])
		}
		require.Len(t, strings.Fields(text), 3)
		require.Equal(t, "length", finish[len(finish)-1])
		require.Nil(t, finish[0])
		var u map[string]any
		require.NoError(t, json.Unmarshal([]byte(events[len(events)-2]), &u))
		require.Empty(t, u["choices"])
		require.EqualValues(t, 3, u["usage"].(map[string]any)["completion_tokens"])
	}
}

// The benchmark and the sim agree on the OpenAI streaming protocol.
func TestBenchAgainstSim(t *testing.T) {
	r := startSim(t, fastConfig())
	for _, ep := range []string{bench.EndpointCompletions, bench.EndpointChat} {
		cfg := bench.DefaultConfig()
		cfg.BaseURL, cfg.Endpoint = r.url, ep
		cfg.NumPrompts, cfg.InputLen, cfg.OutputLen, cfg.RangeRatio = 12, 40, 6, 0.5
		cfg.Timeout = 20 * time.Second
		res, err := bench.Run(context.Background(), cfg, nil)
		require.NoError(t, err)
		require.Zero(t, res.Failed, "%+v", res.Failures)
		require.Equal(t, 12, res.Completed)
		require.Equal(t, "pegaflow-sim", res.Model)
		want := 0
		for _, p := range bench.RandomDataset(12, 40, 6, 0, 0.5, 0) {
			want += p.OutputLen
		}
		require.Equal(t, want, res.TotalOutputTokens)
		require.Zero(t, res.UsageMissing)
	}
}
