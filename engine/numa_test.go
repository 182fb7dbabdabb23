package engine

import (
	"context"
	"errors"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"

	pb "github.com/pegaflow/pegaflow/engine/api/pegaflowv1"
	"github.com/pegaflow/pegaflow/engine/topology"
	"github.com/pegaflow/pegaflow/internal/kvtest"
)

// The tests below fake a two-socket host: gpuA on NUMA node 0, gpuB on
// node 1. This machine may have node 0 only; binding a pool to a missing
// node is best effort, so the pools exist and work either way.

const mib = 1 << 20

// bigSpec's rank share is 64 KiB: sixteen fill a 1 MiB node pool.
var bigSpec = kvtest.Spec{Layout: kvtest.FlashAttn, Layers: 2, NumBlocks: 24, BlockSize: 16, Heads: 8, HeadSize: 64, ElemSize: 2}

func newNUMAEngine(t *testing.T, topo *topology.Topology, poolSize uint64, numaNode int) (*Engine, *prometheus.Registry) {
	t.Helper()
	reg := prometheus.NewRegistry()
	e, err := New(Config{PoolSize: poolSize, NUMANode: numaNode, Device: -1, CopyThreads: 2, PartialTTL: time.Hour, Topology: topo}, nil, reg)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, e.Close()) })
	return e, reg
}

// newGPUWorker registers one rank whose caches are on the GPU uuid.
func newGPUWorker(t *testing.T, e *Engine, instance, model string, rank, tp int, spec kvtest.Spec, uuid string) *worker {
	t.Helper()
	c := newCache(t, spec)
	sid, err := e.OpenSession(instance)
	require.NoError(t, err)
	req := c.RegisterRequest(instance, rank, spec.Namespace(model, tp))
	for _, r := range req.Regions {
		r.DeviceUuid = uuid
	}
	req.SessionId = sid
	resp, err := e.Register(context.Background(), req)
	require.NoError(t, err)
	return &worker{e: e, session: sid, instance: instance, rank: uint32(rank), cache: c, nsID: resp.NamespaceId}
}

// poolOf is the NUMA node of the pool holding rank's share of a block.
func poolOf(t *testing.T, e *Engine, w *worker, hash []byte, rank int) int {
	t.Helper()
	e.mu.Lock()
	defer e.mu.Unlock()
	b := e.namespaces[w.nsID].groups[0].blocks[string(hash)]
	require.NotNil(t, b, "block not resident")
	s := b.shares[rank]
	require.NotZero(t, s.ext.size, "share %d not allocated", rank)
	return e.pools[s.pool].node
}

// nodeUsed is the bytes held in the pool on node.
func nodeUsed(t *testing.T, e *Engine, node int) uint64 {
	t.Helper()
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, p := range e.pools {
		if p.node == node {
			return p.alloc.used
		}
	}
	t.Fatalf("no pool on node %d", node)
	return 0
}

// nodeGauges reads a per-node pool gauge by numa_node label.
func nodeGauges(t *testing.T, reg *prometheus.Registry, name string) map[int]float64 {
	t.Helper()
	families, err := reg.Gather()
	require.NoError(t, err)
	out := map[int]float64{}
	for _, f := range families {
		if f.GetName() != name {
			continue
		}
		for _, m := range f.GetMetric() {
			require.Len(t, m.GetLabel(), 1)
			n, err := strconv.Atoi(m.GetLabel()[0].GetValue())
			require.NoError(t, err)
			out[n] = m.GetGauge().GetValue()
		}
	}
	return out
}

