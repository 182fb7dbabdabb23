package demo

import (
	"fmt"
	"io"
	"math"
	"strings"

	"github.com/pegaflow/pegaflow/bench"
)

// WriteTable prints the comparison in the shape of the seed's table (TTFT
// mean, TPOT mean and p99, ITL p99), a ratio row (P/D over DP2, or two
// hosts over one), and what the engines moved during the P/D runs.
func (r *Report) WriteTable(w io.Writer, workload bench.Config) error {
	var b strings.Builder
	where := ""
	if r.twoHosts() {
		where = "; P/D on one host and across two (network namespaces, peer stream over TCP)"
	}
	fmt.Fprintf(&b, "PegaFlow demo: %d prompts, %d input / %d output tokens, %s req/s, seed %d (random dataset, pegaflow sim)%s\n\n",
		workload.NumPrompts, workload.InputLen, workload.OutputLen, rateString(workload.RequestRate), workload.Seed, where)
	cols := []string{"setup", "TTFT mean", "TPOT mean", "TPOT p99", "ITL p99", "E2EL mean", "req/s", "ok", "failed"}
	fmt.Fprintf(&b, "| %-17s | %9s | %9s | %8s | %8s | %9s | %5s | %3s | %6s |\n", toAny(cols)...)
	fmt.Fprintf(&b, "|%s|%s:|%s:|%s:|%s:|%s:|%s:|%s:|%s:|\n", dashes(19), dashes(10), dashes(10), dashes(9),
		dashes(9), dashes(10), dashes(6), dashes(4), dashes(7))
	row := func(s Setup) {
		res := s.Result
		if res == nil {
			fmt.Fprintf(&b, "| %-17s | %9s | %9s | %8s | %8s | %9s | %5s | %3s | %6s |\n", s.Name, "-", "-", "-", "-", "-", "-", "-", "-")
			return
		}
		fmt.Fprintf(&b, "| %-17s | %9s | %9s | %8s | %8s | %9s | %5.2f | %3d | %6d |\n", s.Name,
			msCell(res.TTFT.Mean, res.TTFT.Count), msCell(res.TPOT.Mean, res.TPOT.Count),
			msCell(p99(res.TPOT), res.TPOT.Count), msCell(p99(res.ITL), res.ITL.Count),
			msCell(res.E2EL.Mean, res.E2EL.Count), res.RequestThroughput, res.Completed, res.Failed+res.NotSent)
	}
	other := r.compared()
	row(r.PD)
	row(other)
	// The ratio is the first row over the second, except across hosts:
	// two hosts over one, what crossing the link costs.
	num, den, label := r.PD.Result, other.Result, "P/D / DP2"
	if r.twoHosts() {
		num, den, label = other.Result, r.PD.Result, "2 hosts / 1 host"
	}
	if num != nil && den != nil {
		fmt.Fprintf(&b, "| %-17s | %9s | %9s | %8s | %8s | %9s | %5s | %3s | %6s |\n", label,
			ratio(num.TTFT.Mean, den.TTFT.Mean), ratio(num.TPOT.Mean, den.TPOT.Mean), ratio(p99(num.TPOT), p99(den.TPOT)),
			ratio(p99(num.ITL), p99(den.ITL)), ratio(num.E2EL.Mean, den.E2EL.Mean), "", "", "")
	}
	b.WriteString("(latencies in ms)\n\n")
	e := r.Engine
	fmt.Fprintf(&b, "Engine during the P/D run: hit ratio %s (%.0f of %.0f queried blocks), KV saved %s, loaded %s, %.0f transfers ready\n",
		percent(e.HitRatio()), e.HitBlocks, e.QueriedBlocks, mib(e.SavedBytes), mib(e.LoadedBytes), e.TransfersReady)
	fmt.Fprintf(&b, "D: %.0f prompt blocks loaded from the engine, %.0f prompt tokens computed itself (partial last blocks), %.0f KV verify failures\n",
		e.DBlocksLoaded, e.DPrefillTokens, e.DVerifyFailures)
	if r.twoHosts() && r.TwoHosts.Result != nil {
		x := r.TwoHostsEngine
		fmt.Fprintf(&b, "\nEngines during the P/D run across 2 hosts: A saved %s, %.0f transfers ready; B hit ratio %s (%.0f of %.0f queried blocks), loaded %s\n",
			mib(x.SavedBytes), x.TransfersReady, percent(x.HitRatio()), x.HitBlocks, x.QueriedBlocks, mib(x.LoadedBytes))
		fmt.Fprintf(&b, "D: %.0f blocks fetched from the peer engine (%s in %.0f fetches, %.0f ended short), %.0f prompt blocks loaded from engine B, %.0f prompt tokens computed itself, %.0f KV verify failures\n",
			x.PeerFetchedBlocks, mib(x.PeerFetchedBytes), x.PeerFetches, x.PeerFetchFailures, x.DBlocksLoaded, x.DPrefillTokens, x.DVerifyFailures)
	}
	for _, s := range []Setup{r.PD, other} {
		writeFailures(&b, s.Name, s.Result)
	}
	_, err := io.WriteString(w, b.String())
	return err
}

func toAny(s []string) []any {
	out := make([]any, len(s))
	for i, v := range s {
		out[i] = v
	}
	return out
}

func dashes(n int) string { return strings.Repeat("-", n) }

// p99 is the 99th percentile, NaN when the run did not ask for it.
func p99(s bench.Stats) float64 {
	if v, ok := s.Percentiles["99"]; ok {
		return v
	}
	return math.NaN()
}

func msCell(v float64, count int) string {
	if count == 0 || math.IsNaN(v) {
		return "-"
	}
	return fmt.Sprintf("%.2f", v)
}

func ratio(a, b float64) string {
	if b == 0 || math.IsNaN(a) || math.IsNaN(b) {
		return "-"
	}
	return fmt.Sprintf("%.2fx", a/b)
}

func percent(v float64) string {
	if math.IsNaN(v) {
		return "-"
	}
	return fmt.Sprintf("%.1f%%", 100*v)
}

// writeFailures lists a load run's failed requests by reason, one line
// each; a run that never ran (nil) lists none.
func writeFailures(b *strings.Builder, name string, res *bench.Result) {
	if res == nil {
		return
	}
	for _, f := range res.Failures {
		fmt.Fprintf(b, "%s failure: %d x %s\n", name, f.Count, f.Reason)
	}
}

func mib(bytes float64) string { return fmt.Sprintf("%.1f MiB", bytes/(1<<20)) }
