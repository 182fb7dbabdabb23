package engine

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"

	pb "github.com/pegaflow/pegaflow/engine/api/pegaflowv1"
	"github.com/pegaflow/pegaflow/internal/kvtest"
)

var smallSpec = kvtest.Spec{Layout: kvtest.FlashAttn, Layers: 2, NumBlocks: 16, BlockSize: 4, Heads: 2, HeadSize: 8, ElemSize: 2}

func newTestEngine(t *testing.T, poolSize uint64) *Engine {
	t.Helper()
	e, err := New(Config{PoolSize: poolSize, NUMANode: -1, Device: -1, CopyThreads: 2, PartialTTL: time.Hour}, nil, prometheus.NewRegistry())
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, e.Close()) })
	return e
}

func newCache(t *testing.T, spec kvtest.Spec) *kvtest.Cache {
	t.Helper()
	c, err := kvtest.New(kvtest.TempShmDir(t), "kv", spec)
	require.NoError(t, err)
	t.Cleanup(c.Close)
	return c
}

// worker is one registered rank of an instance, as a connector would be.
type worker struct {
	e        *Engine
	session  string
	instance string
	rank     uint32
	cache    *kvtest.Cache
	nsID     string
}

func newWorker(t *testing.T, e *Engine, instance string, rank, tp int, spec kvtest.Spec) *worker {
	t.Helper()
	c := newCache(t, spec)
	sid, err := e.OpenSession(instance)
	require.NoError(t, err)
	req := c.RegisterRequest(instance, rank, spec.Namespace("m", tp))
	req.SessionId = sid
	resp, err := e.Register(context.Background(), req)
	require.NoError(t, err)
	require.Equal(t, uint64(spec.BlockBytes()), resp.BytesPerBlock)
	return &worker{e: e, session: sid, instance: instance, rank: uint32(rank), cache: c, nsID: resp.NamespaceId}
}

func refs(ids []int, hashes [][]byte) []*pb.BlockRef {
	out := make([]*pb.BlockRef, len(ids))
	for i, id := range ids {
		out[i] = &pb.BlockRef{BlockId: uint32(id), Hash: hashes[i]}
	}
	return out
}

func seq(from, n int) []int {
	out := make([]int, n)
	for i := range out {
		out[i] = from + i
	}
	return out
}

func (w *worker) save(t *testing.T, ids []int, hashes [][]byte, transfer string, last bool) *pb.SaveResponse {
	t.Helper()
	resp, err := w.e.Save(context.Background(), &pb.SaveRequest{SessionId: w.session, InstanceId: w.instance, Rank: w.rank,
		Blocks: refs(ids, hashes), TransferId: transfer, TransferLast: last})
	require.NoError(t, err)
	return resp
}

func (w *worker) load(t *testing.T, ids []int, hashes [][]byte, lease, transfer string) []pb.BlockStatus {
	t.Helper()
	resp, err := w.e.Load(context.Background(), &pb.LoadRequest{SessionId: w.session, InstanceId: w.instance, Rank: w.rank,
		Blocks: refs(ids, hashes), LeaseId: lease, TransferId: transfer})
	require.NoError(t, err)
	return resp.Status
}

func (w *worker) query(t *testing.T, hashes [][]byte, wait time.Duration, lease bool) *pb.QueryResponse {
	t.Helper()
	resp, err := w.e.Query(context.Background(), &pb.QueryRequest{SessionId: w.session, NamespaceId: w.nsID, Hashes: hashes,
		WaitMs: uint32(wait.Milliseconds()), Lease: lease})
	require.NoError(t, err)
	return resp
}

func allOK(n int) []pb.BlockStatus {
	out := make([]pb.BlockStatus, n)
	for i := range out {
		out[i] = pb.BlockStatus_BLOCK_STATUS_OK
	}
	return out
}

