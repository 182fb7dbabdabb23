package engine

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"

	pb "github.com/pegaflow/pegaflow/engine/api/pegaflowv1"
	"github.com/pegaflow/pegaflow/internal/kvtest"
	"github.com/pegaflow/pegaflow/native"
)

// directPeers is a PeerControl that calls the peer engines in process
// (engine/peer's tests cover the gRPC plane, cmd/pegaflow's two processes).
type directPeers struct {
	mu    sync.Mutex
	peers map[string]*Engine
}

func (d *directPeers) get(addr string) (*Engine, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if e := d.peers[addr]; e != nil {
		return e, nil
	}
	return nil, fmt.Errorf("%w: no engine at %s", ErrPeerUnavailable, addr)
}

func (d *directPeers) Handshake(_ context.Context, addr string) (*pb.PeerHandshakeResponse, error) {
	e, err := d.get(addr)
	if err != nil {
		return nil, err
	}
	return e.PeerHandshake()
}

func (d *directPeers) OpenTransfer(ctx context.Context, addr string, req *pb.PeerOpenTransferRequest) (*pb.PeerOpenTransferResponse, error) {
	e, err := d.get(addr)
	if err != nil {
		return nil, err
	}
	return e.OpenPeerTransfer(ctx, req)
}

func (d *directPeers) ReleaseTransfer(_ context.Context, addr, handle string) error {
	e, err := d.get(addr)
	if err != nil {
		return err
	}
	return e.ReleasePeerTransfer(handle)
}

// Read stands in for the validated stream: the peer engine checks the
// extents (OpenPeerRead) exactly as behind engine/peer's stream server.
func (d *directPeers) Read(_ context.Context, addr, handle string, reads []PeerShareRead) error {
	e, err := d.get(addr)
	if err != nil {
		return err
	}
	exts := make([]PeerExtent, len(reads))
	for i, r := range reads {
		exts[i] = r.Ext
	}
	rd, err := e.OpenPeerRead(handle, exts)
	if err != nil {
		return err
	}
	defer rd.Done()
	for i, r := range reads {
		copy(r.Dst, rd.Src[i])
	}
	return nil
}

func newPeerEngine(t *testing.T, ctl *directPeers, addr string, poolSize uint64) *Engine {
	t.Helper()
	return newPeerEngineOver(t, ctl, addr, poolSize, PeerTransportTCP)
}

// newPeerEngineOver runs PeerTransportRDMA over UCX's tcp transport (the
// only one here) through the package-internal test seam.
func newPeerEngineOver(t *testing.T, ctl *directPeers, addr string, poolSize uint64, transport string) *Engine {
	t.Helper()
	if transport == PeerTransportRDMA {
		if !native.XferBuilt {
			t.Skip("UCX not built")
		}
		t.Setenv("UCX_TLS", "tcp")
	}
	e, err := New(Config{PoolSize: poolSize, NUMANode: -1, Device: -1, CopyThreads: 2, PartialTTL: time.Hour, Peers: ctl,
		PeerAddress: addr, PeerAllow: []string{"a:1", "b:1", "nowhere:1"}, PeerTransport: transport, ucxOverTCP: true},
		nil, prometheus.NewRegistry())
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, e.Close()) })
	ctl.mu.Lock()
	ctl.peers[addr] = e
	ctl.mu.Unlock()
	return e
}

func (w *worker) queryFrom(t *testing.T, source string, hashes [][]byte, wait time.Duration) *pb.QueryResponse {
	t.Helper()
	resp, err := w.e.Query(context.Background(), &pb.QueryRequest{SessionId: w.session, NamespaceId: w.nsID, Hashes: hashes,
		WaitMs: uint32(wait.Milliseconds()), SourceEngine: source})
	require.NoError(t, err)
	return resp
}