func TestPoolSizeSplitAcrossNodes(t *testing.T) {
	tests := []struct {
		name      string
		topo      *topology.Topology
		requested int
		size      uint64
		pools     map[int]float64 // node -> capacity
		def       int
	}{
		{"CPU mode: one unbound pool", nil, -1, 4 * mib, map[int]float64{-1: 4 * mib}, -1},
		{"one node", fakeGPUs(1, 1), -1, 4 * mib, map[int]float64{1: 4 * mib}, 1},
		{"two nodes, by GPU count", fakeGPUs(0, 1, 1), -1, 4 * mib, map[int]float64{0: mib, 1: 3 * mib}, 1},
		{"two nodes, even", fakeGPUs(0, 1), -1, 4 * mib, map[int]float64{0: 2 * mib, 1: 2 * mib}, 0},
		{"--numa-node puts everything on one node", fakeGPUs(0, 1), 1, 4 * mib, map[int]float64{1: 4 * mib}, 1},
		{"too small to split", fakeGPUs(0, 1), -1, mib, map[int]float64{0: mib}, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e, reg := newNUMAEngine(t, tc.topo, tc.size, tc.requested)
			require.Equal(t, tc.pools, nodeGauges(t, reg, "pegaflow_engine_numa_pool_capacity_bytes"))
			require.Len(t, nodeGauges(t, reg, "pegaflow_engine_numa_pool_used_bytes"), len(tc.pools))
			require.EqualValues(t, tc.size, gauge(t, reg, "pegaflow_engine_pool_capacity_bytes"), "the total is unchanged")
			require.EqualValues(t, tc.size, e.Stats().PoolCapacityBytes)
			require.EqualValues(t, tc.def, gauge(t, reg, "pegaflow_engine_pool_numa_node"))
			p := e.PoolPlacement()
			require.Equal(t, tc.def, p.Node)
			require.Len(t, p.Pools, len(tc.pools))
			for _, ps := range p.Pools {
				require.EqualValues(t, tc.pools[ps.Node], ps.Size)
			}
		})
	}
}

// TestTP2SharesLiveOnTheirRanksNodes: P's rank 0 is on node 0 and rank 1
// on node 1, D's the other way round, and a second prefill P2 is placed
// like D. Every share lands in its saver's node pool, and every load is
// byte-exact, also when one Load gathers shares from both pools.
func TestTP2SharesLiveOnTheirRanksNodes(t *testing.T) {
	e, reg := newNUMAEngine(t, fakeGPUs(0, 1), 4*mib, -1)
	p0 := newGPUWorker(t, e, "P", "m", 0, 2, smallSpec, gpuA)
	p1 := newGPUWorker(t, e, "P", "m", 1, 2, smallSpec, gpuB)
	q0 := newGPUWorker(t, e, "P2", "m", 0, 2, smallSpec, gpuB)
	q1 := newGPUWorker(t, e, "P2", "m", 1, 2, smallSpec, gpuA)
	d0 := newGPUWorker(t, e, "D", "m", 0, 2, smallSpec, gpuB)
	d1 := newGPUWorker(t, e, "D", "m", 1, 2, smallSpec, gpuA)
	rankBytes := uint64(smallSpec.BlockBytes())

	fromP, fromQ := kvtest.Hashes("from-p", 3), kvtest.Hashes("from-q", 2)
	for b := 0; b < 3; b++ {
		p0.cache.Fill(b, 10)
		p1.cache.Fill(b, 11)
	}
	for b := 0; b < 2; b++ {
		q0.cache.Fill(b, 20)
		q1.cache.Fill(b, 21)
	}
	for _, w := range []*worker{p0, p1} {
		require.EqualValues(t, 3, w.save(t, seq(0, 3), fromP, "", false).Saved)
	}
	for _, w := range []*worker{q0, q1} {
		require.EqualValues(t, 2, w.save(t, seq(0, 2), fromQ, "", false).Saved)
	}
	for _, h := range fromP {
		require.Equal(t, 0, poolOf(t, e, p0, h, 0), "P rank 0 is on node 0")
		require.Equal(t, 1, poolOf(t, e, p0, h, 1), "P rank 1 is on node 1")
	}
	for _, h := range fromQ {
		require.Equal(t, 1, poolOf(t, e, p0, h, 0))
		require.Equal(t, 0, poolOf(t, e, p0, h, 1))
	}
	require.Equal(t, 5*rankBytes, nodeUsed(t, e, 0))
	require.Equal(t, 5*rankBytes, nodeUsed(t, e, 1))
	require.Equal(t, map[int]float64{0: float64(5 * rankBytes), 1: float64(5 * rankBytes)},
		nodeGauges(t, reg, "pegaflow_engine_numa_pool_used_bytes"))
	require.Equal(t, 10*rankBytes, e.Stats().PoolUsedBytes)

	// One Load per D rank over both prompts: shares from two pools.
	all := append(append([][]byte{}, fromP...), fromQ...)
	require.EqualValues(t, 5, d0.query(t, all, 0, false).NumHit)
	dst := []int{9, 3, 12, 0, 7}
	require.Equal(t, allOK(5), d0.load(t, dst, all, "", ""))
	require.Equal(t, allOK(5), d1.load(t, dst, all, "", ""))
	for i, b := range dst {
		src0, src1, sb := p0, p1, i
		if i >= 3 {
			src0, src1, sb = q0, q1, i-3
		}
		require.True(t, src0.cache.Equal(sb, d0.cache, b), "rank 0 block %d", i)
		require.True(t, src1.cache.Equal(sb, d1.cache, b), "rank 1 block %d", i)
	}
	checkPools(t, e)
}

