package kvlookup

import (
	"context"
	"net"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"

	"github.com/pegaflow/pegaflow/engine"
	pb "github.com/pegaflow/pegaflow/engine/api/pegaflowv1"
	"github.com/pegaflow/pegaflow/engine/peer"
	"github.com/pegaflow/pegaflow/internal/kvtest"
)

var spec = kvtest.Spec{Layout: kvtest.FlashAttn, Layers: 2, NumBlocks: 16, BlockSize: 4, Heads: 2, HeadSize: 8, ElemSize: 2}

var token = []byte("0123456789abcdef0123456789abcdef")

// newEngine is an engine holding the first n of hashes sealed, as a
// connector would have saved them (kvtest's namespace: model "m").
func newEngine(t *testing.T, hashes [][]byte, n int) *engine.Engine {
	return engineOf(t, spec, hashes, n)
}

func engineOf(tb testing.TB, sp kvtest.Spec, hashes [][]byte, n int) *engine.Engine {
	tb.Helper()
	e, err := engine.New(engine.Config{PoolSize: uint64(sp.NumBlocks*sp.BlockBytes()) + 1<<20, NUMANode: -1, Device: -1, CopyThreads: 1},
		nil, prometheus.NewRegistry())
	require.NoError(tb, err)
	tb.Cleanup(func() { _ = e.Close() })
	c, err := kvtest.New(kvtest.TempShmDir(tb), "kv", sp)
	require.NoError(tb, err)
	tb.Cleanup(c.Close)
	sid, err := e.OpenSession("P")
	require.NoError(tb, err)
	reg := c.RegisterRequest("P", 0, sp.Namespace("m", 1))
	reg.SessionId = sid
	_, err = e.Register(tb.Context(), reg)
	require.NoError(tb, err)
	blocks := make([]*pb.BlockRef, n)
	for i := range blocks {
		blocks[i] = &pb.BlockRef{BlockId: uint32(i), Hash: hashes[i]}
	}
	_, err = e.Save(tb.Context(), &pb.SaveRequest{SessionId: sid, InstanceId: "P", Blocks: blocks})
	require.NoError(tb, err)
	return e
}

// serve runs eng's peer API on addr until the test ends or stop is called.
func serve(t testing.TB, eng *engine.Engine, addr string) (bound string, stop func()) {
	t.Helper()
	srv, err := peer.New(peer.Config{Addr: addr, Token: token}, eng, nil)
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx) }()
	var once sync.Once
	stop = func() { once.Do(func() { cancel(); require.NoError(t, <-done) }) }
	t.Cleanup(stop)
	return srv.Addr(), stop
}

func query(hashes [][]byte) Query {
	return Query{Model: "m", BlockSize: spec.BlockSize, HashAlgo: "sha256_cbor", SeedFingerprint: []byte("seed-0"), Hashes: hashes}
}

func newIndex(t *testing.T, cfg Config) *Index {
	t.Helper()
	x := New(cfg)
	t.Cleanup(func() { _ = x.Close() })
	return x
}

// The caller names engines by address: "" and the local engine's own
// advertised address are answered in process (never dialled, even where
// nothing listens), any other address over the peer API.
func TestLookupAddressing(t *testing.T) {
	hashes := kvtest.Hashes("prompt", 6)
	local := newEngine(t, hashes, 2)
	remote := newEngine(t, hashes, 5)
	remoteAddr, _ := serve(t, remote, "127.0.0.1:0")
	self := freePort(t)
	x := newIndex(t, Config{Local: local, LocalAddr: self, Token: token})
	for _, tc := range []struct {
		name, addr string
		want       int
		err        error
	}{
		{"in process", "", 2, nil},
		{"own advertised address", self, 2, nil},
		{"another engine", remoteAddr, 5, nil},
	} {
		t.Run(tc.name, func(t *testing.T) { requireHit(t, x, tc.addr, hashes, tc.want) })
	}
	none := newIndex(t, Config{Token: token})
	_, err := none.Lookup(t.Context(), "", query(hashes))
	require.ErrorIs(t, err, ErrNoEngine)
	_, err = none.Lookup(t.Context(), self, query(hashes))
	require.ErrorIs(t, err, engine.ErrPeerUnavailable, "without a local engine, its address is dialled")
}