func TestFetchFromPeerEngine(t *testing.T) {
	for _, tc := range []struct {
		transport string
		tp        int
	}{{PeerTransportTCP, 1}, {PeerTransportTCP, 2}, {PeerTransportRDMA, 1}, {PeerTransportRDMA, 2}} {
		tp := tc.tp
		t.Run(fmt.Sprintf("%s/tp%d", tc.transport, tp), func(t *testing.T) {
			ctl := &directPeers{peers: map[string]*Engine{}}
			a := newPeerEngineOver(t, ctl, "a:1", 8<<20, tc.transport)
			b := newPeerEngineOver(t, ctl, "b:1", 8<<20, tc.transport)
			var ps, ds []*worker
			for r := range tp {
				ps = append(ps, newWorker(t, a, fmt.Sprintf("P%d", tp), r, tp, smallSpec))
				ds = append(ds, newWorker(t, b, fmt.Sprintf("D%d", tp), r, tp, smallSpec))
			}
			hashes := kvtest.Hashes(fmt.Sprintf("tp%d", tp), 8)
			for r, p := range ps {
				for i := range 6 {
					p.cache.Fill(i, uint64(10*tp+r))
				}
				p.save(t, seq(0, 6), hashes[:6], "", false)
			}
			fetched := testutil.ToFloat64(b.m.fetchBlocks)
			missing := testutil.ToFloat64(b.m.fetchFailures["missing"])
			// A holds 6 of the 8: B fetches those, seals them, answers 6.
			require.EqualValues(t, 6, ds[0].queryFrom(t, "a:1", hashes, 5*time.Second).NumHit)
			require.EqualValues(t, fetched+6, testutil.ToFloat64(b.m.fetchBlocks))
			require.EqualValues(t, missing+1, testutil.ToFloat64(b.m.fetchFailures["missing"]))
			b.mu.Lock()
			require.Zero(t, b.fetchesReading, "the fetch left its read phase")
			b.mu.Unlock()
			for r, d := range ds {
				dst := []int{9, 3, 12, 0, 7, 5}
				require.Equal(t, allOK(6), d.load(t, dst, hashes[:6], "", ""))
				for i, blk := range dst {
					require.True(t, ps[r].cache.Equal(i, d.cache, blk), "rank %d block %d", r, i)
				}
			}
			// A local hit fetches nothing; neither does a query without a source.
			require.EqualValues(t, 6, ds[0].queryFrom(t, "a:1", hashes[:6], time.Second).NumHit)
			require.EqualValues(t, fetched+6, testutil.ToFloat64(b.m.fetchBlocks))
			// The peer released its pins.
			require.Eventually(t, func() bool { return a.Stats().PinnedBlocks == 0 }, 5*time.Second, 10*time.Millisecond)
		})
	}
}

// peerPair is two peer engines, a (address a:1) and b (b:1), over the
// validated read, with a one-rank producer p on a and consumer d on b.
type peerPair struct {
	ctl  *directPeers
	a, b *Engine
	p, d *worker
}

func newPeerPair(t *testing.T) peerPair {
	t.Helper()
	pp := peerPair{ctl: &directPeers{peers: map[string]*Engine{}}}
	pp.a = newPeerEngine(t, pp.ctl, "a:1", 8<<20)
	pp.b = newPeerEngine(t, pp.ctl, "b:1", 8<<20)
	pp.p, pp.d = newWorker(t, pp.a, "P", 0, 1, smallSpec), newWorker(t, pp.b, "D", 0, 1, smallSpec)
	return pp
}

func TestFetchEndsShortOnEveryFailure(t *testing.T) {
	pp := newPeerPair(t)
	ctl, a, b, p, d := pp.ctl, pp.a, pp.b, pp.p, pp.d
	hashes := kvtest.Hashes("fail", 4)
	p.save(t, seq(0, 4), hashes, "", false)

	// An unknown peer: nothing fetched, the query answers from what is here.
	require.EqualValues(t, 0, d.queryFrom(t, "nowhere:1", hashes, time.Second).NumHit)
	require.EqualValues(t, 1, testutil.ToFloat64(b.m.fetchFailures["unreachable"]))
	// A malformed source is the caller's error.
	_, err := b.Query(context.Background(), &pb.QueryRequest{SessionId: d.session, NamespaceId: d.nsID, Hashes: hashes, SourceEngine: "nonsense"})
	require.ErrorIs(t, err, ErrInvalid)

	// The peer's epoch is checked on every open; a wrong one is refused.
	_, err = a.OpenPeerTransfer(context.Background(), &pb.PeerOpenTransferRequest{Epoch: "old", NamespaceId: p.nsID, Hashes: hashes})
	require.ErrorIs(t, err, ErrPeerEpoch)
	require.ErrorIs(t, a.ReleasePeerTransfer("pt-unknown"), ErrNotFound)
	open, err := a.OpenPeerTransfer(context.Background(), &pb.PeerOpenTransferRequest{Epoch: a.Epoch(), NamespaceId: p.nsID, Hashes: hashes})
	require.NoError(t, err)
	require.Len(t, open.Blocks, 4)
	require.EqualValues(t, 4, a.Stats().PinnedBlocks)
	require.NoError(t, a.ReleasePeerTransfer(open.Handle))
	require.ErrorIs(t, a.ReleasePeerTransfer(open.Handle), ErrNotFound, "released twice")
	require.Zero(t, a.Stats().PinnedBlocks)

	// A restarted peer (new engine, new epoch, same address): B handshakes again.
	require.EqualValues(t, 2, d.queryFrom(t, "a:1", hashes[:2], time.Second).NumHit)
	a2 := newPeerEngine(t, ctl, "a:1", 8<<20)
	p2 := newWorker(t, a2, "P", 0, 1, smallSpec)
	again := kvtest.Hashes("again", 3)
	for i := range 3 {
		p2.cache.Fill(i, 99)
	}
	p2.save(t, seq(0, 3), again, "", false)
	require.EqualValues(t, 3, d.queryFrom(t, "a:1", again, 5*time.Second).NumHit)
	require.Equal(t, allOK(3), d.load(t, []int{4, 5, 6}, again, "", ""))
	for i := range 3 {
		require.True(t, p2.cache.Equal(i, d.cache, 4+i))
	}

	// A peer that is gone (its engine closed): the fetch ends, the query answers.
	require.NoError(t, a2.Close())
	more := kvtest.Hashes("more", 2)
	start := time.Now()
	require.EqualValues(t, 0, d.queryFrom(t, "a:1", more, 2*time.Second).NumHit)
	require.Less(t, time.Since(start), 3*time.Second)
	require.Equal(t, "ok", b.Health().Status)
}