func TestMLAKeepsOneShare(t *testing.T) {
	spec := smallSpec
	spec.Layout = kvtest.MLA
	e, _ := newNUMAEngine(t, fakeGPUs(0, 1), 4*mib, -1)
	// As the connector does for MLA: TP size 1, rank 0 saves, every rank
	// loads as rank 0 of its own engine instance.
	p := newGPUWorker(t, e, "P", "m", 0, 1, spec, gpuB)
	d := newGPUWorker(t, e, "D-r1", "m", 0, 1, spec, gpuA)
	hashes := kvtest.Hashes("mla", 4)
	for b := 0; b < 4; b++ {
		p.cache.Fill(b, 5)
	}
	require.EqualValues(t, 4, p.save(t, seq(0, 4), hashes, "", false).Saved)
	e.mu.Lock()
	for _, h := range hashes {
		require.Len(t, e.namespaces[p.nsID].groups[0].blocks[string(h)].shares, 1, "one extent per MLA block")
	}
	e.mu.Unlock()
	require.Equal(t, 1, poolOf(t, e, p, hashes[0], 0))
	require.Equal(t, 4*alignUp(uint64(spec.BlockBytes())), nodeUsed(t, e, 1), "128-byte shares, 256-aligned")
	require.Zero(t, nodeUsed(t, e, 0))
	require.Equal(t, allOK(4), d.load(t, seq(8, 4), hashes, "", ""))
	for b := 0; b < 4; b++ {
		require.True(t, p.cache.Equal(b, d.cache, 8+b))
	}
	checkPools(t, e)
}

// TestEvictionFreesThePoolThatIsFull: B's blocks on node 1 are the oldest,
// so a single policy would evict them first, freeing nothing where A
// needs room. Per-pool queues evict A's own oldest blocks on node 0.
func TestEvictionFreesThePoolThatIsFull(t *testing.T) {
	e, _ := newNUMAEngine(t, fakeGPUs(0, 1), 2*mib, -1)
	a := newGPUWorker(t, e, "A", "m", 0, 1, bigSpec, gpuA)
	b := newGPUWorker(t, e, "B", "m", 0, 1, bigSpec, gpuB)
	rankBytes := uint64(bigSpec.BlockBytes())
	require.Equal(t, uint64(mib), 16*rankBytes)

	old := kvtest.Hashes("b-old", 4)
	require.EqualValues(t, 4, b.save(t, seq(0, 4), old, "", false).Saved)
	first := kvtest.Hashes("a-first", 16)
	require.EqualValues(t, 16, a.save(t, seq(0, 16), first, "", false).Saved)
	require.Zero(t, e.Stats().Evictions, "node 0's pool is exactly full")
	more := kvtest.Hashes("a-more", 4)
	require.EqualValues(t, 4, a.save(t, seq(16, 4), more, "", false).Saved)

	require.EqualValues(t, 4, e.Stats().Evictions)
	require.EqualValues(t, 4, b.query(t, old, 0, false).NumHit, "node 1's blocks stay")
	require.Equal(t, 4*rankBytes, nodeUsed(t, e, 1))
	require.Equal(t, 16*rankBytes, nodeUsed(t, e, 0))
	require.EqualValues(t, 0, a.query(t, first[:4], 0, false).NumHit, "A's oldest blocks went")
	require.EqualValues(t, 12, a.query(t, first[4:], 0, false).NumHit)
	require.EqualValues(t, 4, a.query(t, more, 0, false).NumHit)
	checkPools(t, e)
}

