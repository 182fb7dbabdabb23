// Command engine benchmarks the engine through its real API: a separate
// client process saves and loads over the UNIX socket while the engine runs
// in this process, and every figure is printed next to a baseline measured
// in the same run (memcpy, bare UNIX-socket ping-pong).
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/proto"

	"github.com/pegaflow/pegaflow/engine"
	pb "github.com/pegaflow/pegaflow/engine/api/pegaflowv1"
	"github.com/pegaflow/pegaflow/engine/client"
	"github.com/pegaflow/pegaflow/engine/server"
	"github.com/pegaflow/pegaflow/internal/kvtest"
)

type copyResult struct {
	BlockBytes   int     `json:"block_bytes"`
	APIGBps      float64 `json:"api_gbps"`
	MemcpyGBps   float64 `json:"memcpy_gbps"`
	SaveGBps     float64 `json:"save_gbps"`
	LoadGBps     float64 `json:"load_gbps"`
	QueryP50us   float64 `json:"query_p50_us,omitempty"`
	QueryP99us   float64 `json:"query_p99_us,omitempty"`
	RPCp50us     float64 `json:"rpc_p50_us,omitempty"`
	PingPongP50  float64 `json:"pingpong_p50_us,omitempty"`
	RPCBytes     int     `json:"rpc_bytes,omitempty"`
	SmallRPCp50  float64 `json:"small_rpc_p50_us,omitempty"`
	SmallPingP50 float64 `json:"small_pingpong_p50_us,omitempty"`
}

