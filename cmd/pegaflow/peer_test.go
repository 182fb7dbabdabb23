package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/pegaflow/pegaflow/engine"
	pb "github.com/pegaflow/pegaflow/engine/api/pegaflowv1"
	"github.com/pegaflow/pegaflow/engine/client"
	"github.com/pegaflow/pegaflow/engine/peer"
	"github.com/pegaflow/pegaflow/internal/kvtest"
)

// peerSpec makes 256 KiB blocks (4 layers x K/V x 32 KiB).
var peerSpec = kvtest.Spec{Layout: kvtest.FlashAttn, Layers: 4, NumBlocks: 96, BlockSize: 16, Heads: 8, HeadSize: 128, ElemSize: 2}

const peerTestToken = "0123456789abcdef0123456789abcdef0123456789abcdef"

func freeAddr(t *testing.T) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer lis.Close()
	return lis.Addr().String()
}

// engineProc is one `pegaflow serve` with a peer address.
type engineProc struct {
	cmd        *exec.Cmd
	sock, http string
	peerAddr   string
	logs       *lockedBuffer
	done       chan struct{}
}

// lockedBuffer collects a process's stderr while the test reads it.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// startPeerEngine runs an engine on peerAddr that may fetch from allow
// (host:port entries).
func startPeerEngine(t *testing.T, bin, dir, peerAddr, tokenFile, allow string) *engineProc {
	t.Helper()
	p := &engineProc{sock: filepath.Join(dir, fmt.Sprintf("engine-%d.sock", time.Now().UnixNano())), http: freeAddr(t),
		peerAddr: peerAddr, logs: &lockedBuffer{}, done: make(chan struct{})}
	p.cmd = exec.Command(bin, "serve", "--socket", p.sock, "--http-addr", p.http, "--pool-size", "64MiB",
		"--peer-addr", peerAddr, "--peer-token-file", tokenFile, "--peer-allow", allow, "--log-level", "debug")
	p.cmd.Stderr = p.logs
	require.NoError(t, p.cmd.Start())
	go func() { _ = p.cmd.Wait(); close(p.done) }()
	t.Cleanup(p.kill)
	require.Eventually(t, func() bool {
		resp, err := http.Get("http://" + p.http + "/health")
		if err != nil {
			return false
		}
		resp.Body.Close()
		c, err := net.Dial("tcp", peerAddr)
		if err == nil {
			c.Close()
		}
		return resp.StatusCode == 200 && err == nil
	}, 15*time.Second, 20*time.Millisecond, "engine never became healthy: %s", p.logs)
	return p
}

func (p *engineProc) kill() {
	_ = p.cmd.Process.Kill()
	<-p.done
}

func (p *engineProc) metric(t *testing.T, name string) float64 {
	t.Helper()
	resp, err := http.Get("http://" + p.http + "/metrics")
	require.NoError(t, err)
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	m := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(name) + ` (\S+)$`).FindSubmatch(body)
	if m == nil {
		return 0
	}
	v, err := strconv.ParseFloat(string(m[1]), 64)
	require.NoError(t, err)
	return v
}

// skipUnlessPeerProcs skips a test that runs engines with peers as
// processes in -short runs (why says what it does).
func skipUnlessPeerProcs(t *testing.T, why string) {
	t.Helper()
	if testing.Short() {
		t.Skip(why)
	}
}

// kvClient is one rank's cache registered with an engine.
type kvClient struct {
	c     *client.Client
	cache *kvtest.Cache
	nsID  string
	inst  string
}

func newKVClient(t *testing.T, ctx context.Context, sock, inst string) *kvClient {
	t.Helper()
	c, err := client.Dial(ctx, sock, inst)
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	cache, err := kvtest.New(kvtest.TempShmDir(t), inst, peerSpec)
	require.NoError(t, err)
	t.Cleanup(cache.Close)
	req := cache.RegisterRequest(inst, 0, peerSpec.Namespace("peer-model", 1))
	req.SessionId = c.SessionID()
	resp, err := c.Register(ctx, req)
	require.NoError(t, err)
	return &kvClient{c: c, cache: cache, nsID: resp.NamespaceId, inst: inst}
}