// A reader that fetched a P/D transfer releases it on the peer with its
// open: P's blocks are not left pinned until the transfer TTL (a busy P
// would fill its pool with them).
func TestFetchedTransferIsReleasedOnThePeer(t *testing.T) {
	pp := newPeerPair(t)
	a, b, p, d := pp.a, pp.b, pp.p, pp.d
	hashes := kvtest.Hashes("consumed", 4)
	p.save(t, seq(0, 4), hashes, "t-consumed", true)
	require.EqualValues(t, 4, a.Stats().PinnedBlocks, "the transfer pins its blocks for D")
	resp, err := b.Query(context.Background(), &pb.QueryRequest{SessionId: d.session, NamespaceId: d.nsID, Hashes: hashes,
		WaitMs: 2000, TransferId: "t-consumed", SourceEngine: "a:1"})
	require.NoError(t, err)
	require.EqualValues(t, 4, resp.NumHit)
	require.Eventually(t, func() bool { return a.Stats().PinnedBlocks == 0 }, 5*time.Second, 10*time.Millisecond,
		"the open and the transfer are released")
	require.EqualValues(t, 4, a.Stats().ResidentBlocks, "the blocks stay, unpinned")
}

// A fetch of more blocks than the copy budget holds (one op per share)
// reads the blocks that fit and ends short, counted and logged as such:
// it used to drop the rest silently and count the fetch as the peer's
// missing blocks.
func TestFetchOverCopyBudgetEndsShortAndSaysSo(t *testing.T) {
	ctl := &directPeers{peers: map[string]*Engine{}}
	a := newPeerEngine(t, ctl, "a:1", 8<<20)
	b, err := New(Config{PoolSize: 8 << 20, NUMANode: -1, Device: -1, PartialTTL: time.Hour, Peers: ctl, PeerAddress: "b:1",
		PeerAllow: []string{"a:1"}, MaxCopyOps: 5}, nil, prometheus.NewRegistry())
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, b.Close()) })
	const tp = 2
	var d *worker
	hashes := kvtest.Hashes("budget", 6)
	for r := range tp {
		p := newWorker(t, a, "P", r, tp, smallSpec)
		p.save(t, seq(0, 6), hashes, "", false)
		if w := newWorker(t, b, "D", r, tp, smallSpec); r == 0 {
			d = w
		}
	}
	// 6 blocks x 2 shares need 12 ops; 5 hold 2 blocks.
	require.EqualValues(t, 2, d.queryFrom(t, "a:1", hashes, 5*time.Second).NumHit)
	require.EqualValues(t, 2, testutil.ToFloat64(b.m.fetchBlocks))
	require.Zero(t, testutil.ToFloat64(b.m.fetchFailures["missing"]), "the peer held every block")
	require.EqualValues(t, 1, testutil.ToFloat64(b.m.fetchFailures["copy_budget"]))
	require.Equal(t, "ok", b.Health().Status)
}
