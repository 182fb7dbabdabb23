package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/pegaflow/pegaflow/native"
)

func TestParsePerftestCSV(t *testing.T) {
	for _, tc := range []struct {
		name string
		out  string
		gbps float64
		ok   bool
	}{
		{"one row", "iterations,50.0_percentile_lat,avg_lat,overall_lat,avg_bw,overall_bw,avg_mr,overall_mr\n" +
			" 500,1127.666,1455.388,1455.388,171.78,1000.00,687,687\n", 1000 * 1048576 / 1e9, true},
		{"warnings around", "[1700000000.0] WARN something\niterations,overall_bw\n\n128,2000\ntrailer\n", 2000 * 1048576 / 1e9, true},
		{"no header", "500,1,2,3\n", 0, false},
		{"header only", "iterations,overall_bw\n", 0, false},
		{"empty", "", 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parsePerftestCSV([]byte(tc.out))
			if !tc.ok {
				require.Error(t, err)
				return
			}
			require.NoError(t, err)
			require.InDelta(t, tc.gbps, got, 1e-9)
		})
	}
}

func TestPlanPerftest(t *testing.T) {
	for _, tc := range []struct {
		size, total                int
		iters, warmup, outstanding int
	}{
		{16 << 10, 256 << 20, 16384, 1638, 256},
		{256 << 10, 256 << 20, 1024, 102, 64},
		{2 << 20, 256 << 20, 128, 12, 8},
		{32 << 20, 1 << 20, 1, 1, 1}, // a size over the window and the total
	} {
		p := planPerftest(tc.size, tc.total)
		require.Equal(t, perftestPlan{size: tc.size, iters: tc.iters, warmup: tc.warmup, outstanding: tc.outstanding}, p)
	}
	p := planPerftest(1<<20, 64<<20)
	require.Equal(t, []string{"10.0.0.1", "-p", "9", "-t", "ucp_get", "-s", "1048576", "-n", "64", "-w", "6", "-O", "16", "-v"},
		p.clientArgs("10.0.0.1", 9))
	require.Equal(t, []string{"-p", "9"}, p.serverArgs(9))
}

func TestMakeRow(t *testing.T) {
	for _, tc := range []struct {
		name            string
		share           int
		peer, bare, hot float64
		line            float64
		ratio, hotRatio float64
		target          string
		ofLine          float64
	}{
		{"small, no target", 64 << 10, 1, 2, 4, 0, 0.5, 0.25, "-", 0},
		{"met", 256 << 10, 1.6, 2, 2.5, 0, 0.8, 0.64, ">= 0.80 ok", 0},
		{"met against bare, not against cache-hot", 1 << 20, 1.7, 2, 3, 0, 0.85, 1.7 / 3, ">= 0.80 ok", 0},
		{"missed", 2 << 20, 1, 2, 0, 0, 0.5, 0, ">= 0.80 MISS", 0},
		{"no baseline, only cache-hot", 1 << 20, 1, 0, 1.1, 0, 0, 1 / 1.1, ">= 0.80 no baseline", 0},
		{"line rate", 1 << 20, 40, 50, 0, 400, 0.8, 0, ">= 0.80 ok", 0.8},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := makeRow(fetchResult{ShareBytes: tc.share, FetchGBps: tc.peer}, tc.bare, tc.hot, tc.line)
			require.InDelta(t, tc.ratio, r.Ratio, 1e-9)
			require.InDelta(t, tc.hotRatio, r.HotRatio, 1e-9)
			require.Equal(t, tc.target, r.Target)
			require.InDelta(t, tc.ofLine, r.OfLine, 1e-9)
		})
	}
}

