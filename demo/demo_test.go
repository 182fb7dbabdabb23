package demo

import (
	"bytes"
	"encoding/json"
	"math"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/pegaflow/pegaflow/bench"
)

func TestParseMetrics(t *testing.T) {
	page := `# HELP pegaflow_engine_hits_total Query hits.
# TYPE pegaflow_engine_hits_total counter
pegaflow_engine_hits_total 12
# TYPE pegaflow_engine_transfers_total counter
pegaflow_engine_transfers_total{status="ready"} 5
pegaflow_engine_transfers_total{status="failed"} 2
# TYPE sim_step_duration_seconds histogram
sim_step_duration_seconds_bucket{le="0.1"} 3
sim_step_duration_seconds_bucket{le="+Inf"} 4
sim_step_duration_seconds_sum 0.5
sim_step_duration_seconds_count 4
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 3
`
	s, err := bench.ParseMetrics(strings.NewReader(page))
	require.NoError(t, err)
	cases := []struct {
		key  string
		want float64
	}{
		{"pegaflow_engine_hits_total", 12},
		{"pegaflow_engine_transfers_total", 7},
		{`pegaflow_engine_transfers_total{status="ready"}`, 5},
		{`pegaflow_engine_transfers_total{status="failed"}`, 2},
		{"sim_step_duration_seconds_count", 4},
		{"sim_step_duration_seconds_sum", 0.5},
		{"vllm:num_requests_running", 3},
	}
	for _, tc := range cases {
		require.Equal(t, tc.want, s[tc.key], tc.key)
	}

	before := bench.Sample{"a": 1, "b": 5}
	after := bench.Sample{"a": 4, "b": 5, "c": 2}
	require.Equal(t, bench.Sample{"a": 3, "b": 0, "c": 2}, after.Delta(before))

	_, err = bench.ParseMetrics(strings.NewReader("not a metric page {"))
	require.Error(t, err)
}

func TestHitRatio(t *testing.T) {
	require.True(t, math.IsNaN(EngineStats{}.HitRatio()))
	require.InDelta(t, 0.75, EngineStats{QueriedBlocks: 8, HitBlocks: 6}.HitRatio(), 1e-12)
}

func stats(mean, p99 float64) bench.Stats {
	return bench.Stats{Count: 10, Mean: mean, Percentiles: map[string]float64{"99": p99}}
}

func TestWriteTable(t *testing.T) {
	w := DefaultConfig().Workload
	rep := &Report{
		PD: Setup{Name: "P/D 1P+1D", Result: &bench.Result{
			Completed: 10, RequestThroughput: 1.5,
			TTFT: stats(200, 300), TPOT: stats(10, 12), ITL: stats(10, 20), E2EL: stats(1700, 1900),
		}},
		DP2: Setup{Name: "DP2 2x aggregated", Result: &bench.Result{
			Completed: 9, Failed: 1, RequestThroughput: 1.4,
			TTFT: stats(100, 150), TPOT: stats(20, 40), ITL: stats(12, 80), E2EL: stats(2100, 2500),
			Failures: []bench.Failure{{Reason: "HTTP 503: no healthy backend", Count: 1}},
		}},
		Engine: EngineStats{QueriedBlocks: 100, HitBlocks: 100, SavedBytes: 3 << 20, LoadedBytes: 3 << 20, TransfersReady: 10},
	}
	var b bytes.Buffer
	require.NoError(t, rep.WriteTable(&b, w))
	out := b.String()
	for _, want := range []string{
		"| P/D 1P+1D         |    200.00 |     10.00 |    12.00 |    20.00 |   1700.00 |  1.50 |  10 |      0 |",
		"| DP2 2x aggregated |    100.00 |     20.00 |    40.00 |    80.00 |   2100.00 |  1.40 |   9 |      1 |",
		"| P/D / DP2         |     2.00x |     0.50x |    0.30x |    0.25x |     0.81x |",
		"hit ratio 100.0% (100 of 100 queried blocks), KV saved 3.0 MiB, loaded 3.0 MiB, 10 transfers ready",
		"DP2 2x aggregated failure: 1 x HTTP 503: no healthy backend",
	} {
		require.Contains(t, out, want)
	}
	require.True(t, rep.Failed())
	rep.DP2.Result.Failed = 0
	require.False(t, rep.Failed())
}

