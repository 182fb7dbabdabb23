package sim

import (
	"context"
	"encoding/json"
	"io"
	"maps"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/labstack/echo/v4"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"

	"github.com/pegaflow/pegaflow/bench"
	"github.com/pegaflow/pegaflow/engine"
	"github.com/pegaflow/pegaflow/engine/server"
	"github.com/pegaflow/pegaflow/internal/cli"
	"github.com/pegaflow/pegaflow/internal/ids"
	"github.com/pegaflow/pegaflow/router"
)

// pdEnv is an engine served on a UNIX socket, sims registered with it, and
// the router's side of the P/D protocol, all on real sockets.
type pdEnv struct {
	eng      *engine.Engine
	socket   string
	readyURL string
	mu       sync.Mutex
	ready    map[string]map[string]string // transfer id -> callback body
}

// serveEngine starts an engine on sock; stop ends it (idempotent).
func serveEngine(t *testing.T, sock string) (eng *engine.Engine, stop func()) {
	t.Helper()
	return serveEngineWith(t, sock, engine.Config{}, prometheus.NewRegistry())
}

// serveEngineWith is serveEngine with cfg's peer settings.
func serveEngineWith(t *testing.T, sock string, peers engine.Config, reg *prometheus.Registry) (eng *engine.Engine, stop func()) {
	t.Helper()
	log := testLogger(t).With("component", "engine")
	eng, err := engine.New(engine.Config{PoolSize: 64 << 20, NUMANode: -1, Device: -1, CopyThreads: 2, MaxQueryWait: 10 * time.Second,
		Peers: peers.Peers, PeerAddress: peers.PeerAddress, PeerAllow: peers.PeerAllow}, log, reg)
	require.NoError(t, err)
	srv, err := server.New(server.Config{SocketPath: sock}, eng, log, reg)
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			<-served
			eng.Close()
		})
	}
	t.Cleanup(stop)
	return eng, stop
}

func startEngine(t *testing.T) *pdEnv {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "engine.sock")
	eng, _ := serveEngine(t, sock)
	env := &pdEnv{eng: eng, socket: sock, ready: map[string]map[string]string{}}
	env.serveCallback(t)
	return env
}

// serveCallback stands in for the router's /kv_ready.
func (env *pdEnv) serveCallback(t *testing.T) {
	cb := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var body map[string]string
		if r.URL.Path != "/kv_ready" || json.NewDecoder(r.Body).Decode(&body) != nil {
			http.Error(w, "bad", http.StatusBadRequest)
			return
		}
		env.mu.Lock()
		env.ready[body["transfer_id"]] = body
		env.mu.Unlock()
		w.Write([]byte(`{"ok":true}`))
	}))
	env.readyURL = cb.URL + "/kv_ready"
	t.Cleanup(cb.Close)
}

func (env *pdEnv) startSim(t *testing.T, id string, mutate func(*Config)) *running {
	cfg := fastConfig()
	cfg.InstanceID = id
	cfg.EngineSocket = env.socket
	cfg.KVQueryWait = 300 * time.Millisecond
	cfg.EngineTimeout = 10 * time.Second
	if mutate != nil {
		mutate(&cfg)
	}
	r := startSim(t, cfg)
	require.Eventually(t, func() bool {
		resp, err := http.Get(r.url + "/health")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	}, 10*time.Second, 10*time.Millisecond, "sim %s registers with the engine", id)
	return r
}

// prefill runs the P leg as the router does and waits (bounded) until the
// engine reports the transfer ready. It returns the params for the D leg.
func (env *pdEnv) prefill(t *testing.T, p *running, path string, body map[string]any) map[string]any {
	t.Helper()
	tid, token := "xfer-"+ids.Hex(8), ids.Hex(16)
	ours := map[string]any{"do_remote_decode": true, "do_remote_prefill": false,
		"pegaflow_transfer_id": tid, "pegaflow_ready_url": env.readyURL, "pegaflow_ready_token": token}
	leg := maps.Clone(body)
	leg["max_tokens"] = 1
	if _, ok := leg["max_completion_tokens"]; ok {
		leg["max_completion_tokens"] = 1
	}
	leg["stream"] = false
	delete(leg, "stream_options")
	leg["kv_transfer_params"] = ours
	code, resp := post(t, p.url+path, leg)
	require.Equal(t, http.StatusOK, code, "%v", resp)
	require.EqualValues(t, 1, resp["usage"].(map[string]any)["completion_tokens"])
	got := resp["kv_transfer_params"].(map[string]any)
	require.Equal(t, true, got["do_remote_prefill"])
	require.Equal(t, false, got["do_remote_decode"])
	require.Equal(t, tid, got["pegaflow_transfer_id"])

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	require.NoError(t, env.eng.AwaitTransfer(ctx, tid), "P's save makes the transfer ready")
	require.Eventually(t, func() bool {
		env.mu.Lock()
		defer env.mu.Unlock()
		cb := env.ready[tid]
		return cb != nil && cb["token"] == token && cb["status"] == "ready"
	}, 10*time.Second, 5*time.Millisecond, "the engine posts ready to pegaflow_ready_url with the token")

	merged := maps.Clone(got)
	maps.Copy(merged, ours)
	merged["do_remote_decode"], merged["do_remote_prefill"] = false, true
	return merged
}