func TestSaveLoadRoundTrip(t *testing.T) {
	for _, layout := range []kvtest.Layout{kvtest.FlashAttn, kvtest.FlashInfer, kvtest.MLA} {
		t.Run(string(layout), func(t *testing.T) {
			spec := smallSpec
			spec.Layout = layout
			e := newTestEngine(t, 4<<20)
			p := newWorker(t, e, "P", 0, 1, spec)
			d := newWorker(t, e, "D", 0, 1, spec)
			hashes := kvtest.Hashes("prompt", 5)
			for b := 0; b < 5; b++ {
				p.cache.Fill(b, 7)
			}
			resp := p.save(t, seq(0, 5), hashes, "", false)
			require.EqualValues(t, 5, resp.Saved)
			// Saving again is a no-op.
			require.EqualValues(t, 5, p.save(t, seq(0, 5), hashes, "", false).Skipped)

			require.EqualValues(t, 5, d.query(t, hashes, 0, false).NumHit)
			// Load into other block ids than P used.
			dst := []int{9, 3, 12, 0, 7}
			require.Equal(t, allOK(5), d.load(t, dst, hashes, "", ""))
			for i, b := range dst {
				require.True(t, p.cache.Equal(i, d.cache, b), "block %d", i)
			}
			// A block not saved is reported missing, the rest still load.
			status := d.load(t, []int{1, 2}, [][]byte{hashes[0], kvtest.Hashes("other", 1)[0]}, "", "")
			require.Equal(t, []pb.BlockStatus{pb.BlockStatus_BLOCK_STATUS_OK, pb.BlockStatus_BLOCK_STATUS_MISSING}, status)
		})
	}
}

func TestTP2BlockSealsOnlyAfterEveryRank(t *testing.T) {
	e := newTestEngine(t, 4<<20)
	p0 := newWorker(t, e, "P", 0, 2, smallSpec)
	p1 := newWorker(t, e, "P", 1, 2, smallSpec)
	d0 := newWorker(t, e, "D", 0, 2, smallSpec)
	d1 := newWorker(t, e, "D", 1, 2, smallSpec)
	hashes := kvtest.Hashes("tp2", 4)
	for b := 0; b < 4; b++ {
		p0.cache.Fill(b, 100)
		p1.cache.Fill(b, 200)
	}
	p0.save(t, seq(0, 4), hashes, "", false)
	q := d0.query(t, hashes, 0, false)
	require.EqualValues(t, 0, q.NumHit, "half-saved blocks must not be served")
	require.EqualValues(t, 4, q.NumInflight)
	require.Equal(t, pb.BlockStatus_BLOCK_STATUS_MISSING, d0.load(t, []int{0}, hashes[:1], "", "")[0])

	p1.save(t, seq(0, 4), hashes, "", false)
	require.EqualValues(t, 4, d0.query(t, hashes, 0, false).NumHit)
	require.Equal(t, allOK(4), d0.load(t, seq(4, 4), hashes, "", ""))
	require.Equal(t, allOK(4), d1.load(t, seq(8, 4), hashes, "", ""))
	for b := 0; b < 4; b++ {
		require.True(t, p0.cache.Equal(b, d0.cache, 4+b))
		require.True(t, p1.cache.Equal(b, d1.cache, 8+b))
		require.False(t, p0.cache.Equal(b, d1.cache, 8+b), "ranks hold different shares")
	}
}

func TestQueryWaitsForInflightSave(t *testing.T) {
	e := newTestEngine(t, 4<<20)
	p0 := newWorker(t, e, "P", 0, 2, smallSpec)
	p1 := newWorker(t, e, "P", 1, 2, smallSpec)
	d := newWorker(t, e, "D", 0, 2, smallSpec)
	hashes := kvtest.Hashes("wait", 3)
	p0.save(t, seq(0, 3), hashes, "", false)

	got := make(chan *pb.QueryResponse, 1)
	go func() {
		resp, err := e.Query(context.Background(), &pb.QueryRequest{SessionId: d.session, NamespaceId: d.nsID, Hashes: hashes, WaitMs: 10_000})
		if err == nil {
			got <- resp
		}
		close(got)
	}()
	select {
	case <-got:
		t.Fatal("query returned before the in-flight blocks sealed")
	case <-time.After(50 * time.Millisecond):
	}
	p1.save(t, seq(0, 3), hashes, "", false)
	select {
	case resp := <-got:
		require.NotNil(t, resp)
		require.EqualValues(t, 3, resp.NumHit)
	case <-time.After(5 * time.Second):
		t.Fatal("query did not wake when the blocks sealed")
	}

	// Nobody finishes these: the wait ends at its deadline with a partial answer.
	more := kvtest.Hashes("never", 2)
	p0.save(t, seq(3, 2), more, "", false)
	start := time.Now()
	resp := d.query(t, append(hashes, more...), 100*time.Millisecond, false)
	require.EqualValues(t, 3, resp.NumHit)
	require.EqualValues(t, 2, resp.NumInflight)
	require.GreaterOrEqual(t, time.Since(start), 100*time.Millisecond)
}

