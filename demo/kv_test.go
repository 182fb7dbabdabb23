package demo

import (
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/pegaflow/pegaflow/bench"
	"github.com/pegaflow/pegaflow/internal/netlab"
	"github.com/pegaflow/pegaflow/sim"
)

// The oracle loads, for each request, the longest prefix of full blocks
// held when it was sent: the prompts of the requests sent before it, the
// prompts and answers (but their last token) of those finished; at most
// all but the prompt's last token.
func TestOracleHitRatio(t *testing.T) {
	tok, err := sim.NewTokenizer(32000)
	require.NoError(t, err)
	words := func(tag string, n int) string {
		w := make([]string, n)
		for i := range w {
			w[i] = tag + string(rune('a'+i%26))
		}
		return strings.Join(w, " ")
	}
	sys := bench.ChatMessage{Role: "system", Content: words("s", 7)}
	u1 := bench.ChatMessage{Role: "user", Content: words("u", 3)}
	answer := words("a", 6)
	first := []bench.ChatMessage{sys, u1}                                                                                                                            // 8+4+1 = 13 tokens
	next := append(append([]bench.ChatMessage(nil), first...), bench.ChatMessage{Role: "assistant", Content: answer}, bench.ChatMessage{Role: "user", Content: "v"}) // 13+7+2 = 22
	p1, err := tok.ApplyChatTemplate([]sim.Message{{Role: "system", Content: sys.Content}, {Role: "user", Content: u1.Content}}, true)
	require.NoError(t, err)
	require.Len(t, p1, 13)
	cases := []struct {
		name     string
		nextSent time.Duration
		hits     int // the first's and the next's, of 13+22 prompt tokens
	}{
		// The first request (sent at 1 s) leaves 13+5 = 18 tokens
		// sealed, 4 blocks of 4, when it ends at 2 s: the next (22
		// tokens) loads them all.
		{"after the first ended", 3 * time.Second, 16},
		// Sent while the first runs: the first's prompt, 3 full blocks.
		{"while the first runs", 1500 * time.Millisecond, 12},
		// Sent before it: the first loads the next's first 3 blocks
		// (the same tokens as its own), all but its last token.
		{"before the first", time.Second / 2, 12},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			res := &bench.Result{Records: []bench.Record{
				{Sent: time.Second, Latency: time.Second, Messages: first, Text: " " + answer},
				{Sent: tc.nextSent, Latency: time.Second, Messages: next, Text: " x"},
				{Sent: 0, Latency: time.Millisecond, Messages: first, Text: " " + answer, Err: "failed: ignored"},
			}}
			require.InDelta(t, float64(tc.hits)/(13+22), oracleHitRatio(res, 32000, 4), 1e-9)
		})
	}
	// A prompt all held loads all but its last token, as the sims count.
	again := &bench.Result{Records: []bench.Record{
		{Sent: 0, Latency: time.Second, Messages: first, Text: " " + answer},
		{Sent: 2 * time.Second, Latency: time.Second, Messages: first, Text: " " + answer},
	}}
	require.InDelta(t, 12.0/(13+13), oracleHitRatio(again, 32000, 13), 1e-9)
}

func TestKVReportTable(t *testing.T) {
	res := &bench.Result{Percentiles: []float64{99}, FollowUps: &bench.TurnStats{Requests: 3,
		TTFT: bench.Stats{Count: 3, Mean: 12.5, Percentiles: map[string]float64{"99": 30}}}}
	rep := &KVReport{Rows: []KVRow{
		{Policy: "round-robin", Result: res, PromptTokens: 1000, HitTokens: 400, CrossHostBytes: 3 << 20, OracleRatio: 0.9},
		{Policy: "kv", Err: "engine+router-a exited: --lb kv needs the engines' index"},
	}}
	var b strings.Builder
	require.NoError(t, rep.WriteTable(&b, KVWorkload()))
	out := b.String()
	require.Contains(t, out, "| round-robin      |     40.0% |  90.0% |          12.50 |         30.00 |        0 |            3.0 |      0 |")
	require.Contains(t, out, "| kv               | not run: engine+router-a exited: --lb kv needs")
	require.True(t, rep.Failed())
	require.True(t, (&KVReport{}).Failed())
}

// The row's counters come from the pages' deltas: the sims' prefix hits,
// the engines' peer fetches, the router's bypasses whatever other labels
// its series carry.
func TestKVRowCounters(t *testing.T) {
	router, err := bench.ParseMetrics(strings.NewReader(`# TYPE pegaflow_router_kv_decisions_total counter
pegaflow_router_kv_decisions_total{leg="decode",mode="pd",reason="bypass"} 3
pegaflow_router_kv_decisions_total{leg="decode",mode="pd",reason="colocated"} 5
pegaflow_router_kv_decisions_total{leg="prefill",mode="pd",reason="prefix_hit"} 5
# TYPE pegaflow_engine_peer_fetch_bytes_total counter
pegaflow_engine_peer_fetch_bytes_total 100
`))
	require.NoError(t, err)
	var row KVRow
	row.addCounters([]bench.Sample{router, {"pegaflow_engine_peer_fetch_bytes_total": 50},
		{"sim_kv_prefix_hit_tokens_total": 64, "sim_kv_save_failures_total": 1}, {"sim_kv_prefix_hit_tokens_total": 32, "sim_kv_verify_failures_total": 1}})
	require.Equal(t, KVRow{Bypasses: 3, CrossHostBytes: 150, HitTokens: 96, KVFailures: 2}, row)

	row = KVRow{Result: &bench.Result{Completed: 1}}
	rep := &KVReport{Rows: []KVRow{row}}
	require.True(t, rep.Failed(), "no follow-up turn: nothing to compare")
	rep.Rows[0].Result.FollowUps = &bench.TurnStats{Requests: 1}
	require.False(t, rep.Failed())
	rep.Rows[0].KVFailures = 1
	require.True(t, rep.Failed(), "a failed save fails the demo")
}

// Every process of the lab can reach where it must: engine B posts its
// saves' readiness to the router on A (P on B saves with the router's
// ready_url), which its default --kv-ready-allow (loopback) refuses.
func TestKVSpecs(t *testing.T) {
	lab := &netlab.Lab{A: netlab.Host{NS: "a", IP: netlab.IPA}, B: netlab.Host{NS: "b", IP: netlab.IPB}}
	cfg := DefaultConfig()
	cfg.WorkDir = t.TempDir()
	specs := kvSpecs(cfg, lab, "token", KVPolicies()[0])
	require.Len(t, specs, 6)
	require.True(t, specs[0].router, "the router first: its page leads the deltas")
	router := specs[0].addr
	byName := map[string]spec{}
	for _, s := range specs {
		byName[s.name] = s
	}
	engineB := byName["engine-b"]
	require.Same(t, &lab.B, engineB.host)
	require.Equal(t, router, flagValue(engineB.args, "--kv-ready-allow"), "engine B may post readiness to the router")
	require.Equal(t, lab.A.Addr(labPeerPort), flagValue(engineB.args, "--peer-allow"))
	require.Equal(t, lab.B.Addr(labPeerPort), flagValue(specs[0].args, "--peer-allow"))
	for _, name := range []string{"sim-p-a", "sim-d-a", "sim-p-b", "sim-d-b"} {
		require.Equal(t, sim.KVBoth, flagValue(byName[name].args, "--kv-role"), name)
	}
}

// flagValue is the value after the last flag in args ("" when absent).
func flagValue(args []string, flag string) string {
	v := ""
	for i := 0; i+1 < len(args); i++ {
		if args[i] == flag {
			v = args[i+1]
		}
	}
	return v
}