// TestEvictingATP2BlockFreesBothPools: room on node 0 for A evicts a TP 2
// block, whose other share frees space on node 1 too.
func TestEvictingATP2BlockFreesBothPools(t *testing.T) {
	e, _ := newNUMAEngine(t, fakeGPUs(0, 1), 2*mib, -1)
	p0 := newGPUWorker(t, e, "P", "p", 0, 2, bigSpec, gpuA)
	p1 := newGPUWorker(t, e, "P", "p", 1, 2, bigSpec, gpuB)
	a := newGPUWorker(t, e, "A", "a", 0, 1, bigSpec, gpuA)
	rankBytes := uint64(bigSpec.BlockBytes())
	tp2 := kvtest.Hashes("tp2", 8)
	p0.save(t, seq(0, 8), tp2, "", false)
	p1.save(t, seq(0, 8), tp2, "", false)
	require.EqualValues(t, 8, e.Stats().ResidentBlocks, "sealed, and not queried: unreferenced")
	require.EqualValues(t, 8, a.save(t, seq(0, 8), kvtest.Hashes("a", 8), "", false).Saved)
	require.Zero(t, e.Stats().Evictions)

	require.EqualValues(t, 2, a.save(t, seq(8, 2), kvtest.Hashes("a-more", 2), "", false).Saved)
	require.EqualValues(t, 2, e.Stats().Evictions)
	require.EqualValues(t, 0, p0.query(t, tp2[:2], 0, false).NumHit, "the oldest TP 2 blocks went")
	require.Equal(t, 6*rankBytes, nodeUsed(t, e, 1), "with both of their shares")
	require.Equal(t, 16*rankBytes, nodeUsed(t, e, 0))
	checkPools(t, e)
}