func TestPrintTable(t *testing.T) {
	rows := []row{
		makeRow(fetchResult{ShareBytes: 16 << 10, FetchGBps: 1, Blocks: 2048, MetricGBps: 1.1, MetricsMatch: true}, 2, 4, 0),
		makeRow(fetchResult{ShareBytes: 2 << 20, FetchGBps: 1.8, Blocks: 16, MetricBytes: 5, MetricGBps: 1.9}, 0, 0, 0),
		makeRow(fetchResult{ShareBytes: 1 << 20, FetchGBps: 1.9954, Blocks: 32, QueryP50ms: 17.46, MetricsMatch: true}, 2.5, 2.2, 0),
	}
	for _, tc := range []struct {
		name string
		opts tableOpts
		head string
		want []string
	}{
		{"rdma: bare UCX and cache-hot", tableOpts{baseline: "bare UCX", hot: true},
			"| size | peer fetch GB/s | bare UCX GB/s | ratio | target | ucx_perftest GB/s (cache-hot) | ratio to it | blocks/query | query p50 | B metrics GB/s |",
			[]string{
				"| 16 KiB | 1.00 | 2.00 | 0.50 | - | 4.00 | 0.25 | 2048 | 0.0 ms | 1.10 |",
				"| 2 MiB | 1.80 | - | - | >= 0.80 no baseline | - | - | 16 | 0.0 ms | 1.90 (counted 5 B: mismatch) |",
				"| 1 MiB | 2.00 | 2.50 | 0.79 | >= 0.80 MISS | 2.20 | 0.90 | 32 | 17.5 ms | 0.00 |", // 0.798 shows as 0.79, not 0.80 MISS
			}},
		{"tcp: bare TCP only", tableOpts{baseline: "bare TCP"},
			"| size | peer fetch GB/s | bare TCP GB/s | ratio | target | blocks/query | query p50 | B metrics GB/s |",
			[]string{
				"| 16 KiB | 1.00 | 2.00 | 0.50 | - | 2048 | 0.0 ms | 1.10 |",
				"| 2 MiB | 1.80 | - | - | >= 0.80 no baseline | 16 | 0.0 ms | 1.90 (counted 5 B: mismatch) |",
				"| 1 MiB | 2.00 | 2.50 | 0.79 | >= 0.80 MISS | 32 | 17.5 ms | 0.00 |",
			}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var b bytes.Buffer
			printTable(&b, rows, tc.opts)
			lines := strings.Split(strings.TrimSpace(b.String()), "\n")
			require.Len(t, lines, 5)
			require.Equal(t, tc.head, lines[0])
			require.Equal(t, tc.want, lines[2:])
			for _, l := range lines[1:] {
				require.Equal(t, strings.Count(lines[0], "|"), strings.Count(l, "|"), l)
			}
		})
	}

	var b bytes.Buffer
	printTable(&b, []row{makeRow(fetchResult{ShareBytes: 1 << 20, FetchGBps: 25}, 40, 0, 400)}, tableOpts{baseline: "bare UCX", lineRateGbps: 400})
	require.Contains(t, b.String(), "of 400 Gb/s line rate |")
	require.Contains(t, b.String(), " 0.50 |\n")
}

func TestPlanBareUCX(t *testing.T) {
	for _, tc := range []struct {
		size, batch, total, pool int
		want                     bareUCXPlan
	}{
		{16 << 10, 32, 256, 512, bareUCXPlan{extent: 16 << 10, batchMiB: 32, regionMiB: 512, batches: 8, window: 256}},
		{256 << 10, 32, 256, 512, bareUCXPlan{extent: 256 << 10, batchMiB: 32, regionMiB: 512, batches: 8, window: 64}},
		{2 << 20, 16, 40, 64, bareUCXPlan{extent: 2 << 20, batchMiB: 16, regionMiB: 64, batches: 2, window: 8}},
	} {
		p := planBareUCX(tc.size, tc.batch, tc.total, tc.pool)
		require.Equal(t, tc.want, p)
		require.Equal(t, p.window, planPerftest(tc.size, tc.total<<20).outstanding, "both baselines get the agent's window")
	}
	p := planBareUCX(256<<10, 32, 256, 512)
	require.Equal(t, []string{"-ucx-get-target", "-region-mib", "512"}, p.targetArgs())
	require.Equal(t, []string{"-ucx-get-initiator", "-extent-kib", "256", "-batch-mib", "32", "-iters", "8", "-window", "64"},
		p.initiatorArgs())
}

func TestParseInitiatorJSON(t *testing.T) {
	got, err := parseInitiatorJSON([]byte(`[{"extent_bytes": 262144, "gbps": 2.5}]`))
	require.NoError(t, err)
	require.InDelta(t, 2.5, got, 1e-12)
	for _, bad := range []string{"", "{}", "[]", `[{"gbps": 0}]`, `[{"gbps": 1}, {"gbps": 2}]`, "not json"} {
		_, err := parseInitiatorJSON([]byte(bad))
		require.Error(t, err, bad)
	}
}