func blockRefs(ids []int, hashes [][]byte) []*pb.BlockRef {
	out := make([]*pb.BlockRef, len(ids))
	for i := range ids {
		out[i] = &pb.BlockRef{BlockId: uint32(ids[i]), Hash: hashes[i]}
	}
	return out
}

func span(from, n int) []int {
	out := make([]int, n)
	for i := range out {
		out[i] = from + i
	}
	return out
}

func (k *kvClient) save(t *testing.T, ctx context.Context, hashes [][]byte, seed uint64) {
	t.Helper()
	for i := range hashes {
		k.cache.Fill(i, seed)
	}
	resp, err := k.c.Save(ctx, &pb.SaveRequest{SessionId: k.c.SessionID(), InstanceId: k.inst, Blocks: blockRefs(span(0, len(hashes)), hashes)})
	require.NoError(t, err)
	require.EqualValues(t, len(hashes), resp.Saved)
}

func (k *kvClient) query(t *testing.T, ctx context.Context, source string, hashes [][]byte, wait time.Duration) uint32 {
	t.Helper()
	resp, err := k.c.Query(ctx, &pb.QueryRequest{SessionId: k.c.SessionID(), NamespaceId: k.nsID, Hashes: hashes,
		WaitMs: uint32(wait.Milliseconds()), SourceEngine: source})
	require.NoError(t, err)
	return resp.NumHit
}

// loadAndVerify loads hashes into blocks offset.. of k and compares every
// byte with the producer's blocks 0...
func (k *kvClient) loadAndVerify(t *testing.T, ctx context.Context, prod *kvClient, hashes [][]byte, offset int) {
	t.Helper()
	resp, err := k.c.Load(ctx, &pb.LoadRequest{SessionId: k.c.SessionID(), InstanceId: k.inst, Blocks: blockRefs(span(offset, len(hashes)), hashes)})
	require.NoError(t, err)
	for i, s := range resp.Status {
		require.Equal(t, pb.BlockStatus_BLOCK_STATUS_OK, s, "block %d", i)
		require.True(t, prod.cache.Equal(i, k.cache, offset+i), "block %d bytes", i)
	}
}

