package demo

import (
	"math"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/pegaflow/pegaflow/bench"
)

func TestSSDRunRatios(t *testing.T) {
	run := SSDRun{Tiers: map[string]float64{"dram": 50, "ssd": 25, "peer": 0, "miss": 25}, PromptTokens: 200, HitTokens: 150}
	require.InDelta(t, 0.75, run.EngineHitRatio(), 1e-12)
	require.InDelta(t, 0.25, run.SSDShare(), 1e-12)
	require.InDelta(t, 0.75, run.SimHitRatio(), 1e-12)
	require.True(t, math.IsNaN(SSDRun{}.EngineHitRatio()))
	require.True(t, math.IsNaN(SSDRun{}.SimHitRatio()))
}

// The report fails unless all three runs served every request with no
// verification failure and the restart came back.
func TestSSDReportFailed(t *testing.T) {
	ok := func() SSDRun { return SSDRun{Result: &bench.Result{Completed: 4}} }
	good := func() *SSDReport {
		r := &SSDReport{Runs: []SSDRun{ok(), ok(), ok()}}
		r.Runs[2].Kill = &SSDKill{SimsBack: time.Second}
		return r
	}
	require.False(t, good().Failed())
	cases := []struct {
		name  string
		spoil func(r *SSDReport)
	}{
		{"a run missing", func(r *SSDReport) { r.Runs = r.Runs[:2] }},
		{"a lost request", func(r *SSDReport) { r.Runs[0].Result.Failed = 1 }},
		{"a verify failure", func(r *SSDReport) { r.Runs[1].VerifyFailures = 1 }},
		{"a run error", func(r *SSDReport) { r.Runs[1].Err = "engine exited" }},
		{"no restart", func(r *SSDReport) { r.Runs[2].Kill = nil }},
		{"sims never back", func(r *SSDReport) { r.Runs[2].Kill.SimsBack = 0 }},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := good()
			tc.spoil(r)
			require.True(t, r.Failed())
		})
	}
}

func TestSSDReportTable(t *testing.T) {
	pct := map[string]float64{"50": 20, "90": 90}
	res := func() *bench.Result {
		return &bench.Result{Completed: 4, FollowUps: &bench.TurnStats{TTFT: bench.Stats{Count: 3, Percentiles: pct}}}
	}
	rep := &SSDReport{Runs: []SSDRun{
		{Name: "no SSD", Result: res(), Tiers: map[string]float64{"dram": 40, "miss": 60}, PromptTokens: 100, HitTokens: 40},
		{Name: "SSD", SSD: true, Result: res(), Tiers: map[string]float64{"dram": 50, "ssd": 20, "miss": 30}, PromptTokens: 100, HitTokens: 70,
			Spilled: 12, Promoted: 9},
		{Name: "SSD, kill -9", SSD: true, Result: res(), Tiers: map[string]float64{"ssd": 10, "miss": 10}, Kill: &SSDKill{
			KilledAt: 6 * time.Second, EngineUp: 150 * time.Millisecond, SimsBack: 1500 * time.Millisecond, RecoveredBlocks: 500, RecoverySeconds: 0.05,
			Windows: []SSDWindow{{Start: 6 * time.Second, End: 8 * time.Second, Phase: "after", PromptTokens: 10, HitTokens: 5,
				Tiers: map[string]float64{"ssd": 10, "miss": 10}}},
		}},
	}}
	var b strings.Builder
	require.NoError(t, rep.WriteTable(&b, DefaultSSDSettings(), SSDPoolSize))
	out := b.String()
	require.Contains(t, out, "| no SSD        |      40.0% |      0.0% |    40.0% |         20.00 |         90.00 |       0 |        0 |      0 |      0 |")
	require.Contains(t, out, "| SSD           |      70.0% |     20.0% |    70.0% |         20.00 |         90.00 |      12 |        9 |      0 |      0 |")
	require.Contains(t, out, "recovered 500 blocks from the SSD directory in 0.050 s")
	require.Contains(t, out, "|   6.0-  8.0 s | after  |    50.0% |      50.0% |      0 |     10 |     10 |")
}
