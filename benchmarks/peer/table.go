package main

import (
	"fmt"
	"io"
	"math"
	"slices"
	"strconv"
	"strings"
	"time"
)

// targetRatio is the goal for peer fetch / bare transfer, from
// targetFrom bytes per share up; smaller shares are dominated by per-block
// bookkeeping and get no target.
const (
	targetRatio = 0.8
	targetFrom  = 256 << 10
)

// row is one size's line of the table: the target is judged against the
// two-process bare figure of the run's transport (BareGBps: bare TCP, or
// bare UCX for rdma); ucx_perftest's cache-hot one (HotGBps, rdma only) is
// a reference beside it; 0 means that baseline is missing.
type row struct {
	fetchResult
	BareGBps float64 `json:"bare_gbps"`
	Ratio    float64 `json:"ratio"`
	Target   string  `json:"target"`
	HotGBps  float64 `json:"ucx_perftest_gbps,omitempty"`
	HotRatio float64 `json:"ucx_perftest_ratio,omitempty"`
	OfLine   float64 `json:"of_line_rate,omitempty"`
}

// tableOpts shape the table: the baseline's name, whether the cache-hot
// ucx_perftest columns are shown (rdma), and a line rate (0: none).
type tableOpts struct {
	baseline     string
	hot          bool
	lineRateGbps float64
}

// makeRow fills in the ratios and the verdict; lineRateGbps > 0 adds the
// fraction of line rate (Gbit/s, so /8 for GB/s).
func makeRow(f fetchResult, bare, hot, lineRateGbps float64) row {
	r := row{fetchResult: f, BareGBps: bare, HotGBps: hot, Target: "-"}
	if bare > 0 {
		r.Ratio = f.FetchGBps / bare
	}
	if hot > 0 {
		r.HotRatio = f.FetchGBps / hot
	}
	if f.ShareBytes >= targetFrom {
		verdict := "no baseline"
		switch {
		case bare <= 0:
		case r.Ratio >= targetRatio:
			verdict = "ok"
		default:
			verdict = "MISS"
		}
		r.Target = fmt.Sprintf(">= %.2f %s", targetRatio, verdict)
	}
	if lineRateGbps > 0 {
		r.OfLine = f.FetchGBps / (lineRateGbps / 8)
	}
	return r
}

// printTable writes the markdown table: the five columns, the
// cache-hot ucx_perftest reference when t.hot, then B's metrics as a
// cross-check and, against a line rate, the fraction of it.
func printTable(w io.Writer, rows []row, t tableOpts) {
	head := "| size | peer fetch GB/s | " + t.baseline + " GB/s | ratio | target |"
	if t.hot {
		head += " ucx_perftest GB/s (cache-hot) | ratio to it |"
	}
	head += " blocks/query | query p50 | B metrics GB/s |"
	if t.lineRateGbps > 0 {
		head += fmt.Sprintf(" of %g Gb/s line rate |", t.lineRateGbps)
	}
	fmt.Fprintln(w, head)
	fmt.Fprintln(w, "|"+strings.Repeat("---|", strings.Count(head, "|")-1))
	for _, r := range rows {
		bare, ratio := gbpsAndRatio(r.BareGBps, r.Ratio)
		metric := fmt.Sprintf("%.2f", r.MetricGBps)
		if !r.MetricsMatch {
			metric += fmt.Sprintf(" (counted %.0f B: mismatch)", r.MetricBytes)
		}
		line := fmt.Sprintf("| %s | %.2f | %s | %s | %s |", human(r.ShareBytes), r.FetchGBps, bare, ratio, r.Target)
		if t.hot {
			hot, hotRatio := gbpsAndRatio(r.HotGBps, r.HotRatio)
			line += fmt.Sprintf(" %s | %s |", hot, hotRatio)
		}
		line += fmt.Sprintf(" %d | %.1f ms | %s |", r.Blocks, r.QueryP50ms, metric)
		if t.lineRateGbps > 0 {
			line += fmt.Sprintf(" %.2f |", r.OfLine)
		}
		fmt.Fprintln(w, line)
	}
}

// gbpsAndRatio formats a baseline's cells, "-" for a missing one; the
// ratio is rounded down, so one shown as 0.80 never reads MISS.
func gbpsAndRatio(gbps, ratio float64) (string, string) {
	if gbps <= 0 {
		return "-", "-"
	}
	return fmt.Sprintf("%.2f", gbps), fmt.Sprintf("%.2f", math.Floor(ratio*100)/100)
}

func human(n int) string {
	if n >= 1<<20 && n%(1<<20) == 0 {
		return fmt.Sprintf("%d MiB", n>>20)
	}
	return fmt.Sprintf("%d KiB", n>>10)
}

// parseSizes reads a comma-separated list of sizes in KiB.
func parseSizes(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		k, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || k <= 0 || k > 1<<20 {
			return nil, fmt.Errorf("size %q: want KiB in 1..%d", f, 1<<20)
		}
		out = append(out, k<<10)
	}
	return out, nil
}

func p50(ds []time.Duration) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[len(s)/2]
}