func TestEvictionKeepsLeasedBlocks(t *testing.T) {
	spec := smallSpec
	blockBytes := uint64(spec.BlockBytes())
	e := newTestEngine(t, 8*blockBytes)
	p := newWorker(t, e, "P", 0, 1, spec)
	first := kvtest.Hashes("first", 8)
	require.EqualValues(t, 8, p.save(t, seq(0, 8), first, "", false).Saved)
	q := p.query(t, first[:2], 0, true)
	require.NotEmpty(t, q.LeaseId)

	second := kvtest.Hashes("second", 6)
	require.EqualValues(t, 6, p.save(t, seq(8, 6), second, "", false).Saved)
	require.EqualValues(t, 2, p.query(t, first[:2], 0, false).NumHit, "leased blocks survive eviction")
	require.EqualValues(t, 6, p.query(t, second, 0, false).NumHit)
	require.GreaterOrEqual(t, e.Stats().Evictions, uint64(6))

	// Once the lease is loaded by the only rank it ends and the blocks can go.
	require.Equal(t, allOK(2), p.load(t, []int{14, 15}, first[:2], q.LeaseId, ""))
	e.mu.Lock()
	require.Empty(t, e.leases)
	e.mu.Unlock()
}

func TestScanDoesNotEvictHotPrefix(t *testing.T) {
	spec := smallSpec
	spec.NumBlocks = 64
	blockBytes := uint64(spec.BlockBytes())
	e := newTestEngine(t, 20*blockBytes)
	p := newWorker(t, e, "P", 0, 1, spec)
	hot := kvtest.Hashes("system-prompt", 4)
	p.save(t, seq(0, 4), hot, "", false)
	for i := 0; i < 3; i++ {
		require.EqualValues(t, 4, p.query(t, hot, 0, false).NumHit)
	}
	// A scan of one-off prompts, three times the pool, each seen once.
	for i := 0; i < 12; i++ {
		oneOff := kvtest.Hashes(fmt.Sprintf("scan-%d", i), 5)
		p.save(t, seq(4+i%8*5, 5), oneOff, "", false)
		// The hot prefix keeps being used between scans.
		require.EqualValues(t, 4, p.query(t, hot, 0, false).NumHit, "scan %d evicted the hot prefix", i)
	}
	require.Greater(t, e.Stats().Evictions, uint64(20))
	checkPools(t, e)
}

func TestSaveFailsCleanlyWhenEverythingIsPinned(t *testing.T) {
	spec := smallSpec
	blockBytes := uint64(spec.BlockBytes())
	e := newTestEngine(t, 4*blockBytes)
	p := newWorker(t, e, "P", 0, 1, spec)
	pinned := kvtest.Hashes("pinned", 4)
	p.save(t, seq(0, 4), pinned, "", false)
	require.NotEmpty(t, p.query(t, pinned, 0, true).LeaseId)

	resp := p.save(t, seq(4, 2), kvtest.Hashes("extra", 2), "", false)
	require.EqualValues(t, 0, resp.Saved)
	require.EqualValues(t, 2, resp.Failed)
	require.EqualValues(t, 4, p.query(t, pinned, 0, false).NumHit, "pinned blocks intact")
	st := e.Stats()
	require.EqualValues(t, 2, st.SaveFailures)
	require.EqualValues(t, 4, st.ResidentBlocks)
	require.Equal(t, 4*blockBytes, st.PoolUsedBytes)
}