// One index answers for the engine in process and a remote one, each
// from its own blocks; a remote answer goes over the authenticated peer
// API.
func TestLookupLocalAndRemote(t *testing.T) {
	hashes := kvtest.Hashes("prompt", 6)
	local := newEngine(t, hashes, 2)
	remote := newEngine(t, hashes, 5)
	addr, _ := serve(t, remote, "127.0.0.1:0")
	x := newIndex(t, Config{Local: local, Token: token})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, tc := range []struct {
		name, backend string
		q             Query
		want          int
	}{
		{"local", "", query(hashes), 2},
		{"remote", addr, query(hashes), 5},
		{"remote, any model", addr, Query{BlockSize: 4, HashAlgo: "sha256_cbor", SeedFingerprint: []byte("seed-0"), Hashes: hashes}, 5},
		{"remote, other seed", addr, Query{Model: "m", BlockSize: 4, HashAlgo: "sha256_cbor", SeedFingerprint: []byte("seed-1"), Hashes: hashes}, 0},
		{"remote, no hashes", addr, query(nil), 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n, err := x.Lookup(ctx, tc.backend, tc.q)
			require.NoError(t, err)
			require.Equal(t, tc.want, n)
		})
	}
	for _, tc := range []struct {
		name string
		q    Query
	}{
		{"ragged hashes", query([][]byte{hashes[0], hashes[1][:8]})},
		{"short hashes", query([][]byte{[]byte("1234567")})},
		{"block size 0", Query{Model: "m", HashAlgo: "sha256_cbor", SeedFingerprint: []byte("seed-0"), Hashes: hashes}},
	} {
		_, err := x.Lookup(ctx, addr, tc.q)
		require.ErrorIs(t, err, engine.ErrInvalid, tc.name)
	}
	wrong := newIndex(t, Config{Token: []byte("0123456789abcdef0123456789abcdeX")})
	_, err := wrong.Lookup(ctx, addr, query(hashes))
	require.ErrorIs(t, err, engine.ErrPermission)
}

// requireHit: a lookup of hashes for backend answers want.
func requireHit(t *testing.T, x *Index, backend string, hashes [][]byte, want int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	n, err := x.Lookup(ctx, backend, query(hashes))
	require.NoError(t, err)
	require.Equal(t, want, n)
}

// freePort is a loopback address nothing listens on.
func freePort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := l.Addr().String()
	require.NoError(t, l.Close())
	return addr
}

// blackhole is an address that accepts connections and never answers.
func blackhole(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	var mu sync.Mutex
	var held []net.Conn
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			held = append(held, c)
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		_ = l.Close()
		mu.Lock()
		defer mu.Unlock()
		for _, c := range held {
			_ = c.Close()
		}
	})
	return l.Addr().String()
}

// A dead engine (connection refused) fails at once, and is then skipped
// without a dial until its backoff ends; an engine that accepts but
// never answers costs no more than the caller's budget, and after a few
// misses is skipped too. Neither affects another engine's answers.
func TestDeadAndSlowEnginesFailFast(t *testing.T) {
	hashes := kvtest.Hashes("prompt", 4)
	live := newEngine(t, hashes, 4)
	liveAddr, _ := serve(t, live, "127.0.0.1:0")
	dead, slow := freePort(t), blackhole(t)
	x := newIndex(t, Config{Token: token, Backoff: time.Hour})

	budget := func() (context.Context, context.CancelFunc) {
		return context.WithTimeout(context.Background(), 50*time.Millisecond)
	}
	ctx, cancel := budget()
	_, err := x.Lookup(ctx, dead, query(hashes))
	cancel()
	require.ErrorIs(t, err, engine.ErrPeerUnavailable)
	ctx, cancel = budget()
	_, err = x.Lookup(ctx, dead, query(hashes))
	cancel()
	require.ErrorIs(t, err, ErrEngineDown, "skipped, not dialled again")

	for i := range missesToSkip {
		ctx, cancel := budget()
		start := time.Now()
		_, err := x.Lookup(ctx, slow, query(hashes))
		cancel()
		require.ErrorIs(t, err, context.DeadlineExceeded, "miss %d", i)
		require.Less(t, time.Since(start), 5*time.Second, "bounded by the budget")
	}
	ctx, cancel = budget()
	_, err = x.Lookup(ctx, slow, query(hashes))
	cancel()
	require.ErrorIs(t, err, ErrEngineDown)

	requireHit(t, x, liveAddr, hashes, 4)
}