func decodeBody(body, params map[string]any) map[string]any {
	leg := maps.Clone(body)
	leg["kv_transfer_params"] = params
	return leg
}

func promptOf(n int, tag string) string {
	w := make([]string, n)
	for i := range w {
		w[i] = tag + "-" + string(rune('a'+i%26))
	}
	return strings.Join(w, " ")
}

// startRouter serves the real router in-process (as `pegaflow serve` does)
// in front of P and D, with the engine as its in-process ready source.
func (env *pdEnv) startRouter(t *testing.T, p, d *running) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	cfg := router.DefaultConfig()
	cfg.Prefill, cfg.Decode = cli.StringList{p.url}, cli.StringList{d.url}
	cfg.ListenAddr = ln.Addr().String()
	cfg.KVReadyTimeout = 10 * time.Second
	cfg.HealthInterval = time.Hour
	rt, err := router.New(cfg, router.Deps{Logger: testLogger(t).With("component", "router"), Registerer: prometheus.NewRegistry(), KVReady: env.eng})
	require.NoError(t, err)
	e := echo.New()
	e.HideBanner, e.HidePort = true, true
	rt.Register(e)
	srv := &http.Server{Handler: e, ReadHeaderTimeout: 5 * time.Second}
	go srv.Serve(ln)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
		rt.Close()
	})
	return "http://" + ln.Addr().String()
}

// Through the router, a P/D request gives the text an aggregated instance
// gives for the same prompt and seed, D loads the prompt's blocks from the
// engine instead of computing them, and the engine ends up holding no pins.
func TestPDThroughRouterMatchesAggregated(t *testing.T) {
	env := startEngine(t)
	p := env.startSim(t, "sim-p", nil)
	d := env.startSim(t, "sim-d", nil)
	agg := startSim(t, fastConfig()) // a separate instance, no engine
	rt := env.startRouter(t, p, d)
	const bs = 4

	t.Run("completions", func(t *testing.T) {
		body := map[string]any{"model": "pegaflow-sim", "prompt": promptOf(50, "c"), "max_tokens": 12, "seed": 7} // 12 full blocks + 2
		code, want := post(t, agg.url+"/v1/completions", body)
		require.Equal(t, 200, code)
		code, got := post(t, rt+"/v1/completions", body)
		require.Equal(t, 200, code, "%v", got)
		require.Equal(t, completionText(t, want), completionText(t, got), "P/D text equals aggregated text")
		u := got["usage"].(map[string]any)
		require.EqualValues(t, 12*bs, u["prompt_tokens_details"].(map[string]any)["cached_tokens"], "D reports the prompt blocks as loaded")
	})

	t.Run("chat streaming", func(t *testing.T) {
		body := map[string]any{"model": "pegaflow-sim", "messages": []map[string]any{{"role": "system", "content": "be terse"}, {"role": "user", "content": promptOf(40, "s")}},
			"max_completion_tokens": 9, "stream": true, "stream_options": map[string]any{"include_usage": true}} // 45 tokens: 11 blocks + 1
		require.Equal(t, streamText(t, agg.url+"/v1/chat/completions", body), streamText(t, rt+"/v1/chat/completions", body))
	})

	// Loaded blocks skip their prefill: D computed only the tails (2 + 1
	// tokens), while P computed whole prompts.
	require.EqualValues(t, 2+1, metricValue(t, d.reg, "sim_prefill_tokens_computed_total"))
	require.EqualValues(t, 50+45, metricValue(t, p.reg, "sim_prefill_tokens_computed_total"))
	require.EqualValues(t, 12+11, metricValue(t, d.reg, "sim_kv_blocks_loaded_total"))
	require.EqualValues(t, (12+11)*bs, metricValue(t, d.reg, "vllm:external_prefix_cache_hits_total"))
	require.EqualValues(t, 12+11, metricValue(t, p.reg, "sim_kv_blocks_saved_total"))
	require.Zero(t, metricValue(t, d.reg, "sim_kv_verify_failures_total"))
	require.Zero(t, metricValue(t, d.reg, "sim_kv_load_failures_total"))

	t.Run("bench", func(t *testing.T) {
		// The benchmark through the router and straight to the aggregated
		// instance: same prompts, same texts, no failures.
		run := func(url string) *bench.Result {
			cfg := bench.DefaultConfig()
			cfg.BaseURL, cfg.NumPrompts, cfg.InputLen, cfg.OutputLen, cfg.RangeRatio = url, 8, 30, 5, 0.5
			cfg.RequestRate, cfg.Seed, cfg.Timeout = 50, 3, 20*time.Second
			res, err := bench.Run(context.Background(), cfg, nil)
			require.NoError(t, err)
			require.Zero(t, res.Failed, "%+v", res.Failures)
			return res
		}
		pd, direct := run(rt), run(agg.url)
		for i := range pd.Records {
			require.Equal(t, direct.Records[i].Text, pd.Records[i].Text, "request %d", i)
		}
	})

	st := env.eng.Stats()
	require.EqualValues(t, st.Saves, st.Loads, "D loaded every block P saved")
	require.Zero(t, st.PinnedBlocks, "D's loads released the transfer pins and leases")
	require.Eventually(t, func() bool { return p.sim.pool.used() == 0 && d.sim.pool.used() == 0 }, 5*time.Second, 10*time.Millisecond,
		"P freed its blocks after saving, D after decoding")
}