func TestTransferReadyAfterEveryRankAndCallback(t *testing.T) {
	reports := make(chan readyReport, 4)
	callback := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var rep readyReport
		if json.NewDecoder(r.Body).Decode(&rep) == nil {
			reports <- rep
		}
	}))
	defer callback.Close()

	e := newTestEngine(t, 4<<20)
	p0 := newWorker(t, e, "P", 0, 2, smallSpec)
	p1 := newWorker(t, e, "P", 1, 2, smallSpec)
	hashes := kvtest.Hashes("xfer", 3)

	ready := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		ready <- e.AwaitTransfer(ctx, "t-1")
	}()
	save := func(w *worker, last bool) {
		_, err := e.Save(context.Background(), &pb.SaveRequest{SessionId: w.session, InstanceId: w.instance, Rank: w.rank,
			Blocks: refs(seq(0, 3), hashes), TransferId: "t-1", TransferLast: last,
			ReadyUrl: callback.URL + "/kv_ready", ReadyToken: "tok"})
		require.NoError(t, err)
	}
	save(p0, true)
	save(p1, false)
	select {
	case err := <-ready:
		t.Fatalf("ready before rank 1 sent its last save: %v", err)
	case <-time.After(50 * time.Millisecond):
	}
	save(p1, true)
	select {
	case err := <-ready:
		require.NoError(t, err)
	case <-time.After(5 * time.Second):
		t.Fatal("transfer never became ready")
	}
	select {
	case rep := <-reports:
		require.Equal(t, readyReport{TransferID: "t-1", Token: "tok", Status: "ready"}, rep)
	case <-time.After(5 * time.Second):
		t.Fatal("no kv_ready callback")
	}
	// A late waiter still sees the outcome.
	require.NoError(t, e.AwaitTransfer(context.Background(), "t-1"))

	// Transfer blocks are pinned until the decode side loaded them on all ranks.
	e.mu.Lock()
	for _, h := range hashes {
		require.Positive(t, e.namespaces[p0.nsID].groups[0].blocks[string(h)].pins)
	}
	e.mu.Unlock()
	d0 := newWorker(t, e, "D", 0, 2, smallSpec)
	d1 := newWorker(t, e, "D", 1, 2, smallSpec)
	d0.load(t, seq(0, 3), hashes, "", "t-1")
	d1.load(t, seq(0, 3), hashes, "", "t-1")
	e.mu.Lock()
	for _, h := range hashes {
		require.Zero(t, e.namespaces[p0.nsID].groups[0].blocks[string(h)].pins)
	}
	e.mu.Unlock()
}

func TestTransferFailsWhenPoolIsExhausted(t *testing.T) {
	spec := smallSpec
	e := newTestEngine(t, 2*uint64(spec.BlockBytes()))
	p := newWorker(t, e, "P", 0, 1, spec)
	p.save(t, seq(0, 3), kvtest.Hashes("big", 3), "t-2", true)
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	require.ErrorIs(t, e.AwaitTransfer(ctx, "t-2"), ErrTransferFailed)
}

func TestAwaitTransferHonoursDeadline(t *testing.T) {
	e := newTestEngine(t, 1<<20)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	require.ErrorIs(t, e.AwaitTransfer(ctx, "never-saved"), context.DeadlineExceeded)
}

func TestCloseSessionReleasesLeasesAndRegistrations(t *testing.T) {
	e := newTestEngine(t, 4<<20)
	p := newWorker(t, e, "P", 0, 1, smallSpec)
	hashes := kvtest.Hashes("lease", 3)
	p.save(t, seq(0, 3), hashes, "", false)
	sched, err := e.OpenSession("scheduler")
	require.NoError(t, err)
	q, err := e.Query(context.Background(), &pb.QueryRequest{SessionId: sched, NamespaceId: p.nsID, Hashes: hashes, Lease: true})
	require.NoError(t, err)
	require.NotEmpty(t, q.LeaseId)
	require.EqualValues(t, 3, e.Stats().PinnedBlocks)

	e.CloseSession(sched)
	require.EqualValues(t, 0, e.Stats().PinnedBlocks)
	e.CloseSession(p.session)
	require.EqualValues(t, 0, e.Stats().Instances)
	_, err = e.Save(context.Background(), &pb.SaveRequest{SessionId: p.session, InstanceId: "P", Blocks: refs([]int{0}, hashes)})
	require.ErrorIs(t, err, ErrNotFound)

	// A restarted instance re-registers and still hits what was saved.
	p2 := newWorker(t, e, "P", 0, 1, smallSpec)
	require.EqualValues(t, 3, p2.query(t, hashes, 0, false).NumHit)
}

