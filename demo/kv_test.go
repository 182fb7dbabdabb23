package demo

import (
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/pegaflow/pegaflow/bench"
	"github.com/pegaflow/pegaflow/sim"
)

// The oracle loads, for each request, the longest prefix of full blocks
// that requests finished before it left (prompt and answer but its last
// token), at most the blocks before the prompt's last token.
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
	res := &bench.Result{Records: []bench.Record{
		{Sent: 0, Latency: time.Second, Messages: first, Text: " " + answer},
		{Sent: 2 * time.Second, Latency: time.Second, Messages: next, Text: " x"},
		{Sent: 2 * time.Second, Latency: time.Second, Messages: first, Text: " " + answer, Err: "failed: ignored"},
	}}
	// Block size 4: the first request finds nothing; it leaves 13+5 = 18
	// tokens sealed, 4 blocks; the next (22 tokens) loads all 4 (16 of
	// its first 21 tokens).
	require.InDelta(t, 16.0/(13+22), oracleHitRatio(res, 32000, 4), 1e-9)
	// Sent before the first one finished: nothing to load.
	res.Records[1].Sent = time.Second / 2
	require.Zero(t, oracleHitRatio(res, 32000, 4))
}

func TestKVReportTable(t *testing.T) {
	res := &bench.Result{Percentiles: []float64{99}, FollowUps: &bench.TurnStats{Requests: 3,
		TTFT: bench.Stats{Count: 3, Mean: 12.5, Percentiles: map[string]float64{"99": 30}}}}
	rep := &KVReport{OracleRatio: 0.9, Rows: []KVRow{
		{Policy: "round-robin", Result: res, PromptTokens: 1000, HitTokens: 400, CrossHostBytes: 3 << 20},
		{Policy: "kv", Err: "engine+router-a exited: --lb kv needs the engines' index"},
	}}
	var b strings.Builder
	require.NoError(t, rep.WriteTable(&b, KVWorkload()))
	out := b.String()
	require.Contains(t, out, "| round-robin      |     40.0% |          12.50 |         30.00 |        0 |             3.0 |      0 |")
	require.Contains(t, out, "| kv               | not run: engine+router-a exited: --lb kv needs")
	require.Contains(t, out, "| oracle           |     90.0%")
	require.True(t, rep.Failed())
	require.True(t, (&KVReport{}).Failed())
}
