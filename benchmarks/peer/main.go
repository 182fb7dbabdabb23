// Command peer benchmarks the cross-host KV fetch (docs/multi-host.md):
// two real `pegaflow serve` engines, A and B, each with --peer-addr and a
// shared token file; a producer saves blocks into A through A's socket, a
// consumer queries B with source_engine = A, and B's query-to-answer time
// (B fetching the whole batch from A's pools) gives the peer fetch GB/s
// per share size. B's pegaflow_engine_peer_fetch_* metrics over the same
// queries are the cross-check. Next to it, in the same run, the bare
// figure the target is measured against, the same bytes over the same
// transport with no PegaFlow code:
//
//   - -transport tcp (the default; the engines' --peer-transport=tcp, the
//     validated stream): two processes of this benchmark
//     (-bare-tcp-writer, -bare-tcp-reader, baretcp.go) moving the fetch's
//     bytes over loopback TCP with plain Go net, chunked and in parallel
//     as the fetch reads them. No UCX is needed.
//   - -transport rdma (scripts/bench-peer-rdma: UCX one-sided GETs, which
//     the engines allow only when UCX_TLS names RDMA transports only):
//     benchmarks/native's two-process ucp_get_nbx reader (bareucx.go), the
//     same bytes over the same memory footprint and window as the fetch;
//     and, as a second, cache-hot reference, `ucx_perftest -t ucp_get`
//     when it is installed. Without UCX in the build it prints why and
//     exits 0.
//
// Files: main.go the flags, the plan (-dry-run) and the run over sizes;
// engines.go the two engines (start, health, metrics scrape); fetch.go one
// size's timed fetches through the engines' sockets; baretcp.go and
// bareucx.go the bare baselines above; perftest.go the ucx_perftest
// reference; table.go the markdown table and its verdicts.
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

	"github.com/pegaflow/pegaflow/engine"
	"github.com/pegaflow/pegaflow/internal/ids"
	"github.com/pegaflow/pegaflow/native"
)

type options struct {
	pegaflow, host, transport, perftest, goTool, goTags, jsonOut string
	sizes                                                        []int
	totalMiB, batchMiB, poolMiB, reps                            int
	lineRateGbps                                                 float64
}

// rdma reports whether the run measures UCX one-sided reads.
func (o options) rdma() bool { return o.transport == engine.PeerTransportRDMA }