// The two-process baseline end to end over UCX tcp on loopback: the
// target's address line reaches the initiator, the GETs complete, and the
// target exits once the initiator is done.
func TestRunBareUCX(t *testing.T) {
	if testing.Short() || !native.XferBuilt {
		t.Skip("compiles benchmarks/native and needs UCX")
	}
	t.Setenv("UCX_TLS", "tcp")
	ctx := context.Background()
	bin, err := buildNativeBench(ctx, "go", "", t.TempDir())
	require.NoError(t, err)
	for _, p := range []bareUCXPlan{
		{extent: 256 << 10, batchMiB: 4, regionMiB: 8, batches: 3, window: 4},
		{extent: 1 << 20, batchMiB: 2, regionMiB: 3, batches: 2, window: 1}, // remote offsets wrap
	} {
		gbps, err := runBareUCX(ctx, bin, p)
		require.NoError(t, err, "%+v", p)
		require.Greater(t, gbps, 0.0)
	}

	// Bounds the C side checks (UCS_ERR_INVALID_PARAM, nothing posted): an
	// extent larger than the target's region, a window over the maximum.
	for _, p := range []bareUCXPlan{
		{extent: 2 << 20, batchMiB: 2, regionMiB: 1, batches: 1, window: 1},
		{extent: 1 << 20, batchMiB: 2, regionMiB: 2, batches: 1, window: 1<<16 + 1},
	} {
		_, err = runBareUCX(ctx, bin, p)
		require.ErrorContains(t, err, "initiator: ucs_status -5", "%+v", p)
	}
}

func TestParseSizes(t *testing.T) {
	got, err := parseSizes("16, 64,2048")
	require.NoError(t, err)
	require.Equal(t, []int{16 << 10, 64 << 10, 2 << 20}, got)
	for _, bad := range []string{"", "0", "-4", "16,x", "2097152"} {
		_, err := parseSizes(bad)
		require.Error(t, err, bad)
	}
}

func TestSpecFor(t *testing.T) {
	for _, size := range []int{16 << 10, 64 << 10, 256 << 10, 1 << 20, 2 << 20} {
		require.Equal(t, size, specFor(size, 4).BlockBytes(), human(size))
	}
}

func TestParsePeerMetrics(t *testing.T) {
	body := []byte("# HELP x\npegaflow_engine_peer_fetch_bytes_total 3.3554432e+07\n" +
		"pegaflow_engine_peer_fetch_duration_seconds_sum 0.25\npegaflow_engine_peer_fetch_duration_seconds_count 8\n" +
		"pegaflow_engine_peer_fetch_bytes_totalx 1\n")
	require.Equal(t, peerMetrics{bytes: 32 << 20, seconds: 0.25, fetches: 8}, parsePeerMetrics(body))
	require.Equal(t, peerMetrics{}, parsePeerMetrics(nil))
}

// The RDMA script cannot run here (no RDMA); its dry run must name the
// environment and pass the line rate through to the benchmark's plan.
func TestRDMAScriptDryRun(t *testing.T) {
	if testing.Short() {
		t.Skip("compiles the benchmark")
	}
	script, err := filepath.Abs("../../scripts/bench-peer-rdma")
	require.NoError(t, err)
	cmd := exec.Command(script, "--dry-run", "--net-devices", "mlx5_0:1", "--line-rate-gbps", "400", "--", "-sizes", "256,2048")
	if !native.XferBuilt { // the benchmark must compile without UCX here too
		cmd.Env = append(os.Environ(), "GO_TAGS=noucx")
	}
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "%s", out)
	s := string(out)
	for _, want := range []string{
		"env: UCX_TLS=rc UCX_NET_DEVICES=mlx5_0:1",
		"bench-peer dry run (--peer-transport=rdma, UCX_TLS=rc UCX_NET_DEVICES=mlx5_0:1)",
		"--peer-addr 127.0.0.1:PORT_A --peer-token-file",
		"--peer-allow 127.0.0.1:PORT_A",
		"--peer-transport rdma",
		"ucx_perftest 127.0.0.1 -p 13337 -t ucp_get -s 262144",
		"ucx_perftest 127.0.0.1 -p 13337 -t ucp_get -s 2097152",
		"nativebench -ucx-get-target -region-mib 1024 | nativebench -ucx-get-initiator -extent-kib 256 -batch-mib 128 -iters 4 -window 64",
		"fraction of 400 Gb/s line rate",
	} {
		require.Contains(t, s, want)
	}
	require.NotContains(t, s, "-s 16384", "-sizes reached the benchmark")
	require.NotContains(t, s, "-bare-tcp", "rdma is measured against bare UCX")

	for _, args := range [][]string{{"--dry-run"}, {"--dry-run", "--net-devices", "x", "--line-rate-gbps", "fast"}, {"--bogus"}} {
		err := exec.Command(script, args...).Run()
		var ee *exec.ExitError
		require.ErrorAs(t, err, &ee, "%v", args)
		require.Equal(t, 2, ee.ExitCode(), "%v", args)
	}
}

