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
	x, err := New(cfg)
	require.NoError(t, err)
	t.Cleanup(func() { _ = x.Close() })
	return x
}

func TestEngineFor(t *testing.T) {
	local := &engine.Engine{}
	for _, tc := range []struct {
		name    string
		cfg     Config
		backend string
		addr    string
		local   bool
		err     error
	}{
		{"explicit host:port", Config{Engines: map[string]string{"10.0.0.2:8000": "10.1.0.2:7400"}}, "10.0.0.2:8000", "10.1.0.2:7400", false, nil},
		{"explicit host", Config{Engines: map[string]string{"10.0.0.2": "10.1.0.2:7400"}}, "http://10.0.0.2:8001/v1", "10.1.0.2:7400", false, nil},
		{"explicit beats loopback", Config{Local: local, Engines: map[string]string{"127.0.0.1": "10.1.0.9:7400"}}, "127.0.0.1:8000", "10.1.0.9:7400", false, nil},
		{"explicit naming the local engine", Config{Local: local, LocalAddr: "10.1.0.1:7400", Engines: map[string]string{"a": "10.1.0.1:7400"}}, "a:8000", "10.1.0.1:7400", true, nil},
		{"engine port", Config{EnginePort: "7400"}, "10.0.0.3:8000", "10.0.0.3:7400", false, nil},
		{"engine port, IPv6", Config{EnginePort: "7400"}, "[fd00::3]:8000", "[fd00::3]:7400", false, nil},
		{"engine port is the local engine", Config{Local: local, LocalAddr: "10.0.0.1:7400", EnginePort: "7400"}, "10.0.0.1:8000", "10.0.0.1:7400", true, nil},
		{"loopback is the local engine", Config{Local: local}, "localhost:8000", "", true, nil},
		{"loopback without a local engine", Config{}, "127.0.0.1:8000", "", false, ErrNoEngine},
		{"no mapping", Config{Local: local}, "10.0.0.3:8000", "", false, ErrNoEngine},
		{"bad URL", Config{EnginePort: "7400"}, "http://[::1", "", false, ErrNoEngine},
	} {
		t.Run(tc.name, func(t *testing.T) {
			x := newIndex(t, tc.cfg)
			addr, isLocal, err := x.EngineFor(tc.backend)
			if tc.err != nil {
				require.ErrorIs(t, err, tc.err)
				return
			}
			require.NoError(t, err)
			require.Equal(t, tc.addr, addr)
			require.Equal(t, tc.local, isLocal)
		})
	}
	for _, bad := range []Config{{Engines: map[string]string{"a": "no-port"}}, {EnginePort: "0"}, {EnginePort: "x"}} {
		_, err := New(bad)
		require.Error(t, err, "%+v", bad)
	}
	for _, tc := range []struct {
		in, backend, addr string
		ok                bool
	}{
		{"10.0.0.2=10.1.0.2:7400", "10.0.0.2", "10.1.0.2:7400", true},
		{"p0.svc:8000=10.1.0.2:7400", "p0.svc:8000", "10.1.0.2:7400", true},
		{"10.0.0.2", "", "", false},
		{"=10.1.0.2:7400", "", "", false},
		{"10.0.0.2=10.1.0.2", "", "", false},
		{"h:99999=10.1.0.2:1", "", "", false},
	} {
		b, a, err := ParseEngine(tc.in)
		require.Equal(t, tc.ok, err == nil, "%s: %v", tc.in, err)
		require.Equal(t, tc.backend, b)
		require.Equal(t, tc.addr, a)
	}
}