func TestRequestValidation(t *testing.T) {
	e := newTestEngine(t, 1<<20)
	w := newWorker(t, e, "P", 0, 1, smallSpec)
	good := func() *pb.RegisterRequest {
		r := w.cache.RegisterRequest("X", 0, smallSpec.Namespace("m", 1))
		r.SessionId = w.session
		return r
	}
	regCases := []struct {
		name   string
		mutate func(*pb.RegisterRequest)
		kind   error
	}{
		{"empty instance", func(r *pb.RegisterRequest) { r.InstanceId = "" }, ErrInvalid},
		{"rank >= tp", func(r *pb.RegisterRequest) { r.Rank = 1 }, ErrInvalid},
		{"no namespace", func(r *pb.RegisterRequest) { r.Namespace = nil }, ErrInvalid},
		{"zero blocks", func(r *pb.RegisterRequest) { r.NumBlocks = 0 }, ErrInvalid},
		{"too many blocks for region", func(r *pb.RegisterRequest) { r.NumBlocks = 17 }, ErrInvalid},
		{"segment past region", func(r *pb.RegisterRequest) { r.Layers[0].Segments[1].Offset += 1 }, ErrInvalid},
		{"stride overflow", func(r *pb.RegisterRequest) { r.Layers[0].Segments[0].Stride = 1 << 63 }, ErrInvalid},
		{"offset overflow", func(r *pb.RegisterRequest) { r.Layers[0].Segments[0].Offset = ^uint64(0) }, ErrInvalid},
		{"overlapping blocks", func(r *pb.RegisterRequest) { r.Layers[0].Segments[0].Stride = 1 }, ErrInvalid},
		{"bad region index", func(r *pb.RegisterRequest) { r.Layers[0].RegionIndex = 9 }, ErrInvalid},
		{"relative shm path", func(r *pb.RegisterRequest) { r.Regions[0].Source = &pb.MemoryRegion_ShmPath{ShmPath: "kv"} }, ErrInvalid},
		{"region bigger than file", func(r *pb.RegisterRequest) { r.Regions[0].Size *= 2; r.NumBlocks = 16 }, ErrInvalid},
		{"missing file", func(r *pb.RegisterRequest) {
			r.Regions[0].Source = &pb.MemoryRegion_ShmPath{ShmPath: kvtest.ShmDir() + "/pegaflow-nonexistent-kv"}
		}, ErrInvalid},
		{"layer count mismatch", func(r *pb.RegisterRequest) { r.Namespace.NumLayers = 3 }, ErrInvalid},
		{"unknown session", func(r *pb.RegisterRequest) { r.SessionId = "nope" }, ErrNotFound},
		{"hash seed mismatch", func(r *pb.RegisterRequest) { r.Namespace.HashSeedFingerprint = []byte("seed-1") }, ErrPrecondition},
		{"geometry mismatch", func(r *pb.RegisterRequest) {
			r.Layers[1].Segments = r.Layers[1].Segments[:1]
		}, ErrPrecondition},
	}
	for _, tc := range regCases {
		t.Run(tc.name, func(t *testing.T) {
			r := good()
			tc.mutate(r)
			_, err := e.Register(context.Background(), r)
			require.ErrorIs(t, err, tc.kind)
		})
	}

	blockCases := []struct {
		name string
		refs []*pb.BlockRef
	}{
		{"block id out of range", []*pb.BlockRef{{BlockId: 16, Hash: make([]byte, 32)}}},
		{"short hash", []*pb.BlockRef{{BlockId: 0, Hash: make([]byte, 4)}}},
		{"long hash", []*pb.BlockRef{{BlockId: 0, Hash: make([]byte, 65)}}},
		{"nil ref", []*pb.BlockRef{nil}},
	}
	for _, tc := range blockCases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := e.Save(context.Background(), &pb.SaveRequest{SessionId: w.session, InstanceId: "P", Blocks: tc.refs})
			require.ErrorIs(t, err, ErrInvalid)
			_, err = e.Load(context.Background(), &pb.LoadRequest{SessionId: w.session, InstanceId: "P", Blocks: tc.refs})
			require.ErrorIs(t, err, ErrInvalid)
		})
	}
	require.Zero(t, e.Stats().ResidentBlocks, "rejected requests changed nothing")

	_, err := e.Save(context.Background(), &pb.SaveRequest{SessionId: w.session, InstanceId: "P", TransferId: "t", ReadyUrl: "file:///etc/passwd"})
	require.ErrorIs(t, err, ErrInvalid)
	_, err = e.Query(context.Background(), &pb.QueryRequest{SessionId: w.session, NamespaceId: "ns-unknown", Hashes: kvtest.Hashes("x", 1)})
	require.ErrorIs(t, err, ErrNotFound)
	require.ErrorIs(t, e.Release(&pb.ReleaseRequest{SessionId: w.session, LeaseId: "l-unknown"}), ErrNotFound)
}