// TestMain lets the tests run this benchmark's main as a subprocess (the
// bare TCP pair, -dry-run) from the test binary itself.
func TestMain(m *testing.M) {
	if os.Getenv("PEERBENCH_RUN_MAIN") == "1" {
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// runMain runs the test binary as the benchmark with args.
func runMain(t *testing.T, env []string, args ...string) (string, int) {
	t.Helper()
	cmd := exec.Command(os.Args[0], args...)
	cmd.Env = append(append(os.Environ(), "PEERBENCH_RUN_MAIN=1"), env...)
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return string(out), ee.ExitCode()
	}
	require.NoError(t, err, "%s", out)
	return string(out), 0
}

// The bare TCP baseline reads as the fetch does: ~8 MiB chunks of whole
// blocks (engine/fetch.go with TP 1), so 4 chunks, and as many
// connections, per 32 MiB batch at every size.
func TestPlanBareTCP(t *testing.T) {
	for _, tc := range []struct {
		size, batch, total, pool int
		want                     bareTCPPlan
		chunks                   int
	}{
		{16 << 10, 32, 256, 512, bareTCPPlan{share: 16 << 10, blocks: 2048, perChunk: 512, batches: 8, regionMiB: 512}, 4},
		{256 << 10, 32, 256, 512, bareTCPPlan{share: 256 << 10, blocks: 128, perChunk: 32, batches: 8, regionMiB: 512}, 4},
		{2 << 20, 32, 256, 512, bareTCPPlan{share: 2 << 20, blocks: 16, perChunk: 4, batches: 8, regionMiB: 512}, 4},
		{3 << 20, 16, 40, 64, bareTCPPlan{share: 3 << 20, blocks: 5, perChunk: 2, batches: 2, regionMiB: 64}, 3}, // a short last chunk
		{16 << 20, 8, 8, 64, bareTCPPlan{share: 16 << 20, blocks: 1, perChunk: 1, batches: 1, regionMiB: 64}, 1}, // a block over the chunk size
		{1 << 10, 32, 32, 64, bareTCPPlan{share: 1 << 10, blocks: 32768, perChunk: 8192, batches: 1, regionMiB: 64}, 4},
	} {
		p := planBareTCP(tc.size, tc.batch, tc.total, tc.pool)
		require.Equal(t, tc.want, p)
		require.Equal(t, tc.chunks, p.chunks())
		require.NoError(t, p.check())
	}
	p := planBareTCP(256<<10, 32, 256, 512)
	require.Equal(t, []string{"-bare-tcp-writer", "-host", "::1", "-pool-mib", "512"}, p.writerArgs("::1"))
	require.Equal(t, []string{"-bare-tcp-reader", "-share-bytes", "262144", "-blocks", "128", "-chunk-blocks", "32", "-batches", "8",
		"-pool-mib", "512"}, p.readerArgs())
	require.ErrorContains(t, bareTCPPlan{share: 1 << 20, blocks: 9, perChunk: 1, batches: 1, regionMiB: 8}.check(), "larger than")
	require.Error(t, bareTCPPlan{share: 1 << 20, blocks: 1, batches: 1, regionMiB: 8}.check())
}

// startBareWriter runs a writer in-process; closing the returned writer
// stops it.
func startBareWriter(t *testing.T, poolBytes int) (string, io.Closer) {
	t.Helper()
	stdinR, stdinW := io.Pipe()
	outR, outW := io.Pipe()
	done := make(chan error, 1)
	go func() { done <- runBareTCPWriter("127.0.0.1", poolBytes, stdinR, outW) }()
	line, err := bufio.NewReader(outR).ReadString('\n')
	require.NoError(t, err)
	t.Cleanup(func() {
		_ = stdinW.Close()
		require.NoError(t, <-done)
	})
	return strings.TrimSpace(line), stdinW
}

// The reader gets the writer's bytes, each batch where the fetch would
// put it, over as many connections as chunks; the writer refuses a
// request outside its buffer by hanging up.
func TestBareTCPInProcess(t *testing.T) {
	const pool = 4 << 20
	addr, _ := startBareWriter(t, pool)
	p := bareTCPPlan{share: 96 << 10, blocks: 10, perChunk: 3, batches: 5, regionMiB: 4} // 4 chunks, batches wrap
	dst := touchedBuffer(pool, 0xa5)
	r, err := readBatches(context.Background(), addr, p, dst)
	require.NoError(t, err)
	require.Equal(t, bareTCPResult{ShareBytes: 96 << 10, BatchBytes: 960 << 10, ChunkBlocks: 3, Conns: 4, Batches: 5,
		Seconds: r.Seconds, GBps: r.GBps}, r)
	require.Greater(t, r.GBps, 0.0)
	require.Equal(t, touchedBuffer(pool, 0)[:4*(960<<10)], dst[:4*(960<<10)], "read bytes are the writer's")

	c, err := net.Dial("tcp", addr)
	require.NoError(t, err)
	defer c.Close()
	req := make([]byte, bareRequestLen)
	binary.LittleEndian.PutUint64(req, pool-10)
	binary.LittleEndian.PutUint64(req[8:], 11)
	_, err = c.Write(req)
	require.NoError(t, err)
	require.NoError(t, c.SetReadDeadline(time.Now().Add(10*time.Second)))
	_, err = c.Read(make([]byte, 1))
	require.ErrorIs(t, err, io.EOF, "a request past the buffer's end gets no byte")
}

// The pair end to end as the benchmark runs it: two processes of the
// benchmark binary, the writer's address handed over, JSON back; a plan
// the reader refuses exits 2 and fails the measurement.
func TestRunBareTCPPair(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes")
	}
	t.Setenv("PEERBENCH_RUN_MAIN", "1")
	p := planBareTCP(256<<10, 4, 8, 8)
	gbps, err := runPair(context.Background(), "bare tcp", os.Args[0], p.writerArgs("127.0.0.1"), p.readerArgs())
	require.NoError(t, err)
	require.Greater(t, gbps, 0.0)

	p.regionMiB = 1 // a 4 MiB batch in 1 MiB buffers
	_, err = runPair(context.Background(), "bare tcp", os.Args[0], p.writerArgs("127.0.0.1"), p.readerArgs())
	require.ErrorContains(t, err, "larger than the 1 MiB region")
}

