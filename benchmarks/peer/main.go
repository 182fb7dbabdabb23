// Command peer benchmarks the cross-host KV fetch (docs/multi-host.md):
// two real `pegaflow serve` engines, A and B, each with --peer-addr and a
// shared token file; a producer saves blocks into A through A's socket, a
// consumer queries B with source_engine = A, and B's query-to-answer time
// (B fetching the whole batch from A's pools over UCX) gives the peer fetch
// GB/s per share size. B's pegaflow_engine_peer_fetch_* metrics over the
// same queries are the cross-check. Next to it, in the same run, the bare
// UCX figure the target is measured against: benchmarks/native's
// two-process ucp_get_nbx reader (bareucx.go), the same bytes over the
// same memory footprint and window as the fetch; and, as a second,
// cache-hot reference, `ucx_perftest -t ucp_get` (server and client, the
// same UCX environment and window) when it is installed.
//
// UCX_TLS defaults to tcp (loopback here); scripts/bench-peer-rdma runs the
// same with UCX_TLS=rc and UCX_NET_DEVICES against a line rate. Without
// UCX in the build it prints why and exits 0.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"

	"github.com/pegaflow/pegaflow/internal/ids"
	"github.com/pegaflow/pegaflow/native"
)

type options struct {
	pegaflow, host, perftest, goTool, goTags, jsonOut string
	sizes                                             []int
	totalMiB, batchMiB, poolMiB, reps                 int
	lineRateGbps                                      float64
}

func main() {
	var o options
	sizes := flag.String("sizes", "16,64,256,1024,2048", "share sizes per block, KiB")
	flag.StringVar(&o.pegaflow, "pegaflow", "bin/pegaflow", "pegaflow binary (make build)")
	flag.StringVar(&o.host, "host", "127.0.0.1", "address the engines' peer API and ucx_perftest use (the KV network's on RDMA hosts)")
	flag.StringVar(&o.perftest, "ucx-perftest", "ucx_perftest", "ucx_perftest binary (Debian ucx-utils) for the cache-hot reference column; missing: no such column")
	flag.StringVar(&o.goTool, "go", "go", "go tool, to build benchmarks/native (the bare-UCX baseline)")
	flag.StringVar(&o.goTags, "go-tags", "", "build tags for benchmarks/native")
	flag.StringVar(&o.jsonOut, "json", "", "also write the rows as JSON here")
	flag.IntVar(&o.totalMiB, "total-mib", 256, "bytes fetched per size (timed), MiB")
	flag.IntVar(&o.batchMiB, "batch-mib", 32, "bytes per query, MiB")
	flag.IntVar(&o.poolMiB, "pool-mib", 512, "pool size of each engine, MiB")
	flag.IntVar(&o.reps, "reps", 5, "alternating repetitions of peer fetch and baselines per size; the best of each is reported")
	flag.Float64Var(&o.lineRateGbps, "line-rate-gbps", 0, "also print the peer fetch as a fraction of this line rate (Gbit/s)")
	dryRun := flag.Bool("dry-run", false, "print what it would run; start nothing")
	flag.Parse()
	var err error
	if o.sizes, err = parseSizes(*sizes); err != nil || o.totalMiB < o.batchMiB || o.batchMiB <= 0 || o.poolMiB < 2*o.batchMiB || o.reps <= 0 {
		fmt.Fprintln(os.Stderr, "bench-peer: need sizes in KiB, 0 < batch-mib <= total-mib, pool-mib >= 2*batch-mib, reps > 0", err)
		os.Exit(2)
	}
	if os.Getenv("UCX_TLS") == "" {
		os.Setenv("UCX_TLS", "tcp")
	}
	if *dryRun {
		printPlan(o)
		return
	}
	if !native.XferBuilt {
		fmt.Println("bench-peer: skipped: this build has no UCX transfer layer (apt-get install libucx-dev pkg-config, then make bench-peer)")
		return
	}
	if err := run(context.Background(), o); err != nil {
		fmt.Fprintln(os.Stderr, "bench-peer:", err)
		os.Exit(1)
	}
}

func ucxEnv() string {
	var kv []string
	for _, k := range []string{"UCX_TLS", "UCX_NET_DEVICES", "UCX_TCP_PORT_RANGE"} {
		if v := os.Getenv(k); v != "" {
			kv = append(kv, k+"="+v)
		}
	}
	return strings.Join(kv, " ")
}