func TestValidate(t *testing.T) {
	cases := []struct {
		name   string
		mutate func(*Config)
		want   string
	}{
		{"no binary", func(c *Config) { c.Binary = "" }, "binary"},
		{"no work dir", func(c *Config) { c.WorkDir = "" }, "work directory"},
		{"no start timeout", func(c *Config) { c.StartTimeout = 0 }, "timeout"},
		{"bad workload", func(c *Config) { c.Workload.NumPrompts = 0 }, "num-prompts"},
		{"bad rate", func(c *Config) { c.Workload.RequestRate = -1 }, "rate"},
		{"bad hosts", func(c *Config) { c.Hosts = 3 }, "hosts 3"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := DefaultConfig()
			c.Binary = "/bin/true"
			tc.mutate(&c)
			require.ErrorContains(t, c.Validate(), tc.want)
		})
	}
	c := DefaultConfig()
	c.Binary = "/bin/true"
	c.StopGrace = time.Second
	require.NoError(t, c.Validate())
}

func TestWriteTableTwoHosts(t *testing.T) {
	w := DefaultConfig().Workload
	rep := &Report{
		PD: Setup{Name: pdName, Result: &bench.Result{Completed: 10, RequestThroughput: 1.5,
			TTFT: stats(200, 300), TPOT: stats(10, 12), ITL: stats(10, 20), E2EL: stats(1700, 1900)}},
		TwoHosts: Setup{Name: twoHostsName, Result: &bench.Result{Completed: 10, RequestThroughput: 1.5,
			TTFT: stats(300, 400), TPOT: stats(10, 12), ITL: stats(15, 30), E2EL: stats(1800, 2000)}},
		Engine: EngineStats{QueriedBlocks: 100, HitBlocks: 100, DBlocksLoaded: 100},
		TwoHostsEngine: EngineStats{QueriedBlocks: 100, HitBlocks: 100, SavedBytes: 2 << 20, LoadedBytes: 2 << 20, TransfersReady: 10,
			DBlocksLoaded: 100, DPrefillTokens: 80, PeerFetchedBlocks: 100, PeerFetchedBytes: 2 << 20, PeerFetches: 10},
	}
	var b bytes.Buffer
	require.NoError(t, rep.WriteTable(&b, w))
	out := b.String()
	for _, want := range []string{
		"; P/D on one host and across two (network namespaces, peer stream over TCP)",
		"| P/D 1P+1D         |    200.00 |",
		"| P/D 2 hosts       |    300.00 |     10.00 |    12.00 |    30.00 |   1800.00 |  1.50 |  10 |      0 |",
		"| 2 hosts / 1 host  |     1.50x |     1.00x |    1.00x |    1.50x |     1.06x |",
		"Engines during the P/D run across 2 hosts: A saved 2.0 MiB, 10 transfers ready; B hit ratio 100.0% (100 of 100 queried blocks), loaded 2.0 MiB",
		"D: 100 blocks fetched from the peer engine (2.0 MiB in 10 fetches, 0 ended short), 100 prompt blocks loaded from engine B, 80 prompt tokens computed itself, 0 KV verify failures",
	} {
		require.Contains(t, out, want)
	}
	require.NotContains(t, out, "DP2")
	require.False(t, rep.Failed(), "DP2 is not part of a two-host run")
	rep.TwoHosts.Result = nil
	require.True(t, rep.Failed(), "the two-host run did not run")

	// A one-host report's JSON has no two-host part, a two-host one no DP2.
	one, err := json.Marshal(&Report{PD: rep.PD, DP2: Setup{Name: "DP2 2x aggregated"}})
	require.NoError(t, err)
	require.NotContains(t, string(one), "two_hosts")
	require.NotContains(t, string(one), "peer_fetched")
	two, err := json.Marshal(rep)
	require.NoError(t, err)
	require.NotContains(t, string(two), `"dp2"`)
	require.Contains(t, string(two), `"two_hosts"`)
}