// TestFullNodePoolFailsCleanly: node 0's pool is all pinned. A TP 2 save
// whose rank 1 share fitted on node 1 fails on rank 0: the block is
// dropped with rank 1's share, the transfer fails, and node 1 keeps
// serving saves.
func TestFullNodePoolFailsCleanly(t *testing.T) {
	e, _ := newNUMAEngine(t, fakeGPUs(0, 1), 2*mib, -1)
	a := newGPUWorker(t, e, "A", "a", 0, 1, bigSpec, gpuA)
	p0 := newGPUWorker(t, e, "P", "p", 0, 2, bigSpec, gpuA)
	p1 := newGPUWorker(t, e, "P", "p", 1, 2, bigSpec, gpuB)
	rankBytes := uint64(bigSpec.BlockBytes())

	pinned := kvtest.Hashes("pinned", 16)
	require.EqualValues(t, 16, a.save(t, seq(0, 16), pinned, "", false).Saved)
	require.NotEmpty(t, a.query(t, pinned, 0, true).LeaseId)

	hashes := kvtest.Hashes("x", 2)
	save := func(w *worker) *pb.SaveResponse {
		resp, err := e.Save(context.Background(), &pb.SaveRequest{SessionId: w.session, InstanceId: w.instance, Rank: w.rank,
			Blocks: refs(seq(0, 2), hashes), TransferId: "t-numa", TransferLast: true})
		require.NoError(t, err)
		return resp
	}
	require.EqualValues(t, 2, save(p1).Saved, "node 1 has room")
	require.Equal(t, 2*rankBytes, nodeUsed(t, e, 1))
	resp := save(p0)
	require.EqualValues(t, 0, resp.Saved)
	require.EqualValues(t, 2, resp.Failed)

	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	require.ErrorIs(t, e.AwaitTransfer(ctx, "t-numa"), ErrTransferFailed)
	require.Zero(t, nodeUsed(t, e, 1), "rank 1's shares were returned")
	require.Equal(t, 16*rankBytes, nodeUsed(t, e, 0))
	st := e.Stats()
	require.EqualValues(t, 2, st.SaveFailures)
	require.EqualValues(t, 16, st.ResidentBlocks)
	require.Zero(t, st.Evictions)
	require.EqualValues(t, 16, a.query(t, pinned, 0, false).NumHit, "pinned blocks intact")
	require.EqualValues(t, 0, p0.query(t, hashes, 0, false).NumHit)

	// A node 1 instance of the same model as A is unaffected.
	b := newGPUWorker(t, e, "B", "a", 0, 1, bigSpec, gpuB)
	require.EqualValues(t, 4, b.save(t, seq(0, 4), kvtest.Hashes("b", 4), "", false).Saved)
	checkPools(t, e)
}

func TestRegisterShareMustFitItsNodePool(t *testing.T) {
	// 4 MiB over nodes 0 (1 GPU) and 1 (3 GPUs): 1 MiB and 3 MiB.
	spec := kvtest.Spec{Layout: kvtest.FlashAttn, Layers: 1, NumBlocks: 2, BlockSize: 16, Heads: 8, HeadSize: 4096, ElemSize: 2}
	require.Equal(t, 2*mib, spec.BlockBytes())
	e, _ := newNUMAEngine(t, fakeGPUs(0, 1, 1, 1), 4*mib, -1)
	tests := []struct {
		name, uuid string
		ok         bool
	}{
		{"node 0's pool is too small", gpuA, false},
		{"node 1's pool fits it", gpuB, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := newCache(t, spec)
			sid, err := e.OpenSession("P")
			require.NoError(t, err)
			req := c.RegisterRequest("P-"+tc.uuid, 0, spec.Namespace("m", 1))
			req.SessionId = sid
			for _, r := range req.Regions {
				r.DeviceUuid = tc.uuid
			}
			_, err = e.Register(context.Background(), req)
			if tc.ok {
				require.NoError(t, err)
				return
			}
			require.ErrorIs(t, err, ErrInvalid)
			require.ErrorContains(t, err, "does not fit the pool of its NUMA node 0")
		})
	}
}

func TestPartialBlockExpiryFreesItsShares(t *testing.T) {
	e, _ := newNUMAEngine(t, fakeGPUs(0, 1), 4*mib, -1)
	p0 := newGPUWorker(t, e, "P", "m", 0, 2, smallSpec, gpuA)
	_ = newGPUWorker(t, e, "P", "m", 1, 2, smallSpec, gpuB)
	require.EqualValues(t, 3, p0.save(t, seq(0, 3), kvtest.Hashes("half", 3), "", false).Saved)
	require.Equal(t, 3*uint64(smallSpec.BlockBytes()), nodeUsed(t, e, 0))
	checkPools(t, e)
	e.expire(time.Now().Add(2 * time.Hour)) // rank 1 never saved
	require.Zero(t, nodeUsed(t, e, 0))
	require.Zero(t, e.Stats().ResidentBlocks)
	checkPools(t, e)
}