func TestConcurrentSaveLoadQuery(t *testing.T) {
	spec := smallSpec
	spec.NumBlocks = 32
	e := newTestEngine(t, 24*uint64(spec.BlockBytes()))
	var wg sync.WaitGroup
	for g := 0; g < 4; g++ {
		w := newWorker(t, e, fmt.Sprintf("I%d", g), 0, 1, spec)
		for b := 0; b < spec.NumBlocks; b++ {
			w.cache.Fill(b, 42) // same content for the same hash in every instance
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for round := 0; round < 30; round++ {
				hashes := kvtest.Hashes(fmt.Sprintf("p%d", round%7), 8)
				ids := seq(0, 8)
				if _, err := e.Save(context.Background(), &pb.SaveRequest{SessionId: w.session, InstanceId: w.instance, Blocks: refs(ids, hashes)}); err != nil {
					t.Error(err)
					return
				}
				q, err := e.Query(context.Background(), &pb.QueryRequest{SessionId: w.session, NamespaceId: w.nsID, Hashes: hashes, Lease: true})
				if err != nil {
					t.Error(err)
					return
				}
				if q.NumHit == 0 {
					continue
				}
				dst := seq(16, int(q.NumHit))
				lr, err := e.Load(context.Background(), &pb.LoadRequest{SessionId: w.session, InstanceId: w.instance,
					Blocks: refs(dst, hashes[:q.NumHit]), LeaseId: q.LeaseId})
				if err != nil {
					t.Error(err)
					return
				}
				for i, st := range lr.Status {
					if st != pb.BlockStatus_BLOCK_STATUS_OK || !w.cache.Equal(i, w.cache, 16+i) {
						t.Errorf("round %d block %d: status %v or bytes differ", round, i, st)
					}
				}
			}
		}()
	}
	wg.Wait()
	st := e.Stats()
	require.Zero(t, st.PinnedBlocks, "every pin released")
	require.LessOrEqual(t, st.PoolUsedBytes, st.PoolCapacityBytes)
	checkPools(t, e)
}

func TestQueryPackedHashes(t *testing.T) {
	e := newTestEngine(t, 4<<20)
	p := newWorker(t, e, "P", 0, 1, smallSpec)
	hashes := kvtest.Hashes("packed", 4)
	p.save(t, seq(0, 3), hashes[:3], "", false)
	var packed []byte
	for _, h := range hashes {
		packed = append(packed, h...)
	}
	resp, err := e.Query(context.Background(), &pb.QueryRequest{SessionId: p.session, NamespaceId: p.nsID, PackedHashes: packed, HashLen: 32})
	require.NoError(t, err)
	require.EqualValues(t, 3, resp.NumHit)

	bad := []*pb.QueryRequest{
		{PackedHashes: packed, HashLen: 4},
		{PackedHashes: packed[:33], HashLen: 32},
		{PackedHashes: packed, HashLen: 32, Hashes: hashes},
	}
	for _, req := range bad {
		req.SessionId, req.NamespaceId = p.session, p.nsID
		_, err := e.Query(context.Background(), req)
		require.ErrorIs(t, err, ErrInvalid)
	}
}

// A transfer this engine never saw a save for (only waiters, no record)
// wakes its waiters on release but is not a failure on record;
// one that had saves and is released unfinished is.
func TestReleaseTransferUnseenVersusUnfinished(t *testing.T) {
	reg := prometheus.NewRegistry()
	e, err := New(Config{PoolSize: 4 << 20, NUMANode: -1, Device: -1, CopyThreads: 2, PartialTTL: time.Hour}, nil, reg)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, e.Close()) })
	failed := func() float64 {
		families, err := reg.Gather()
		require.NoError(t, err)
		for _, f := range families {
			if f.GetName() != "pegaflow_engine_transfers_total" {
				continue
			}
			for _, m := range f.GetMetric() {
				for _, l := range m.GetLabel() {
					if l.GetName() == "status" && l.GetValue() == "failed" {
						return m.GetCounter().GetValue()
					}
				}
			}
		}
		return 0
	}

	waited := make(chan error, 1)
	go func() { waited <- e.AwaitTransfer(context.Background(), "unseen") }()
	require.Eventually(t, func() bool {
		e.mu.Lock()
		defer e.mu.Unlock()
		_, ok := e.waits["unseen"]
		return ok
	}, 5*time.Second, time.Millisecond)
	e.ReleaseTransfer("unseen")
	select {
	case err := <-waited:
		require.ErrorIs(t, err, ErrTransferFailed)
	case <-time.After(5 * time.Second):
		t.Fatal("release did not wake the waiter")
	}
	require.Zero(t, failed(), "an unseen transfer is not a failure")

	// TP=2 with only rank 0 saved: unfinished, and its release fails it.
	p0 := newWorker(t, e, "P", 0, 2, smallSpec)
	p0.save(t, seq(0, 2), kvtest.Hashes("half", 2), "half", true)
	e.ReleaseTransfer("half")
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	require.ErrorIs(t, e.AwaitTransfer(ctx, "half"), ErrTransferFailed)
	require.EqualValues(t, 1, failed())
}