// One index answers for the engine in process and a remote one, each
// from its own blocks; a remote answer goes over the authenticated peer
// API.
func TestLookupLocalAndRemote(t *testing.T) {
	hashes := kvtest.Hashes("prompt", 6)
	local := newEngine(t, hashes, 2)
	remote := newEngine(t, hashes, 5)
	addr, _ := serve(t, remote, "127.0.0.1:0")
	x := newIndex(t, Config{Local: local, Token: token, Engines: map[string]string{"10.0.0.2": addr}})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, tc := range []struct {
		name, backend string
		q             Query
		want          int
	}{
		{"local", "http://127.0.0.1:8000", query(hashes), 2},
		{"remote", "10.0.0.2:8000", query(hashes), 5},
		{"remote, any model", "10.0.0.2:8000", Query{BlockSize: 4, HashAlgo: "sha256_cbor", SeedFingerprint: []byte("seed-0"), Hashes: hashes}, 5},
		{"remote, other seed", "10.0.0.2:8000", Query{Model: "m", BlockSize: 4, HashAlgo: "sha256_cbor", SeedFingerprint: []byte("seed-1"), Hashes: hashes}, 0},
		{"remote, no hashes", "10.0.0.2:8000", query(nil), 0},
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
		_, err := x.Lookup(ctx, "10.0.0.2:8000", tc.q)
		require.ErrorIs(t, err, engine.ErrInvalid, tc.name)
	}
	wrong := newIndex(t, Config{Token: []byte("0123456789abcdef0123456789abcdeX"), Engines: map[string]string{"10.0.0.2": addr}})
	_, err := wrong.Lookup(ctx, "10.0.0.2:8000", query(hashes))
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
	black := blackhole(t)
	x := newIndex(t, Config{Token: token, Backoff: time.Hour,
		Engines: map[string]string{"dead": freePort(t), "slow": black, "live": liveAddr}})

	budget := func() (context.Context, context.CancelFunc) {
		return context.WithTimeout(context.Background(), 50*time.Millisecond)
	}
	ctx, cancel := budget()
	_, err := x.Lookup(ctx, "dead:8000", query(hashes))
	cancel()
	require.ErrorIs(t, err, engine.ErrPeerUnavailable)
	ctx, cancel = budget()
	_, err = x.Lookup(ctx, "dead:8000", query(hashes))
	cancel()
	require.ErrorIs(t, err, ErrEngineDown, "skipped, not dialled again")

	for i := range missesToSkip {
		ctx, cancel := budget()
		start := time.Now()
		_, err := x.Lookup(ctx, "slow:8000", query(hashes))
		cancel()
		require.ErrorIs(t, err, context.DeadlineExceeded, "miss %d", i)
		require.Less(t, time.Since(start), 5*time.Second, "bounded by the budget")
	}
	ctx, cancel = budget()
	_, err = x.Lookup(ctx, "slow:8000", query(hashes))
	cancel()
	require.ErrorIs(t, err, ErrEngineDown)

	requireHit(t, x, "live:8000", hashes, 4)
}

// MaxInFlight bounds the remote lookups at once: with the one slot held
// by a call to an engine that never answers, another call waits for a
// slot only as long as its own budget.
func TestConcurrencyBound(t *testing.T) {
	hashes := kvtest.Hashes("prompt", 4)
	live := newEngine(t, hashes, 4)
	liveAddr, _ := serve(t, live, "127.0.0.1:0")
	x := newIndex(t, Config{Token: token, MaxInFlight: 1, Timeout: time.Minute,
		Engines: map[string]string{"slow": blackhole(t), "live": liveAddr}})
	slowCtx, slowCancel := context.WithCancel(context.Background())
	slowDone := make(chan error, 1)
	go func() { _, err := x.Lookup(slowCtx, "slow:1", query(hashes)); slowDone <- err }()
	require.Eventually(t, func() bool { return len(x.slots) == 1 }, 10*time.Second, time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	_, err := x.Lookup(ctx, "live:1", query(hashes))
	cancel()
	require.ErrorContains(t, err, "lookup slot")
	slowCancel()
	require.ErrorIs(t, <-slowDone, context.Canceled)
	requireHit(t, x, "live:1", hashes, 4)
}

// An engine restarted on the same address (a new epoch, an empty index)
// is never answered for by its predecessor: once it serves again, the
// answers are its own.
func TestRestartedEngineNoStaleAnswers(t *testing.T) {
	hashes := kvtest.Hashes("prompt", 4)
	old := newEngine(t, hashes, 4)
	addr, stop := serve(t, old, "127.0.0.1:0")
	x := newIndex(t, Config{Token: token, Backoff: 10 * time.Millisecond, Engines: map[string]string{"h": addr}})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	n, err := x.Lookup(ctx, "h:8000", query(hashes))
	require.NoError(t, err)
	require.Equal(t, 4, n)

	stop()
	require.NoError(t, old.Close())
	fresh := newEngine(t, hashes, 1)
	serve(t, fresh, addr)
	for {
		n, err := x.Lookup(ctx, "h:8000", query(hashes))
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
	x, err := New(Config{Token: token, Engines: map[string]string{"h": addr, "dead": freePort(t)}})
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	for range 32 {
		wg.Go(func() {
			_, _ = x.Lookup(ctx, "h:1", query(hashes))
			_, _ = x.Lookup(ctx, "dead:1", query(hashes))
		})
	}
	wg.Wait()
	require.NotEmpty(t, clientGoroutines(), "the check sees a client's goroutines")
	require.NoError(t, x.Close())
	require.Eventually(t, func() bool { return len(clientGoroutines()) == 0 }, 10*time.Second, 10*time.Millisecond,
		"%v", clientGoroutines())
}