// Two real engines on loopback: B fetches A's blocks over UCX for a query
// naming A, byte-exact; a local hit fetches nothing; the token is
// required; A killed mid-fetch and restarted (new epoch).
func TestPeerFetchAcrossEngines(t *testing.T) {
	skipUnlessPeerProcs(t, "builds the binary, runs two engines")
	bin := testBinary(t)
	dir := t.TempDir()
	tokenFile := filepath.Join(dir, "peer-token")
	require.NoError(t, os.WriteFile(tokenFile, []byte(peerTestToken+"\n"), 0o600))
	aAddr, bAddr := freeAddr(t), freeAddr(t)
	a := startPeerEngine(t, bin, dir, aAddr, tokenFile, bAddr)
	b := startPeerEngine(t, bin, dir, bAddr, tokenFile, aAddr)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	prod := newKVClient(t, ctx, a.sock, "P")
	cons := newKVClient(t, ctx, b.sock, "D")
	require.Equal(t, prod.nsID, cons.nsID, "the namespace id is the same on every host")
	hashes := kvtest.Hashes("cross-host", 32)
	prod.save(t, ctx, hashes, 1)

	start := time.Now()
	require.EqualValues(t, 32, cons.query(t, ctx, aAddr, hashes, 10*time.Second))
	t.Logf("fetched 32 blocks (8 MiB) in %v", time.Since(start))
	cons.loadAndVerify(t, ctx, prod, hashes, 0)
	require.EqualValues(t, 32, b.metric(t, "pegaflow_engine_peer_fetch_blocks_total"))
	require.EqualValues(t, 32*peerSpec.BlockBytes(), b.metric(t, "pegaflow_engine_peer_fetch_bytes_total"))
	// A local hit fetches nothing.
	require.EqualValues(t, 32, cons.query(t, ctx, aAddr, hashes, 10*time.Second))
	require.EqualValues(t, 32, b.metric(t, "pegaflow_engine_peer_fetch_blocks_total"))
	require.Eventually(t, func() bool { return a.metric(t, "pegaflow_engine_peer_transfers_open") == 0 }, 5*time.Second, 20*time.Millisecond)
	// B keeps its stream connection to A across fetches (one 8 MiB chunk
	// each): a client closed at start-up used to dial, and prove the
	// token, for every chunk of every fetch.
	for i := range 6 {
		again := kvtest.Hashes(fmt.Sprintf("cross-host-%d", i), 32)
		prod.save(t, ctx, again, 1)
		require.EqualValues(t, 32, cons.query(t, ctx, aAddr, again, 10*time.Second))
	}
	require.EqualValues(t, 1, a.metric(t, "pegaflow_engine_peer_stream_connections_total"), "B's fetches share one kept connection")

	// Without the token, or with another, A refuses; unknown transfers are NotFound.
	for _, tok := range []string{"", "another-token-another-token-another-token"} {
		c := peer.NewClient([]byte(tok))
		_, err := c.Handshake(ctx, aAddr)
		require.ErrorIs(t, err, engine.ErrPermission)
		c.Close()
	}
	c := peer.NewClient([]byte(peerTestToken))
	defer c.Close()
	hs, err := c.Handshake(ctx, aAddr)
	require.NoError(t, err)
	require.ErrorIs(t, c.ReleaseTransfer(ctx, aAddr, "pt-unknown"), engine.ErrNotFound)

	// A killed while B fetches: B answers within its deadline with what it
	// fetched (whole blocks only, maybe none) and stays healthy.
	more := kvtest.Hashes("killed", 96)
	prod.save(t, ctx, more, 2)
	type answer struct {
		hit uint32
		d   time.Duration
	}
	got := make(chan answer, 1)
	go func() {
		start := time.Now()
		resp, err := cons.c.Query(ctx, &pb.QueryRequest{SessionId: cons.c.SessionID(), NamespaceId: cons.nsID, Hashes: more,
			WaitMs: 3000, SourceEngine: aAddr})
		if err != nil {
			got <- answer{^uint32(0), 0}
			return
		}
		got <- answer{resp.NumHit, time.Since(start)}
	}()
	time.Sleep(5 * time.Millisecond)
	a.kill()
	ans := <-got
	require.NotEqual(t, ^uint32(0), ans.hit, "query failed")
	require.Less(t, ans.d, 4*time.Second, "answered within its wait")
	t.Logf("A killed mid-fetch: %d of 96 blocks fetched, answered in %v", ans.hit, ans.d)
	cons.loadAndVerify(t, ctx, prod, more[:ans.hit], 0)
	h, err := cons.c.Health(ctx)
	require.NoError(t, err)
	require.Equal(t, "ok", h.Status)

	// A restarted on the same address: a new epoch; B handshakes again.
	a2 := startPeerEngine(t, bin, dir, aAddr, tokenFile, bAddr)
	hs2, err := c.Handshake(ctx, aAddr)
	require.NoError(t, err)
	require.NotEqual(t, hs.Epoch, hs2.Epoch)
	prod2 := newKVClient(t, ctx, a2.sock, "P2")
	again := kvtest.Hashes("restarted", 16)
	prod2.save(t, ctx, again, 3)
	require.EqualValues(t, 16, cons.query(t, ctx, aAddr, again, 10*time.Second), "B logs: %s", b.logs)
	cons.loadAndVerify(t, ctx, prod2, again, 32)
	require.Eventually(t, func() bool {
		resp, err := http.Get("http://" + b.http + "/health")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == 200
	}, 5*time.Second, 20*time.Millisecond)
}
