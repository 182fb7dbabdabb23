package server

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/pegaflow/pegaflow/engine"
	pb "github.com/pegaflow/pegaflow/engine/api/pegaflowv1"
	"github.com/pegaflow/pegaflow/engine/client"
	"github.com/pegaflow/pegaflow/internal/kvtest"
)

// The spec of vLLM's FlashAttention layout at test scale.
var spec = kvtest.Spec{Layout: kvtest.FlashAttn, Layers: 3, NumBlocks: 32, BlockSize: 16, Heads: 2, HeadSize: 16, ElemSize: 2}

const numPromptBlocks = 10

func promptHashes() [][]byte { return kvtest.Hashes("cross-process-prompt", numPromptBlocks) }

// TestMain lets the test binary act as a separate producer or lessee
// process, so the engine is exercised by real processes over the socket.
func TestMain(m *testing.M) {
	switch os.Getenv("PEGAFLOW_TEST_ROLE") {
	case "producer":
		os.Exit(runProducer())
	case "lessee":
		os.Exit(runLessee())
	case "intruder":
		os.Exit(runIntruder())
	}
	os.Exit(m.Run())
}

// runProducer registers a cache filled from a seed and saves the prompt.
func runProducer() int {
	sock := os.Getenv("PEGAFLOW_TEST_SOCKET")
	rank, _ := strconv.Atoi(os.Getenv("PEGAFLOW_TEST_RANK"))
	tp, _ := strconv.Atoi(os.Getenv("PEGAFLOW_TEST_TP"))
	seed, _ := strconv.ParseUint(os.Getenv("PEGAFLOW_TEST_SEED"), 10, 64)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := client.Dial(ctx, sock, "producer")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer c.Close()
	cache, err := kvtest.New(kvtest.ShmDir(), fmt.Sprintf("pf-test-producer-%d-%d", os.Getpid(), rank), spec)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer cache.Close()
	for b := 0; b < numPromptBlocks; b++ {
		cache.Fill(b, seed)
	}
	if _, err := c.Register(ctx, cache.RegisterRequest("producer", rank, spec.Namespace("m", tp))); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	var blocks []*pb.BlockRef
	for i, h := range promptHashes() {
		blocks = append(blocks, &pb.BlockRef{BlockId: uint32(i), Hash: h})
	}
	resp, err := c.Save(ctx, &pb.SaveRequest{InstanceId: "producer", Rank: uint32(rank), Blocks: blocks, TransferId: "xfer", TransferLast: true})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Printf("saved %d\n", resp.Saved)
	return 0
}

// runLessee takes a lease and then blocks until killed.
func runLessee() int {
	ctx := context.Background()
	c, err := client.Dial(ctx, os.Getenv("PEGAFLOW_TEST_SOCKET"), "lessee")
	if err != nil {
		return 1
	}
	ns, err := c.OpenNamespace(ctx, spec.Namespace("m", 1))
	if err != nil {
		return 1
	}
	q, err := c.Query(ctx, &pb.QueryRequest{NamespaceId: ns, Hashes: promptHashes(), Lease: true, LeaseTtlMs: 600_000})
	if err != nil || q.LeaseId == "" {
		return 1
	}
	fmt.Printf("leased %d\n", q.NumHit)
	time.Sleep(time.Hour)
	return 0
}

func startServer(t *testing.T) (string, *engine.Engine) {
	t.Helper()
	return startServerWith(t, engine.Config{PoolSize: 64 << 20, NUMANode: -1, Device: -1})
}

// startServerWith serves an engine built from cfg on a socket in a temp
// dir; the test's cleanup stops both.
func startServerWith(t testing.TB, cfg engine.Config) (string, *engine.Engine) {
	t.Helper()
	eng, err := engine.New(cfg, nil, prometheus.NewRegistry())
	require.NoError(t, err)
	sock := filepath.Join(t.TempDir(), "engine.sock")
	srv, err := New(Config{SocketPath: sock}, eng, nil, prometheus.NewRegistry())
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		require.NoError(t, <-done)
		require.NoError(t, eng.Close())
	})
	return sock, eng
}

func subprocess(t *testing.T, role, sock string, env ...string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), append(env, "PEGAFLOW_TEST_ROLE="+role, "PEGAFLOW_TEST_SOCKET="+sock)...)
	cmd.Stderr = os.Stderr
	return cmd
}

func produce(t *testing.T, sock string, rank, tp int, seed uint64) {
	t.Helper()
	out, err := subprocess(t, "producer", sock, "PEGAFLOW_TEST_RANK="+strconv.Itoa(rank),
		"PEGAFLOW_TEST_TP="+strconv.Itoa(tp), "PEGAFLOW_TEST_SEED="+strconv.FormatUint(seed, 10)).Output()
	require.NoError(t, err)
	require.Equal(t, fmt.Sprintf("saved %d\n", numPromptBlocks), string(out))
}

type consumer struct {
	c     *client.Client
	cache *kvtest.Cache
	ns    string
	rank  int
}

func newConsumer(t *testing.T, sock string, rank, tp int) *consumer {
	t.Helper()
	ctx := context.Background()
	c, err := client.Dial(ctx, sock, "consumer")
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	cache, err := kvtest.New(kvtest.TempShmDir(t), "consumer", spec)
	require.NoError(t, err)
	t.Cleanup(cache.Close)
	resp, err := c.Register(ctx, cache.RegisterRequest("consumer", rank, spec.Namespace("m", tp)))
	require.NoError(t, err)
	return &consumer{c: c, cache: cache, ns: resp.NamespaceId, rank: rank}
}