// The P/D protocol as the sims speak it, checked leg by leg: P's
// kv_transfer_params, the engine's ready callback with the token, D's
// cached tokens.
func TestPDProtocolLegs(t *testing.T) {
	env := startEngine(t)
	p := env.startSim(t, "sim-p", nil)
	d := env.startSim(t, "sim-d", nil)
	body := map[string]any{"prompt": promptOf(18, "legs"), "max_tokens": 3}
	params := env.prefill(t, p, "/v1/completions", body)
	require.EqualValues(t, 4, params["pegaflow_num_blocks"])
	require.NotContains(t, params, kvSourceEngine, "an engine without peers names no source")
	code, got := post(t, d.url+"/v1/completions", decodeBody(body, params))
	require.Equal(t, 200, code)
	require.EqualValues(t, 16, got["usage"].(map[string]any)["prompt_tokens_details"].(map[string]any)["cached_tokens"])

	// A prompt shorter than a block has nothing to save: P's empty last
	// save still makes the transfer ready at once, and D computes it all.
	short := map[string]any{"prompt": "tiny prompt", "max_tokens": 2}
	start := time.Now()
	params = env.prefill(t, p, "/v1/completions", short)
	require.Less(t, time.Since(start), 2*time.Second)
	require.EqualValues(t, 0, params["pegaflow_num_blocks"])
	code, got = post(t, d.url+"/v1/completions", decodeBody(short, params))
	require.Equal(t, 200, code)
	require.Nil(t, got["usage"].(map[string]any)["prompt_tokens_details"])
}

func streamText(t *testing.T, url string, body map[string]any) string {
	t.Helper()
	b, _ := json.Marshal(body)
	resp, err := http.Post(url, "application/json", strings.NewReader(string(b)))
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, 200, resp.StatusCode)
	var text strings.Builder
	events := readSSE(t, resp.Body)
	require.Equal(t, "[DONE]", events[len(events)-1])
	for _, ev := range events[:len(events)-1] {
		var c struct {
			Choices []struct {
				Text  string `json:"text"`
				Delta struct {
					Content string `json:"content"`
				} `json:"delta"`
			} `json:"choices"`
			Error any `json:"error"`
		}
		require.NoError(t, json.Unmarshal([]byte(ev), &c))
		require.Nil(t, c.Error)
		for _, ch := range c.Choices {
			text.WriteString(ch.Text + ch.Delta.Content)
		}
	}
	return text.String()
}