// checkPools checks the per-pool bookkeeping against the index: each
// pool's used bytes are its resident shares', sealed blocks have every
// share, and exactly the sealed unpinned blocks are queued, each share in
// its own pool's queues.
func checkPools(t *testing.T, e *Engine) {
	t.Helper()
	e.mu.Lock()
	defer e.mu.Unlock()
	used := make([]uint64, len(e.pools))
	queued := make([]int, len(e.pools))
	evictable := 0
	for _, ns := range e.namespaces {
		for _, b := range ns.groups[0].blocks {
			require.Len(t, b.shares, int(ns.desc.TPSize))
			for r, s := range b.shares {
				require.Same(t, b, s.b)
				if s.ext.size == 0 {
					require.False(t, b.sealed, "sealed block without share %d", r)
					require.Zero(t, b.saved&(1<<r), "saved share %d without an extent", r)
					continue
				}
				used[s.pool] += s.ext.size
				if s.queue != queueNone {
					queued[s.pool]++
				}
			}
			require.Equal(t, b.sealed && b.pins == 0, b.queued, "queued iff sealed and unpinned")
			if b.queued {
				evictable++
			}
		}
	}
	require.Equal(t, evictable, e.policy.evictable)
	for i, p := range e.pools {
		require.Equal(t, p.alloc.used, used[i], "pool %d (node %d) used bytes", i, p.node)
		q := e.policy.pools[i]
		require.Equal(t, queued[i], q.probation.len+q.main.len, "pool %d queue lengths", i)
	}
}

// TestConcurrentTP2AcrossNodes: two TP 2 instances placed crosswise save,
// query, load and release the same prompts concurrently while both node
// pools overflow. Whatever is served is byte-exact, and the pools'
// bookkeeping holds at the end.
func TestConcurrentTP2AcrossNodes(t *testing.T) {
	e, _ := newNUMAEngine(t, fakeGPUs(0, 1), 2*mib, -1)
	var workers []*worker
	for i, gpus := range [][2]string{{gpuA, gpuB}, {gpuB, gpuA}} {
		for rank, gpu := range gpus {
			w := newGPUWorker(t, e, "I"+strconv.Itoa(i), "m", rank, 2, bigSpec, gpu)
			for b := 0; b < bigSpec.NumBlocks; b++ {
				w.cache.Fill(b, uint64(42+rank)) // a rank's bytes depend on the block id only
			}
			workers = append(workers, w)
		}
	}
	var wg sync.WaitGroup
	for _, w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx := context.Background()
			for round := 0; round < 30; round++ {
				hashes := kvtest.Hashes("p"+strconv.Itoa(round%7), 8)
				if _, err := e.Save(ctx, &pb.SaveRequest{SessionId: w.session, InstanceId: w.instance, Rank: w.rank,
					Blocks: refs(seq(0, 8), hashes)}); err != nil {
					t.Error(err)
					return
				}
				q, err := e.Query(ctx, &pb.QueryRequest{SessionId: w.session, NamespaceId: w.nsID, Hashes: hashes, Lease: true})
				if err != nil {
					t.Error(err)
					return
				}
				if q.NumHit == 0 {
					continue
				}
				lr, err := e.Load(ctx, &pb.LoadRequest{SessionId: w.session, InstanceId: w.instance, Rank: w.rank,
					Blocks: refs(seq(16, int(q.NumHit)), hashes[:q.NumHit]), LeaseId: q.LeaseId})
				if err != nil {
					t.Error(err)
					return
				}
				for i, st := range lr.Status {
					if st != pb.BlockStatus_BLOCK_STATUS_OK || !w.cache.Equal(i, w.cache, 16+i) {
						t.Errorf("%s rank %d round %d block %d: status %v or bytes differ", w.instance, w.rank, round, i, st)
					}
				}
				if err := e.Release(&pb.ReleaseRequest{SessionId: w.session, LeaseId: q.LeaseId}); err != nil && !errors.Is(err, ErrNotFound) {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	require.Zero(t, e.Stats().PinnedBlocks, "every pin released")
	st := e.Stats()
	require.Positive(t, st.Evictions)
	require.Positive(t, st.Loads, "some prompts were served")
	checkPools(t, e)
}