func main() {
	if os.Getenv("PEGAFLOW_BENCH_ROLE") == "client" {
		if err := runClient(); err != nil {
			fmt.Fprintln(os.Stderr, "client:", err)
			os.Exit(1)
		}
		return
	}
	poolSize := flag.Uint64("pool-bytes", 1<<30, "engine pool size")
	batchBytes := flag.Int("batch-bytes", 64<<20, "bytes per Save/Load call")
	rounds := flag.Int("rounds", 6, "timed rounds per block size")
	threads := flag.Int("copy-threads", 2, "engine copy threads")
	flag.Parse()
	if err := run(*poolSize, *batchBytes, *rounds, *threads); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

func run(poolSize uint64, batchBytes, rounds, threads int) error {
	eng, err := engine.New(engine.Config{PoolSize: poolSize, NUMANode: -1, Device: -1, CopyThreads: threads}, nil, prometheus.NewRegistry())
	if err != nil {
		return err
	}
	defer eng.Close()
	dir, err := os.MkdirTemp("", "pegaflow-bench")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	sock := filepath.Join(dir, "engine.sock")
	srv, err := server.New(server.Config{SocketPath: sock}, eng, nil, nil)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go srv.Serve(ctx)
	echo, err := startEcho(filepath.Join(dir, "echo.sock"))
	if err != nil {
		return err
	}
	defer echo.Close()

	exe, _ := os.Executable()
	cmd := exec.Command(exe)
	cmd.Env = append(os.Environ(), "PEGAFLOW_BENCH_ROLE=client", "PEGAFLOW_BENCH_SOCKET="+sock,
		"PEGAFLOW_BENCH_ECHO="+filepath.Join(dir, "echo.sock"),
		"PEGAFLOW_BENCH_BATCH="+strconv.Itoa(batchBytes), "PEGAFLOW_BENCH_ROUNDS="+strconv.Itoa(rounds))
	cmd.Stderr = os.Stderr
	out, err := cmd.Output()
	if err != nil {
		return fmt.Errorf("client process: %w", err)
	}
	var results []copyResult
	if err := json.Unmarshal(out, &results); err != nil {
		return fmt.Errorf("client output: %w", err)
	}
	lookups := inProcessLookups(eng)

	w := os.Stdout
	fmt.Fprintf(w, "Engine benchmark (backend %s, %d copy threads, client in a separate process, one run)\n\n", eng.Backend(), threads)
	fmt.Fprintln(w, "| block | save GB/s | load GB/s | save+load GB/s | memcpy GB/s | ratio | target |")
	fmt.Fprintln(w, "|---|---|---|---|---|---|---|")
	for _, r := range results {
		target := "-"
		if r.BlockBytes >= 256<<10 {
			target = ">= 0.80"
		}
		fmt.Fprintf(w, "| %s | %.2f | %.2f | %.2f | %.2f | %.2f | %s |\n", human(r.BlockBytes), r.SaveGBps, r.LoadGBps,
			r.APIGBps, r.MemcpyGBps, r.APIGBps/r.MemcpyGBps, target)
	}
	q := results[0]
	fmt.Fprintln(w)
	fmt.Fprintln(w, "| measure | value | baseline (same run) | ratio | target |")
	fmt.Fprintln(w, "|---|---|---|---|---|")
	fmt.Fprintf(w, "| query 1000-hash prefix over socket (packed), p50 | %.0f us (p99 %.0f us) | - | - | p50 < 200 us |\n", q.QueryP50us, q.QueryP99us)
	fmt.Fprintf(w, "| index lookups in-process | %.1f M/s | - | - | - |\n", lookups/1e6)
	fmt.Fprintf(w, "| RPC round trip (1000-hash query, %d B) p50 | %.0f us | UDS ping-pong %.0f us | %.2fx | - |\n",
		q.RPCBytes, q.RPCp50us, q.PingPongP50, q.RPCp50us/q.PingPongP50)
	fmt.Fprintf(w, "| RPC round trip (Health, tiny) p50 | %.0f us | UDS ping-pong %.0f us | %.2fx | - |\n",
		q.SmallRPCp50, q.SmallPingP50, q.SmallRPCp50/q.SmallPingP50)
	return nil
}

func human(n int) string {
	if n >= 1<<20 {
		return fmt.Sprintf("%d MiB", n>>20)
	}
	return fmt.Sprintf("%d KiB", n>>10)
}

// specFor builds a FlashAttention cache whose blocks have the given size.
func specFor(blockBytes, batchBytes int) kvtest.Spec {
	const layers, blockSize, elem = 4, 16, 2
	seg := blockBytes / (layers * 2)
	heads := seg / (blockSize * 128 * elem)
	headSize := 128
	if heads == 0 {
		heads, headSize = 1, seg/(blockSize*elem)
	}
	return kvtest.Spec{Layout: kvtest.FlashAttn, Layers: layers, NumBlocks: max(batchBytes/blockBytes, 8), BlockSize: blockSize,
		Heads: heads, HeadSize: headSize, ElemSize: elem}
}

func runClient() error {
	batch, _ := strconv.Atoi(os.Getenv("PEGAFLOW_BENCH_BATCH"))
	rounds, _ := strconv.Atoi(os.Getenv("PEGAFLOW_BENCH_ROUNDS"))
	ctx := context.Background()
	c, err := client.Dial(ctx, os.Getenv("PEGAFLOW_BENCH_SOCKET"), "bench")
	if err != nil {
		return err
	}
	defer c.Close()
	var results []copyResult
	for i, bb := range []int{16 << 10, 256 << 10, 2 << 20} {
		r, err := benchCopies(ctx, c, bb, batch, rounds)
		if err != nil {
			return fmt.Errorf("%s blocks: %w", human(bb), err)
		}
		if i == 0 {
			if err := benchQuery(ctx, c, &r); err != nil {
				return err
			}
		}
		results = append(results, r)
	}
	return json.NewEncoder(os.Stdout).Encode(results)
}

func benchCopies(ctx context.Context, c *client.Client, blockBytes, batchBytes, rounds int) (copyResult, error) {
	spec := specFor(blockBytes, batchBytes)
	if spec.BlockBytes() != blockBytes {
		return copyResult{}, fmt.Errorf("spec gives %d-byte blocks", spec.BlockBytes())
	}
	src, err := kvtest.New(kvtest.ShmDir(), fmt.Sprintf("pf-bench-src-%d", os.Getpid()), spec)
	if err != nil {
		return copyResult{}, err
	}
	defer src.Close()
	dst, err := kvtest.New(kvtest.ShmDir(), fmt.Sprintf("pf-bench-dst-%d", os.Getpid()), spec)
	if err != nil {
		return copyResult{}, err
	}
	defer dst.Close()
	for b := 0; b < spec.NumBlocks; b++ {
		src.Fill(b, 1)
		dst.Fill(b, 2) // fault the pages in
	}
	model := fmt.Sprintf("bench-%d", blockBytes)
	for _, inst := range []struct {
		name  string
		cache *kvtest.Cache
	}{{"src", src}, {"dst", dst}} {
		if _, err := c.Register(ctx, inst.cache.RegisterRequest(inst.name, 0, spec.Namespace(model, 1))); err != nil {
			return copyResult{}, err
		}
	}
	n := spec.NumBlocks
	var saveDur, loadDur time.Duration
	for round := -1; round < rounds; round++ { // round -1 warms the pool up
		hashes := kvtest.Hashes(fmt.Sprintf("%s-r%d", model, round), n)
		var refs []*pb.BlockRef
		for i, h := range hashes {
			refs = append(refs, &pb.BlockRef{BlockId: uint32(i), Hash: h})
		}
		t0 := time.Now()
		s, err := c.Save(ctx, &pb.SaveRequest{InstanceId: "src", Blocks: refs})
		if err != nil {
			return copyResult{}, err
		}
		t1 := time.Now()
		l, err := c.Load(ctx, &pb.LoadRequest{InstanceId: "dst", Blocks: refs})
		if err != nil {
			return copyResult{}, err
		}
		t2 := time.Now()
		if int(s.Saved) != n {
			return copyResult{}, fmt.Errorf("saved %d of %d", s.Saved, n)
		}
		for i, st := range l.Status {
			if st != pb.BlockStatus_BLOCK_STATUS_OK {
				return copyResult{}, fmt.Errorf("load block %d: %v", i, st)
			}
		}
		if round >= 0 {
			saveDur += t1.Sub(t0)
			loadDur += t2.Sub(t1)
		}
	}
	if !src.Equal(n-1, dst, n-1) {
		return copyResult{}, fmt.Errorf("loaded bytes differ")
	}
	bytes := float64(n * blockBytes * rounds)
	// Baseline: the same bytes moved by plain memcpy (Go copy), block by
	// block and segment by segment, region -> buffer -> region.
	buf := make([]byte, n*blockBytes)
	for i := range buf {
		buf[i] = 1
	}
	var memDur time.Duration
	for round := 0; round < rounds; round++ {
		t0 := time.Now()
		off := 0
		for b := 0; b < n; b++ {
			for l := 0; l < spec.Layers; l++ {
				for _, s := range src.Segments(l, b) {
					off += copy(buf[off:], s)
				}
			}
		}
		off = 0
		for b := 0; b < n; b++ {
			for l := 0; l < spec.Layers; l++ {
				for _, s := range dst.Segments(l, b) {
					off += copy(s, buf[off:off+len(s)])
				}
			}
		}
		memDur += time.Since(t0)
	}
	gbps := func(b float64, d time.Duration) float64 { return b / d.Seconds() / 1e9 }
	return copyResult{
		BlockBytes: blockBytes,
		SaveGBps:   gbps(bytes, saveDur),
		LoadGBps:   gbps(bytes, loadDur),
		APIGBps:    gbps(2*bytes, saveDur+loadDur),
		MemcpyGBps: gbps(2*bytes, memDur),
	}, nil
}

func benchQuery(ctx context.Context, c *client.Client, r *copyResult) error {
	// The last round of 16 KiB blocks is resident: build a 1000-hash prefix
	// from the warm-up-independent saves by saving a fresh prompt first.
	spec := specFor(16<<10, 16<<20)
	spec.NumBlocks = 1000
	cache, err := kvtest.New(kvtest.ShmDir(), fmt.Sprintf("pf-bench-q-%d", os.Getpid()), spec)
	if err != nil {
		return err
	}
	defer cache.Close()
	ns := spec.Namespace("bench-query", 1)
	reg, err := c.Register(ctx, cache.RegisterRequest("q", 0, ns))
	if err != nil {
		return err
	}
	hashes := kvtest.Hashes("query-prefix", 1000)
	var refs []*pb.BlockRef
	for i, h := range hashes {
		refs = append(refs, &pb.BlockRef{BlockId: uint32(i), Hash: h})
	}
	if _, err := c.Save(ctx, &pb.SaveRequest{InstanceId: "q", Blocks: refs}); err != nil {
		return err
	}
	var packed []byte
	for _, h := range hashes {
		packed = append(packed, h...)
	}
	req := &pb.QueryRequest{NamespaceId: reg.NamespaceId, PackedHashes: packed, HashLen: 32}
	lat := make([]float64, 0, 2000)
	for i := 0; i < 2000; i++ {
		t0 := time.Now()
		q, err := c.Query(ctx, req)
		if err != nil {
			return err
		}
		if q.NumHit != 1000 {
			return fmt.Errorf("query hit %d of 1000", q.NumHit)
		}
		lat = append(lat, float64(time.Since(t0).Microseconds()))
	}
	r.QueryP50us, r.QueryP99us = pct(lat, 50), pct(lat, 99)
	r.RPCp50us = r.QueryP50us
	wire, _ := proto.Marshal(req)
	r.RPCBytes = len(wire)
	r.PingPongP50, err = pingPong(len(wire), 16)
	if err != nil {
		return err
	}
	lat = lat[:0]
	for i := 0; i < 2000; i++ {
		t0 := time.Now()
		if _, err := c.Health(ctx); err != nil {
			return err
		}
		lat = append(lat, float64(time.Since(t0).Microseconds()))
	}
	r.SmallRPCp50 = pct(lat, 50)
	r.SmallPingP50, err = pingPong(16, 16)
	return err
}

func pct(v []float64, p float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	return s[min(len(s)-1, int(float64(len(s))*p/100))]
}

// pingPong measures a bare UNIX-socket round trip: reqBytes out, respBytes back.
func pingPong(reqBytes, respBytes int) (float64, error) {
	conn, err := net.Dial("unix", os.Getenv("PEGAFLOW_BENCH_ECHO"))
	if err != nil {
		return 0, err
	}
	defer conn.Close()
	hdr := make([]byte, 8)
	req := make([]byte, reqBytes)
	resp := make([]byte, respBytes)
	lat := make([]float64, 0, 2000)
	for i := 0; i < 2000; i++ {
		t0 := time.Now()
		putU32(hdr, uint32(reqBytes))
		putU32(hdr[4:], uint32(respBytes))
		if _, err := conn.Write(append(hdr, req...)); err != nil {
			return 0, err
		}
		if _, err := io.ReadFull(conn, resp); err != nil {
			return 0, err
		}
		lat = append(lat, float64(time.Since(t0).Microseconds()))
	}
	return pct(lat, 50), nil
}

func putU32(b []byte, v uint32) {
	b[0], b[1], b[2], b[3] = byte(v), byte(v>>8), byte(v>>16), byte(v>>24)
}
func getU32(b []byte) uint32 {
	return uint32(b[0]) | uint32(b[1])<<8 | uint32(b[2])<<16 | uint32(b[3])<<24
}

// startEcho serves the ping-pong baseline: read a framed request, answer
// with the asked number of bytes.
func startEcho(path string) (net.Listener, error) {
	lis, err := net.Listen("unix", path)
	if err != nil {
		return nil, err
	}
	go func() {
		for {
			conn, err := lis.Accept()
			if err != nil {
				return
			}
			go func() {
				defer conn.Close()
				hdr := make([]byte, 8)
				for {
					if _, err := io.ReadFull(conn, hdr); err != nil {
						return
					}
					body := make([]byte, getU32(hdr))
					if _, err := io.ReadFull(conn, body); err != nil {
						return
					}
					if _, err := conn.Write(make([]byte, getU32(hdr[4:]))); err != nil {
						return
					}
				}
			}()
		}
	}()
	return lis, nil
}

// inProcessLookups measures index lookups per second through engine.Query
// in this process (no RPC).
func inProcessLookups(eng *engine.Engine) float64 {
	sid, err := eng.OpenSession("bench")
	if err != nil {
		return 0
	}
	defer eng.CloseSession(sid)
	spec := specFor(16<<10, 16<<20)
	spec.NumBlocks = 1000
	nsID, err := eng.OpenNamespace(sid, spec.Namespace("bench-query", 1))
	if err != nil {
		return 0
	}
	req := &pb.QueryRequest{SessionId: sid, NamespaceId: nsID, Hashes: kvtest.Hashes("query-prefix", 1000)}
	const iters = 3000
	t0 := time.Now()
	for i := 0; i < iters; i++ {
		if _, err := eng.Query(context.Background(), req); err != nil {
			return 0
		}
	}
	return float64(iters*1000) / time.Since(t0).Seconds()
}