// A byte corrupted in the engine's copy of the KV makes the D request fail
// loudly, never decode from wrong KV: D answers 500 with the reason (the
// router turns it into a 502), streaming or not.
func TestCorruptedKVFailsTheDecode(t *testing.T) {
	env := startEngine(t)
	bad := env.startSim(t, "sim-p-corrupt", func(c *Config) { c.CorruptSavedKV = true })
	d := env.startSim(t, "sim-d", nil)
	rt := env.startRouter(t, bad, d)

	// Leg by leg: D's own answer.
	body := map[string]any{"prompt": promptOf(20, "x"+ids.Hex(4)), "max_tokens": 4}
	params := env.prefill(t, bad, "/v1/completions", body)
	b, _ := json.Marshal(decodeBody(body, params))
	resp, err := http.Post(d.url+"/v1/completions", "application/json", strings.NewReader(string(b)))
	require.NoError(t, err)
	raw, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	require.Equal(t, http.StatusInternalServerError, resp.StatusCode, "%s", raw)
	var e struct {
		Error struct {
			Message string `json:"message"`
			Type    string `json:"type"`
		} `json:"error"`
	}
	require.NoError(t, json.Unmarshal(raw, &e), "%s", raw)
	require.Contains(t, e.Error.Message, "loaded KV does not match the prompt: block 0 of 5")
	require.Contains(t, e.Error.Message, "layer 0 K token 0")
	require.Equal(t, "server_error", e.Error.Type)
	require.EqualValues(t, 1, metricValue(t, d.reg, "sim_kv_verify_failures_total"))

	// Through the router, streaming: the failure comes before any byte.
	sb := map[string]any{"model": "pegaflow-sim", "prompt": promptOf(20, "y"+ids.Hex(4)), "max_tokens": 4, "stream": true}
	b, _ = json.Marshal(sb)
	resp, err = http.Post(rt+"/v1/completions", "application/json", strings.NewReader(string(b)))
	require.NoError(t, err)
	raw, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	require.GreaterOrEqual(t, resp.StatusCode, 500, "%s", raw)
	require.NotContains(t, string(raw), "data:", "no stream was started")
	require.EqualValues(t, 2, metricValue(t, d.reg, "sim_kv_verify_failures_total"))
	require.Zero(t, metricValue(t, d.reg, "sim_kv_blocks_loaded_total"))
	require.Eventually(t, func() bool { return d.sim.pool.used() == 0 }, 5*time.Second, 10*time.Millisecond, "the failed requests freed their blocks")
}

// Without a ready transfer (the router's decode-anyway policy), D waits a
// bounded time, recomputes the prompt, and still gives the same text.
func TestDecodeWithoutTransferRecomputes(t *testing.T) {
	env := startEngine(t)
	d := env.startSim(t, "sim-d", nil)
	agg := startSim(t, fastConfig())
	body := map[string]any{"prompt": promptOf(30, "r"), "max_tokens": 5, "seed": 1}
	_, want := post(t, agg.url+"/v1/completions", body)
	start := time.Now()
	code, got := post(t, d.url+"/v1/completions", decodeBody(body, map[string]any{"do_remote_prefill": true, "pegaflow_transfer_id": "never-" + ids.Hex(4)}))
	require.Equal(t, 200, code)
	require.GreaterOrEqual(t, time.Since(start), 300*time.Millisecond, "D waited its --kv-query-wait")
	require.Less(t, time.Since(start), 5*time.Second)
	require.Equal(t, completionText(t, want), completionText(t, got))
	require.Nil(t, got["usage"].(map[string]any)["prompt_tokens_details"])
	require.EqualValues(t, 30, metricValue(t, d.reg, "sim_prefill_tokens_computed_total"))
}

func healthCode(t *testing.T, url string) int {
	resp, err := http.Get(url + "/health")
	if err != nil {
		return 0
	}
	resp.Body.Close()
	return resp.StatusCode
}

// When the engine goes away the sim reports unhealthy but keeps serving
// alone; when an engine is back on the socket it registers again and P/D
// works (blocks saved before the restart are gone with the old engine).
func TestSimReregistersAfterEngineRestart(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "engine.sock")
	_, stop := serveEngine(t, sock)
	env := &pdEnv{socket: sock, ready: map[string]map[string]string{}}
	env.serveCallback(t)
	p := env.startSim(t, "sim-p", nil)
	d := env.startSim(t, "sim-d", nil)
	stop()
	require.Eventually(t, func() bool { return healthCode(t, d.url) == http.StatusServiceUnavailable }, 10*time.Second, 20*time.Millisecond)
	code, _ := post(t, d.url+"/v1/completions", map[string]any{"prompt": "still serving", "max_tokens": 2})
	require.Equal(t, 200, code)

	env.eng, _ = serveEngine(t, sock)
	for _, r := range []*running{p, d} {
		require.Eventually(t, func() bool { return healthCode(t, r.url) == http.StatusOK }, 15*time.Second, 20*time.Millisecond)
	}
	body := map[string]any{"prompt": promptOf(16, "after"), "max_tokens": 3}
	params := env.prefill(t, p, "/v1/completions", body)
	code, got := post(t, d.url+"/v1/completions", decodeBody(body, params))
	require.Equal(t, 200, code)
	require.EqualValues(t, 16, got["usage"].(map[string]any)["prompt_tokens_details"].(map[string]any)["cached_tokens"])
}