// -dry-run prints the default (tcp) plan: the engines' transport and the
// bare TCP pair per size, nothing of UCX; rdma without RDMA-only UCX_TLS
// is refused before anything starts, as the engines would refuse it.
func TestDryRun(t *testing.T) {
	out, code := runMain(t, []string{"UCX_TLS="}, "-dry-run", "-sizes", "256,2048", "-pegaflow", "/bin/false")
	require.Equal(t, 0, code, out)
	for _, want := range []string{
		"bench-peer dry run (--peer-transport=tcp)",
		"engine A: /bin/false serve --socket DIR/A.sock",
		"--peer-transport tcp --log-level warn",
		"256 KiB: 5 x {save 512 blocks into A, query B (source_engine A) x 4 timed + 1 warm-up; " +
			"peerbench -bare-tcp-writer -host 127.0.0.1 -pool-mib 1024 | peerbench -bare-tcp-reader -share-bytes 262144 -blocks 512 -chunk-blocks 32 -batches 4 -pool-mib 1024}",
		"2 MiB: 5 x {save 64 blocks into A",
	} {
		require.Contains(t, out, want)
	}
	for _, not := range []string{"UCX", "ucx", "nativebench", "16 KiB"} {
		require.NotContains(t, out, not)
	}

	for _, tc := range []struct {
		env  string
		args []string
		want string
	}{
		{"UCX_TLS=", []string{"-dry-run", "-transport", "rdma"}, "UCX_TLS unset"},
		{"UCX_TLS=tcp", []string{"-dry-run", "-transport", "rdma"}, `"tcp" is not an RDMA transport`},
		{"UCX_TLS=", []string{"-dry-run", "-transport", "udp"}, "--peer-transport"},
		{"UCX_TLS=", []string{"-dry-run", "-batch-mib", "0"}, "need sizes"},
		{"UCX_TLS=", []string{"-bare-tcp-reader", "-pool-mib", "1"}, "need share-bytes"},
	} {
		out, code := runMain(t, []string{tc.env}, tc.args...)
		require.Equal(t, 2, code, "%v: %s", tc.args, out)
		require.Contains(t, out, tc.want, tc.args)
	}
}