func (cs *consumer) hits(t *testing.T) uint32 {
	q, err := cs.c.Query(context.Background(), &pb.QueryRequest{NamespaceId: cs.ns, Hashes: promptHashes()})
	require.NoError(t, err)
	return q.NumHit
}

// loadAndCompare loads the prompt into blocks 31, 30, ... and compares with
// what a producer filled from seed.
func (cs *consumer) loadAndCompare(t *testing.T, seed uint64) {
	t.Helper()
	var blocks []*pb.BlockRef
	for i, h := range promptHashes() {
		blocks = append(blocks, &pb.BlockRef{BlockId: uint32(spec.NumBlocks - 1 - i), Hash: h})
	}
	resp, err := cs.c.Load(context.Background(), &pb.LoadRequest{InstanceId: "consumer", Rank: uint32(cs.rank), Blocks: blocks})
	require.NoError(t, err)
	want, err := kvtest.New(kvtest.TempShmDir(t), "want", spec)
	require.NoError(t, err)
	defer want.Close()
	for i := range blocks {
		require.Equal(t, pb.BlockStatus_BLOCK_STATUS_OK, resp.Status[i])
		want.Fill(i, seed)
		require.True(t, want.Equal(i, cs.cache, spec.NumBlocks-1-i), "block %d bytes differ (K/V segments of every layer)", i)
	}
}

func TestCrossProcessRoundTrip(t *testing.T) {
	sock, _ := startServer(t)
	produce(t, sock, 0, 1, 11)
	d := newConsumer(t, sock, 0, 1)
	require.EqualValues(t, numPromptBlocks, d.hits(t))
	d.loadAndCompare(t, 11)
}

func TestCrossProcessTP2SealsAfterBothRanks(t *testing.T) {
	sock, eng := startServer(t)
	d0 := newConsumer(t, sock, 0, 2)
	d1 := newConsumer(t, sock, 1, 2)
	produce(t, sock, 0, 2, 21)
	require.EqualValues(t, 0, d0.hits(t), "rank 1 has not saved yet")
	produce(t, sock, 1, 2, 22)
	require.EqualValues(t, numPromptBlocks, d0.hits(t))
	require.NoError(t, eng.AwaitTransfer(context.Background(), "xfer"))
	d0.loadAndCompare(t, 21)
	d1.loadAndCompare(t, 22)
}

func TestConnectionDropReleasesLease(t *testing.T) {
	sock, eng := startServer(t)
	produce(t, sock, 0, 1, 5)
	// The producer's transfer pins its blocks; drop that to see the lease alone.
	eng.ReleaseTransfer("xfer")
	require.Zero(t, eng.Stats().PinnedBlocks)

	cmd := subprocess(t, "lessee", sock)
	stdout, err := cmd.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())
	line, err := bufio.NewReader(stdout).ReadString('\n')
	require.NoError(t, err)
	require.Equal(t, fmt.Sprintf("leased %d\n", numPromptBlocks), line)
	require.EqualValues(t, numPromptBlocks, eng.Stats().PinnedBlocks)

	require.NoError(t, cmd.Process.Kill())
	_ = cmd.Wait()
	require.Eventually(t, func() bool { return eng.Stats().PinnedBlocks == 0 && eng.Stats().Sessions == 0 },
		5*time.Second, 10*time.Millisecond, "a dead client's lease must be released")
}

func TestErrorsMapToStatusCodes(t *testing.T) {
	sock, _ := startServer(t)
	d := newConsumer(t, sock, 0, 1)
	ctx := context.Background()
	_, err := d.c.Load(ctx, &pb.LoadRequest{InstanceId: "consumer", Blocks: []*pb.BlockRef{{BlockId: 999, Hash: make([]byte, 32)}}})
	require.Equal(t, codes.InvalidArgument, status.Code(err))
	require.Contains(t, status.Convert(err).Message(), "out of range")
	_, err = d.c.Save(ctx, &pb.SaveRequest{InstanceId: "nobody"})
	require.Equal(t, codes.NotFound, status.Code(err))
	bad := d.cache.RegisterRequest("consumer", 0, spec.Namespace("m", 1))
	bad.Namespace.HashSeedFingerprint = []byte("other-seed")
	_, err = d.c.Register(ctx, bad)
	require.Equal(t, codes.FailedPrecondition, status.Code(err))
	require.Contains(t, status.Convert(err).Message(), "hash seed mismatch")
	h, err := d.c.Health(ctx)
	require.NoError(t, err)
	require.Equal(t, "ok", h.Status)
}

func TestSocketIsPrivateAndNotStolen(t *testing.T) {
	sock, _ := startServer(t)
	fi, err := os.Stat(sock)
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o600), fi.Mode().Perm())
	eng, err := engine.New(engine.Config{PoolSize: 1 << 20, NUMANode: -1, Device: -1}, nil, nil)
	require.NoError(t, err)
	defer eng.Close()
	_, err = New(Config{SocketPath: sock}, eng, nil, nil)
	require.ErrorContains(t, err, "in use")
}

func TestDialHonoursContextWithoutEngine(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := client.Dial(ctx, filepath.Join(t.TempDir(), "nobody.sock"), "test")
	require.Error(t, err)
	require.Less(t, time.Since(start), 5*time.Second)
}

// The Attach event tells a client where peers reach its engine (P's
// connector returns it as pegaflow_source_engine); empty without peers.
func TestAttachReportsPeerAddress(t *testing.T) {
	for _, addr := range []string{"", "10.0.0.5:7400"} {
		sock, _ := startServerWith(t, engine.Config{PoolSize: 4 << 20, NUMANode: -1, Device: -1, PeerAddress: addr})
		c, err := client.Dial(context.Background(), sock, "attach")
		require.NoError(t, err)
		require.Equal(t, addr, c.PeerAddress())
		c.Close()
	}
}