// MaxInFlight bounds the remote lookups at once: with the one slot held
// by a call to an engine that never answers, another call waits for a
// slot only as long as its own budget.
func TestConcurrencyBound(t *testing.T) {
	hashes := kvtest.Hashes("prompt", 4)
	live := newEngine(t, hashes, 4)
	liveAddr, _ := serve(t, live, "127.0.0.1:0")
	slow := blackhole(t)
	x := newIndex(t, Config{Token: token, MaxInFlight: 1, Timeout: time.Minute})
	slowCtx, slowCancel := context.WithCancel(context.Background())
	slowDone := make(chan error, 1)
	go func() { _, err := x.Lookup(slowCtx, slow, query(hashes)); slowDone <- err }()
	require.Eventually(t, func() bool { return len(x.slots) == 1 }, 10*time.Second, time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	_, err := x.Lookup(ctx, liveAddr, query(hashes))
	cancel()
	require.ErrorContains(t, err, "lookup slot")
	slowCancel()
	require.ErrorIs(t, <-slowDone, context.Canceled)
	requireHit(t, x, liveAddr, hashes, 4)
}

// An engine restarted on the same address (a new epoch, an empty index)
// is never answered for by its predecessor: once it serves again, the
// answers are its own.
func TestRestartedEngineNoStaleAnswers(t *testing.T) {
	hashes := kvtest.Hashes("prompt", 4)
	old := newEngine(t, hashes, 4)
	addr, stop := serve(t, old, "127.0.0.1:0")
	x := newIndex(t, Config{Token: token, Backoff: 10 * time.Millisecond})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	n, err := x.Lookup(ctx, addr, query(hashes))
	require.NoError(t, err)
	require.Equal(t, 4, n)

	stop()
	require.NoError(t, old.Close())
	fresh := newEngine(t, hashes, 1)
	serve(t, fresh, addr)
	for {
		n, err := x.Lookup(ctx, addr, query(hashes))
		if err == nil {
			require.Equal(t, 1, n, "the restarted engine's own answer")
			break
		}
		require.NoError(t, ctx.Err(), "the restarted engine never answered: %v", err)
		time.Sleep(5 * time.Millisecond)
	}
}

// clientGoroutines are the live goroutines of gRPC clients and of this
// package (the engine's server side is not counted).
func clientGoroutines() []string {
	buf := make([]byte, 4<<20)
	var out []string
	for _, g := range strings.Split(string(buf[:runtime.Stack(buf, true)]), "\n\n") {
		if strings.Contains(g, "http2Client") || strings.Contains(g, "grpc.(*ClientConn)") || strings.Contains(g, "grpc.(*addrConn)") ||
			strings.Contains(g, "ccBalancerWrapper") || strings.Contains(g, "ccResolverWrapper") || strings.Contains(g, "kvlookup.(*") {
			out = append(out, g)
		}
	}
	return out
}

// Lookups, to a live and a dead engine, leave no client goroutine
// behind once the index is closed.
func TestNoGoroutineLeak(t *testing.T) {
	hashes := kvtest.Hashes("prompt", 4)
	eng := newEngine(t, hashes, 4)
	addr, _ := serve(t, eng, "127.0.0.1:0")
	dead := freePort(t)
	x := New(Config{Token: token})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	for range 32 {
		wg.Go(func() {
			_, _ = x.Lookup(ctx, addr, query(hashes))
			_, _ = x.Lookup(ctx, dead, query(hashes))
		})
	}
	wg.Wait()
	require.NotEmpty(t, clientGoroutines(), "the check sees a client's goroutines")
	require.NoError(t, x.Close())
	require.Eventually(t, func() bool { return len(clientGoroutines()) == 0 }, 10*time.Second, 10*time.Millisecond,
		"%v", clientGoroutines())
}