// printPlan is -dry-run: the commands, sizes and counts, nothing started.
func printPlan(o options) {
	fmt.Printf("bench-peer dry run (%s)\n", ucxEnv())
	for _, e := range []struct{ name, allow string }{{"A", ""}, {"B", o.host + ":PORT_A"}} {
		fmt.Printf("engine %s: %s %s\n", e.name, o.pegaflow, strings.Join(engineArgs("DIR/"+e.name+".sock", "127.0.0.1:PORT",
			o.host+":PORT_"+e.name, "DIR/peer-token", e.allow, o.poolMiB), " "))
	}
	for _, size := range o.sizes {
		n := max((o.batchMiB<<20)/size, 1)
		p := planPerftest(size, o.totalMiB<<20)
		u := planBareUCX(size, o.batchMiB, o.totalMiB, o.poolMiB)
		fmt.Printf("%s: %d x {save %d blocks into A, query B (source_engine A) x %d timed + 1 warm-up; "+
			"nativebench %s | nativebench %s; %s %s & %s %s}\n",
			human(size), o.reps, n, o.totalMiB/o.batchMiB, strings.Join(u.targetArgs(), " "), strings.Join(u.initiatorArgs(), " "),
			o.perftest, strings.Join(p.serverArgs(13337), " "), o.perftest, strings.Join(p.clientArgs(o.host, 13337), " "))
	}
	if o.lineRateGbps > 0 {
		fmt.Printf("table: peer fetch also as a fraction of %g Gb/s line rate\n", o.lineRateGbps)
	}
}

func run(ctx context.Context, o options) error {
	dir, err := os.MkdirTemp("", "pegaflow-peerbench")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	tokenFile := filepath.Join(dir, "peer-token")
	if err := os.WriteFile(tokenFile, []byte(ids.Hex(32)+"\n"), 0o600); err != nil {
		return err
	}
	// Built before the engines start: the compile would slow nothing timed.
	nativeBench, err := buildNativeBench(ctx, o.goTool, o.goTags, dir)
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench-peer: no bare UCX baseline:", err)
	}
	perftest, lookErr := exec.LookPath(o.perftest)
	if lookErr != nil {
		fmt.Fprintf(os.Stderr, "bench-peer: %s not found (apt-get install ucx-utils): no cache-hot reference column\n", o.perftest)
	}
	a, err := startEngine(ctx, o.pegaflow, dir, "A", o.host, tokenFile, "", o.poolMiB)
	if err != nil {
		return err
	}
	defer a.stop()
	b, err := startEngine(ctx, o.pegaflow, dir, "B", o.host, tokenFile, a.peerAddr, o.poolMiB)
	if err != nil {
		return err
	}
	defer b.stop()

	var rows []row
	for _, size := range o.sizes {
		// Peer fetch and baselines alternate, best of each kept: on a
		// shared machine load only ever slows a measurement down.
		var best fetchResult
		var bare, hot float64
		for rep := range o.reps {
			f, err := measureFetch(ctx, a, b, size, o.batchMiB<<20, o.totalMiB/o.batchMiB, rep)
			if err != nil {
				return fmt.Errorf("%s: %w", human(size), err)
			}
			if f.FetchGBps > best.FetchGBps {
				best = f
			}
			if nativeBench != "" {
				g, err := runBareUCX(ctx, nativeBench, planBareUCX(size, o.batchMiB, o.totalMiB, o.poolMiB))
				if err != nil {
					fmt.Fprintf(os.Stderr, "bench-peer: %s bare UCX baseline: %v\n", human(size), err)
				}
				bare = max(bare, g)
			}
			if lookErr == nil {
				g, err := runPerftest(ctx, perftest, o.host, planPerftest(size, o.totalMiB<<20))
				if err != nil {
					fmt.Fprintf(os.Stderr, "bench-peer: %s ucx_perftest: %v\n", human(size), err)
				}
				hot = max(hot, g)
			}
		}
		rows = append(rows, makeRow(best, bare, hot, o.lineRateGbps))
	}
	fmt.Printf("Peer fetch: engine B fetching from engine A over UCX (%s, peer API on %s), %d MiB per size in queries of %d MiB,\n"+
		"vs bare UCX: two processes of plain ucp_get_nbx (benchmarks/native -ucx-get-*), the same batches, window and %d MiB remote footprint;\n"+
		"and ucx_perftest -t ucp_get (one buffer each side, cache-hot), same sizes and window; all alternating, best of %d repetitions; %d CPUs, one run\n\n",
		ucxEnv(), o.host, o.totalMiB, o.batchMiB, o.poolMiB, o.reps, runtime.NumCPU())
	printTable(os.Stdout, rows, o.lineRateGbps)
	if o.jsonOut != "" {
		js, _ := json.MarshalIndent(rows, "", "  ")
		return os.WriteFile(o.jsonOut, append(js, '\n'), 0o644)
	}
	return nil
}