func main() {
	var o options
	sizes := flag.String("sizes", "16,64,256,1024,2048", "share sizes per block, KiB")
	flag.StringVar(&o.pegaflow, "pegaflow", "bin/pegaflow", "pegaflow binary (make build)")
	flag.StringVar(&o.host, "host", "127.0.0.1", "address the engines' peer API and the baselines use (the KV network's on RDMA hosts)")
	flag.StringVar(&o.transport, "transport", engine.PeerTransportTCP, "the engines' --peer-transport: tcp (validated stream, vs bare TCP) "+
		"or rdma (UCX one-sided reads, vs bare UCX; UCX_TLS must name RDMA transports only)")
	flag.StringVar(&o.perftest, "ucx-perftest", "ucx_perftest", "-transport rdma: ucx_perftest binary (Debian ucx-utils) for the cache-hot reference column; missing: no such column")
	flag.StringVar(&o.goTool, "go", "go", "-transport rdma: go tool, to build benchmarks/native (the bare-UCX baseline)")
	flag.StringVar(&o.goTags, "go-tags", "", "-transport rdma: build tags for benchmarks/native")
	flag.StringVar(&o.jsonOut, "json", "", "also write the rows as JSON here")
	flag.IntVar(&o.totalMiB, "total-mib", 512, "bytes fetched per size (timed), MiB")
	flag.IntVar(&o.batchMiB, "batch-mib", 128, "bytes per query, MiB (a prompt's KV: 128 MiB is ~900 tokens of an 8B model)")
	flag.IntVar(&o.poolMiB, "pool-mib", 1024, "pool size of each engine (and the bare baselines' buffers), MiB")
	flag.IntVar(&o.reps, "reps", 5, "alternating repetitions of peer fetch and baselines per size; the best of each is reported")
	flag.Float64Var(&o.lineRateGbps, "line-rate-gbps", 0, "also print the peer fetch as a fraction of this line rate (Gbit/s)")
	dryRun := flag.Bool("dry-run", false, "print what it would run; start nothing")
	// The bare TCP baseline's two processes: this benchmark run again.
	var bare bareTCPPlan
	writer := flag.Bool("bare-tcp-writer", false, "baseline process: serve a -pool-mib buffer on -host until stdin closes (prints its address)")
	reader := flag.Bool("bare-tcp-reader", false, "baseline process: read batches from the writer whose address is on stdin; print JSON")
	flag.IntVar(&bare.share, "share-bytes", 0, "-bare-tcp-reader: bytes per block")
	flag.IntVar(&bare.blocks, "blocks", 0, "-bare-tcp-reader: blocks per batch")
	flag.IntVar(&bare.perChunk, "chunk-blocks", 0, "-bare-tcp-reader: blocks per chunk (one connection each)")
	flag.IntVar(&bare.batches, "batches", 0, "-bare-tcp-reader: timed batches, after one warm-up")
	flag.Parse()
	if *writer || *reader {
		bare.regionMiB = o.poolMiB
		os.Exit(bareTCPMain(*writer, o.host, bare))
	}
	var err error
	if o.sizes, err = parseSizes(*sizes); err != nil || o.totalMiB < o.batchMiB || o.batchMiB <= 0 || o.poolMiB < 2*o.batchMiB || o.reps <= 0 {
		fmt.Fprintln(os.Stderr, "bench-peer: need sizes in KiB, 0 < batch-mib <= total-mib, pool-mib >= 2*batch-mib, reps > 0", err)
		os.Exit(2)
	}
	// The engines refuse an unsafe transport (exit 2); say why before
	// starting them.
	if err := engine.CheckPeerTransport(o.transport, os.Getenv); err != nil {
		fmt.Fprintln(os.Stderr, "bench-peer:", err)
		os.Exit(2)
	}
	if *dryRun {
		printPlan(o)
		return
	}
	if o.rdma() && !native.XferBuilt {
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

// envLine names the run's transport and, for rdma, its UCX environment.
func envLine(o options) string {
	if o.rdma() {
		return "--peer-transport=rdma, " + ucxEnv()
	}
	return "--peer-transport=tcp"
}

// printPlan is -dry-run: the commands, sizes and counts, nothing started.
func printPlan(o options) {
	fmt.Printf("bench-peer dry run (%s)\n", envLine(o))
	for _, e := range []struct{ name, allow string }{{"A", ""}, {"B", o.host + ":PORT_A"}} {
		fmt.Printf("engine %s: %s %s\n", e.name, o.pegaflow, strings.Join(engineArgs("DIR/"+e.name+".sock", "127.0.0.1:PORT",
			o.host+":PORT_"+e.name, "DIR/peer-token", e.allow, o.transport, o.poolMiB), " "))
	}
	for _, size := range o.sizes {
		n := max((o.batchMiB<<20)/size, 1)
		fmt.Printf("%s: %d x {save %d blocks into A, query B (source_engine A) x %d timed + 1 warm-up; ",
			human(size), o.reps, n, o.totalMiB/o.batchMiB)
		if !o.rdma() {
			b := planBareTCP(size, o.batchMiB, o.totalMiB, o.poolMiB)
			fmt.Printf("peerbench %s | peerbench %s}\n", strings.Join(b.writerArgs(o.host), " "), strings.Join(b.readerArgs(), " "))
			continue
		}
		p := planPerftest(size, o.totalMiB<<20)
		u := planBareUCX(size, o.batchMiB, o.totalMiB, o.poolMiB)
		fmt.Printf("nativebench %s | nativebench %s; %s %s & %s %s}\n",
			strings.Join(u.targetArgs(), " "), strings.Join(u.initiatorArgs(), " "),
			o.perftest, strings.Join(p.serverArgs(13337), " "), o.perftest, strings.Join(p.clientArgs(o.host, 13337), " "))
	}
	if o.lineRateGbps > 0 {
		fmt.Printf("table: peer fetch also as a fraction of %g Gb/s line rate\n", o.lineRateGbps)
	}
}

// baselines measures one size's bare figures, in the same run as the
// fetch: for tcp the bare TCP pair; for rdma bare UCX and, when found,
// ucx_perftest. A missing or failed baseline reads 0 (printed "-").
type baselines struct {
	o           options
	self        string // this benchmark's binary, for the bare TCP pair
	nativeBench string
	perftest    string
}

func newBaselines(ctx context.Context, o options, dir string) *baselines {
	b := &baselines{o: o}
	if !o.rdma() {
		self, err := os.Executable()
		if err != nil {
			fmt.Fprintln(os.Stderr, "bench-peer: no bare TCP baseline:", err)
		}
		b.self = self
		return b
	}
	// Built before the engines start: the compile would slow nothing timed.
	var err error
	if b.nativeBench, err = buildNativeBench(ctx, o.goTool, o.goTags, dir); err != nil {
		fmt.Fprintln(os.Stderr, "bench-peer: no bare UCX baseline:", err)
	}
	if b.perftest, err = exec.LookPath(o.perftest); err != nil {
		fmt.Fprintf(os.Stderr, "bench-peer: %s not found (apt-get install ucx-utils): no cache-hot reference column\n", o.perftest)
	}
	return b
}

// measure returns the bare and cache-hot GB/s of one repetition.
func (b *baselines) measure(ctx context.Context, size int) (bare, hot float64) {
	o := b.o
	report := func(what string, g float64, err error) float64 {
		if err != nil {
			fmt.Fprintf(os.Stderr, "bench-peer: %s %s: %v\n", human(size), what, err)
		}
		return g
	}
	if b.self != "" {
		p := planBareTCP(size, o.batchMiB, o.totalMiB, o.poolMiB)
		g, err := runPair(ctx, "bare tcp", b.self, p.writerArgs(o.host), p.readerArgs())
		bare = report("bare TCP baseline", g, err)
	}
	if b.nativeBench != "" {
		g, err := runBareUCX(ctx, b.nativeBench, planBareUCX(size, o.batchMiB, o.totalMiB, o.poolMiB))
		bare = report("bare UCX baseline", g, err)
	}
	if b.perftest != "" {
		g, err := runPerftest(ctx, b.perftest, o.host, planPerftest(size, o.totalMiB<<20))
		hot = report("ucx_perftest", g, err)
	}
	return bare, hot
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
	base := newBaselines(ctx, o, dir)
	a, err := startEngine(ctx, o.pegaflow, dir, "A", o.host, tokenFile, "", o.transport, o.poolMiB)
	if err != nil {
		return err
	}
	defer a.stop()
	b, err := startEngine(ctx, o.pegaflow, dir, "B", o.host, tokenFile, a.peerAddr, o.transport, o.poolMiB)
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
			g, h := base.measure(ctx, size)
			bare, hot = max(bare, g), max(hot, h)
		}
		rows = append(rows, makeRow(best, bare, hot, o.lineRateGbps))
	}
	t := tableOpts{baseline: "bare TCP", lineRateGbps: o.lineRateGbps}
	if o.rdma() {
		t = tableOpts{baseline: "bare UCX", hot: true, lineRateGbps: o.lineRateGbps}
		fmt.Printf("Peer fetch: engine B fetching from engine A over UCX one-sided GETs (%s, peer API on %s), %d MiB per size in queries of %d MiB,\n"+
			"vs bare UCX: two processes of plain ucp_get_nbx (benchmarks/native -ucx-get-*), the same batches, window and %d MiB remote footprint;\n"+
			"and ucx_perftest -t ucp_get (one buffer each side, cache-hot), same sizes and window; all alternating, best of %d repetitions; %d CPUs, one run\n\n",
			envLine(o), o.host, o.totalMiB, o.batchMiB, o.poolMiB, o.reps, runtime.NumCPU())
	} else {
		fmt.Printf("Peer fetch: engine B fetching from engine A over the validated stream (%s, on %s), %d MiB per size in queries of %d MiB,\n"+
			"vs bare TCP: two processes of plain Go net on %s moving the same batches in the fetch's chunks (~%d MiB of whole blocks, in parallel,\n"+
			"one connection each) from and into %d MiB buffers; alternating, best of %d repetitions; %d CPUs, one run\n\n",
			envLine(o), o.host, o.totalMiB, o.batchMiB, o.host, fetchChunkBytes>>20, o.poolMiB, o.reps, runtime.NumCPU())
	}
	printTable(os.Stdout, rows, t)
	if o.jsonOut != "" {
		js, _ := json.MarshalIndent(rows, "", "  ")
		return os.WriteFile(o.jsonOut, append(js, '\n'), 0o644)
	}
	return nil
}
