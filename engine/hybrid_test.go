package engine

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	pb "github.com/pegaflow/pegaflow/engine/api/pegaflowv1"
	"github.com/pegaflow/pegaflow/internal/kvtest"
)

// hybridSpec's four layers become three groups of different per-rank
// bytes (hybridLayers): group 0 full (layer 0: K and V; layer 1: one
// quarter-size segment, another shape and dtype in the same group),
// group 2 sliding window (layer 2: K and V), group 5 state (layer 3: one
// half-size segment).
var hybridSpec = kvtest.Spec{Layout: kvtest.FlashAttn, Layers: 4, NumBlocks: 16, BlockSize: 4, Heads: 2, HeadSize: 8, ElemSize: 2}

var hybridGroups = []*pb.KVGroup{{Index: 0, Kind: GroupFull}, {Index: 2, Kind: GroupSlidingWindow, WindowTokens: 6}, {Index: 5, Kind: GroupState}}

// hybridLayerGroup is each layer's group; hybridLen each layer's segment
// length as a fraction (1/n) of a full segment, with one segment when n > 1.
var (
	hybridLayerGroup = []uint32{0, 0, 2, 5}
	hybridFrac       = []uint64{1, 4, 1, 2}
)

func hybridNS(groups []*pb.KVGroup) *pb.Namespace {
	ns := hybridSpec.Namespace("hybrid", 1)
	ns.Groups = groups
	return ns
}

// hybridRegister is the cache's RegisterRequest with hybridSpec's layers
// put in groups (and shapes) as above.
func hybridRegister(c *kvtest.Cache, instance string, ns *pb.Namespace) *pb.RegisterRequest {
	req := c.RegisterRequest(instance, 0, ns)
	seg := uint64(c.Spec.SegmentBytes())
	for l, layer := range req.Layers {
		layer.Group = hybridLayerGroup[l]
		if n := hybridFrac[l]; n > 1 {
			layer.Segments = []*pb.Segment{{Offset: 0, Stride: seg, Length: seg / n}}
		}
	}
	return req
}

// groupBytes is what hybridRegister makes one rank's share of a block of
// each group.
func groupBytes(g uint32) uint64 {
	seg := uint64(hybridSpec.SegmentBytes())
	var n uint64
	for l, lg := range hybridLayerGroup {
		if lg != g {
			continue
		}
		if hybridFrac[l] > 1 {
			n += seg / hybridFrac[l]
		} else {
			n += 2 * seg
		}
	}
	return n
}

func newHybridWorker(t *testing.T, e *Engine, instance string) *worker {
	t.Helper()
	c := newCache(t, hybridSpec)
	sid, err := e.OpenSession(instance)
	require.NoError(t, err)
	req := hybridRegister(c, instance, hybridNS(hybridGroups))
	req.SessionId = sid
	resp, err := e.Register(context.Background(), req)
	require.NoError(t, err)
	require.Equal(t, groupBytes(0)+groupBytes(2)+groupBytes(5), resp.BytesPerBlock)
	return &worker{e: e, session: sid, instance: instance, cache: c, nsID: resp.NamespaceId}
}

// gref is a block ref of a group.
type gref struct {
	group uint32
	id    int
	hash  []byte
}

func grefs(rs []gref) []*pb.BlockRef {
	out := make([]*pb.BlockRef, len(rs))
	for i, r := range rs {
		out[i] = &pb.BlockRef{BlockId: uint32(r.id), Hash: r.hash, Group: r.group}
	}
	return out
}

func (w *worker) saveGroups(t *testing.T, rs []gref) *pb.SaveResponse {
	t.Helper()
	resp, err := w.e.Save(context.Background(), &pb.SaveRequest{SessionId: w.session, InstanceId: w.instance, Rank: w.rank, Blocks: grefs(rs)})
	require.NoError(t, err)
	return resp
}

func (w *worker) loadGroups(t *testing.T, rs []gref, lease string) []pb.BlockStatus {
	t.Helper()
	resp, err := w.e.Load(context.Background(), &pb.LoadRequest{SessionId: w.session, InstanceId: w.instance, Rank: w.rank,
		Blocks: grefs(rs), LeaseId: lease})
	require.NoError(t, err)
	return resp.Status
}

// groupSegments are the registered bytes of block b of group g's layers.
func groupSegments(c *kvtest.Cache, g uint32, b int) []byte {
	var out []byte
	for l, lg := range hybridLayerGroup {
		if lg != g {
			continue
		}
		segs := c.Segments(l, b)
		if n := hybridFrac[l]; n > 1 {
			segs = [][]byte{segs[0][:uint64(len(segs[0]))/n]}
		}
		for _, s := range segs {
			out = append(out, s...)
		}
	}
	return out
}

// The boundary rule, table by table: 'S' sealed, 's' being saved, '.'
// absent, per group, position by position.
func TestHybridBoundary(t *testing.T) {
	full := KVGroup{Index: 0, Kind: GroupFull}
	swa := func(w uint32) KVGroup { return KVGroup{Index: 1, Kind: GroupSlidingWindow, WindowTokens: w} }
	chunk := func(c uint32) KVGroup { return KVGroup{Index: 3, Kind: GroupChunkedLocal, WindowTokens: c} }
	state := KVGroup{Index: 7, Kind: GroupState}
	for _, tc := range []struct {
		name          string
		groups        []KVGroup
		held          map[uint32]string
		first         uint32
		hit, inflight int
	}{
		{"no groups: the sealed prefix", nil, map[uint32]string{0: "SSS.S"}, 0, 3, 0},
		{"no groups: in flight after the prefix", nil, map[uint32]string{0: "SSss."}, 0, 2, 2},
		{"full missing in the middle", []KVGroup{full}, map[uint32]string{0: "SS.SS"}, 0, 2, 0},
		// block size 4: W=6 needs ceil(5/4)=2 blocks, W=5 one.
		{"swa W=6 (not a block multiple) needs 2", []KVGroup{swa(6)}, map[uint32]string{1: "...SS"}, 0, 5, 0},
		{"swa W=6 with its second-last block gone", []KVGroup{swa(6)}, map[uint32]string{1: "SSS.S"}, 0, 3, 0},
		{"swa W=5 needs 1", []KVGroup{swa(5)}, map[uint32]string{1: "....S"}, 0, 5, 0},
		{"swa W=1 needs none", []KVGroup{swa(1)}, map[uint32]string{1: "....."}, 0, 5, 0},
		// chunk 8 tokens = 2 blocks
		{"chunked: k on a chunk boundary needs none", []KVGroup{chunk(8)}, map[uint32]string{3: "...."}, 0, 4, 0},
		{"chunked: k off a boundary needs its chunk so far", []KVGroup{chunk(8)}, map[uint32]string{3: "....S"}, 0, 5, 0},
		{"chunked: k off a boundary, chunk start missing", []KVGroup{chunk(16)}, map[uint32]string{3: "SS.S.S"}, 0, 4, 0},
		{"chunked: first_block moves the chunks", []KVGroup{chunk(8)}, map[uint32]string{3: "S."}, 1, 1, 0},
		{"chunked: same blocks at first_block 0", []KVGroup{chunk(8)}, map[uint32]string{3: "S."}, 0, 2, 0},
		{"chunked: chunk starts before first_block", []KVGroup{chunk(16)}, map[uint32]string{3: "S."}, 1, 1, 0},
		{"state only at some positions", []KVGroup{state}, map[uint32]string{7: ".S.S."}, 0, 4, 0},
		{"state nowhere", []KVGroup{state}, map[uint32]string{7: "....."}, 0, 0, 0},
		{"full+swa+state: drops to where the state is", []KVGroup{full, swa(5), state},
			map[uint32]string{0: "SSSSSS", 1: "SSSSSS", 7: "..S..."}, 0, 3, 0},
		{"full+swa+state: a dropped window block shrinks the hit", []KVGroup{full, swa(9), state},
			map[uint32]string{0: "SSSSSS", 1: "SSSS.S", 7: "...S.S"}, 0, 4, 0},
		{"full+swa+state: a dropped full block makes it 0", []KVGroup{full, swa(5), state},
			map[uint32]string{0: "SS.SSS", 1: "SSSSSS", 7: ".....S"}, 0, 0, 0},
		{"full+state: state in flight", []KVGroup{full, state}, map[uint32]string{0: "SSSS", 7: "..Ss"}, 0, 3, 1},
		{"full+state: all in flight", []KVGroup{full, state}, map[uint32]string{0: "SSss", 7: "...s"}, 0, 0, 4},
		{"two full groups", []KVGroup{full, {Index: 2, Kind: GroupFull}}, map[uint32]string{0: "SSSS", 2: "SS.S"}, 0, 2, 0},
		{"full+chunked", []KVGroup{full, chunk(8)}, map[uint32]string{0: "SSSSS", 3: "S...S"}, 0, 5, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ns := &namespace{desc: &Namespace{BlockSize: 4, TPSize: 1, Groups: tc.groups}}
			require.NoError(t, validateGroups(ns.desc))
			ns.initGroups()
			n := 0
			for idx, s := range tc.held {
				g := ns.group(idx)
				n = len(s)
				for i, c := range s {
					h := string(kvtest.Hashes("b", len(s))[i])
					switch c {
					case 'S':
						g.blocks[h] = &block{g: g, sealed: true}
					case 's':
						g.blocks[h] = &block{g: g, saving: 1}
					}
				}
			}
			e := &Engine{}
			hit, inflight := e.hitLocked(ns, kvtest.Hashes("b", n), tc.first)
			require.Equal(t, tc.hit, hit, "hit")
			require.Equal(t, tc.inflight, inflight, "inflight")
		})
	}
}

// A save and load through three groups of different per-rank bytes (and
// layers of different shapes in one group) copies each group's layers
// only, and the same hash in two groups is two blocks.
func TestHybridSaveLoadBytes(t *testing.T) {
	e := newTestEngine(t, 4<<20)
	p, d := newHybridWorker(t, e, "P"), newHybridWorker(t, e, "D")
	require.Equal(t, p.nsID, d.nsID)
	hashes := kvtest.Hashes("hy", 3)
	for b := range 6 {
		p.cache.Fill(b, 11)
	}
	// hashes[0] in all three groups, from different cache blocks.
	saved := []gref{{0, 0, hashes[0]}, {0, 1, hashes[1]}, {2, 2, hashes[0]}, {2, 3, hashes[2]}, {5, 4, hashes[0]}}
	require.EqualValues(t, len(saved), p.saveGroups(t, saved).Saved)
	require.Equal(t, alignUp(groupBytes(0))*2+alignUp(groupBytes(2))*2+alignUp(groupBytes(5)), e.Stats().PoolUsedBytes)
	require.EqualValues(t, 5, e.Stats().ResidentBlocks)

	dst := []int{9, 3, 12, 0, 7}
	var load []gref
	for i, r := range saved {
		load = append(load, gref{r.group, dst[i], r.hash})
	}
	require.Equal(t, allOK(len(load)), d.loadGroups(t, load, ""))
	for i, r := range saved {
		for _, g := range []uint32{0, 2, 5} {
			got := groupSegments(d.cache, g, dst[i])
			if g == r.group {
				require.Equal(t, groupSegments(p.cache, g, r.id), got, "block %d group %d", i, g)
				continue
			}
			require.Equal(t, make([]byte, len(got)), got, "block %d: group %d's layers untouched", i, g)
		}
	}
	// Unaligned share sizes are accounted per group.
	require.Equal(t, uint64(2), e.stats.kinds[kindFull].saves)
	require.Equal(t, 2*groupBytes(2), e.stats.kinds[kindSliding].bytesSaved)
	require.Equal(t, groupBytes(5), e.stats.kinds[kindState].bytesLoaded)
	require.Equal(t, 1, e.stats.kinds[kindState].resident)
	// A group the namespace has no block of there: missing, not another group's.
	require.Equal(t, []pb.BlockStatus{pb.BlockStatus_BLOCK_STATUS_MISSING}, d.loadGroups(t, []gref{{5, 1, hashes[1]}}, ""))
}

func blockOf(e *Engine, w *worker, g uint32, h []byte) *block {
	return e.namespaces[w.nsID].group(g).blocks[string(h)]
}

// The lease of a hybrid hit pins exactly the blocks the boundary needs;
// a Load of them with the lease releases it, and they become evictable.
func TestHybridLeasePinsExactlyTheNeeded(t *testing.T) {
	e := newTestEngine(t, 4<<20)
	p, d := newHybridWorker(t, e, "P"), newHybridWorker(t, e, "D")
	hashes := kvtest.Hashes("lease", 5)
	var rs []gref
	for i, h := range hashes {
		rs = append(rs, gref{0, i, h}, gref{2, 5 + i, h})
	}
	rs = append(rs, gref{5, 12, hashes[1]}, gref{5, 13, hashes[3]})
	p.saveGroups(t, rs)
	resp, err := e.Query(context.Background(), &pb.QueryRequest{SessionId: d.session, NamespaceId: d.nsID, Hashes: hashes, Lease: true})
	require.NoError(t, err)
	// k=4: full 0..3, window (W=6: 2 blocks) 2..3, state 3.
	require.EqualValues(t, 4, resp.NumHit)
	require.Zero(t, resp.NumInflight)
	needed := map[*block]bool{}
	for i := range 4 {
		needed[blockOf(e, p, 0, hashes[i])] = true
	}
	needed[blockOf(e, p, 2, hashes[2])] = true
	needed[blockOf(e, p, 2, hashes[3])] = true
	needed[blockOf(e, p, 5, hashes[3])] = true
	e.mu.Lock()
	for _, g := range e.namespaces[p.nsID].groups {
		for _, b := range g.blocks {
			require.Equal(t, needed[b], b.pins == 1, "group %d: pinned iff needed", g.index)
		}
	}
	require.Equal(t, 12-7, e.policy.evictable)
	e.mu.Unlock()
	load := []gref{{0, 0, hashes[0]}, {0, 1, hashes[1]}, {0, 2, hashes[2]}, {0, 3, hashes[3]}, {2, 4, hashes[2]}, {2, 5, hashes[3]}, {5, 6, hashes[3]}}
	require.Equal(t, allOK(7), d.loadGroups(t, load, resp.LeaseId))
	e.mu.Lock()
	require.Equal(t, 12, e.policy.evictable, "the lease is gone: every block evictable")
	require.Empty(t, e.leases)
	e.mu.Unlock()
}

// Dropping (evicting) one group's block shrinks the hit; the hybrid Query
// never answers a boundary a group cannot load.
func TestHybridEvictedBlockShrinksHit(t *testing.T) {
	e := newTestEngine(t, 4<<20)
	p := newHybridWorker(t, e, "P")
	hashes := kvtest.Hashes("evict", 4)
	var rs []gref
	for i, h := range hashes {
		rs = append(rs, gref{0, i, h}, gref{2, 4 + i, h}, gref{5, 8 + i, h})
	}
	p.saveGroups(t, rs)
	require.EqualValues(t, 4, p.query(t, hashes, 0, false).NumHit)
	for _, tc := range []struct {
		group uint32
		pos   int
		hit   uint32
	}{
		{2, 0, 4}, // out of k=4's window (2..3): no change
		{5, 3, 3}, // the last state: back to the one before it
		{0, 2, 0}, // a full block: k <= 2, whose window needs the dropped 0
	} {
		e.mu.Lock()
		e.freeLocked(blockOf(e, p, tc.group, hashes[tc.pos]))
		e.mu.Unlock()
		require.EqualValues(t, tc.hit, p.query(t, hashes, 0, false).NumHit, "after dropping group %d block %d", tc.group, tc.pos)
	}
}

// A Query waits for a state block still being saved (TP 2: one rank
// saved it), then answers the whole boundary; a transfer of blocks of
// every group is ready only once all of them sealed.
func TestHybridWaitsForInflightState(t *testing.T) {
	e := newTestEngine(t, 4<<20)
	var ws []*worker
	for r := range 2 {
		c := newCache(t, hybridSpec)
		sid, err := e.OpenSession(fmt.Sprint("P", r))
		require.NoError(t, err)
		ns := hybridNS(hybridGroups)
		ns.TpSize = 2
		req := hybridRegister(c, "P", ns)
		req.Rank, req.SessionId = uint32(r), sid
		resp, err := e.Register(context.Background(), req)
		require.NoError(t, err)
		ws = append(ws, &worker{e: e, session: sid, instance: "P", rank: uint32(r), cache: c, nsID: resp.NamespaceId})
	}
	hashes := kvtest.Hashes("wait", 3)
	rs := []gref{{0, 0, hashes[0]}, {0, 1, hashes[1]}, {0, 2, hashes[2]}, {2, 7, hashes[0]}, {2, 3, hashes[1]}, {2, 4, hashes[2]}}
	state := []gref{{5, 5, hashes[0]}, {5, 6, hashes[2]}}
	save := func(w *worker, rs []gref) {
		_, err := e.Save(context.Background(), &pb.SaveRequest{SessionId: w.session, InstanceId: w.instance, Rank: w.rank,
			Blocks: grefs(rs), TransferId: "tx", TransferLast: true})
		require.NoError(t, err)
	}
	save(ws[0], append(rs, state...))
	save(ws[1], append(rs, state[0]))
	resp := ws[0].query(t, hashes, 0, false)
	require.EqualValues(t, 1, resp.NumHit, "state at 0 only")
	require.EqualValues(t, 2, resp.NumInflight, "the state at 2 is being saved")
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	require.Error(t, e.AwaitTransfer(ctx, "tx"), "a state block of the transfer is not sealed")
	cancel()
	done := make(chan *pb.QueryResponse)
	go func() {
		r, err := e.Query(context.Background(), &pb.QueryRequest{SessionId: ws[0].session, NamespaceId: ws[0].nsID, Hashes: hashes, WaitMs: 10000})
		if err != nil {
			r = nil
		}
		done <- r
	}()
	save(ws[1], state[1:])
	r := <-done
	require.NotNil(t, r)
	require.EqualValues(t, 3, r.NumHit)
	require.Zero(t, r.NumInflight)
	ctx, cancel = context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	require.NoError(t, e.AwaitTransfer(ctx, "tx"))
}

func TestHybridHostileInput(t *testing.T) {
	e := newTestEngine(t, 4<<20)
	p := newHybridWorker(t, e, "P")
	h := kvtest.Hashes("bad", 1)[0]
	for _, g := range []uint32{1, 3, 64, 1 << 31} {
		_, err := e.Save(context.Background(), &pb.SaveRequest{SessionId: p.session, InstanceId: p.instance, Blocks: grefs([]gref{{g, 0, h}})})
		require.ErrorIs(t, err, ErrInvalid, "save group %d", g)
		_, err = e.Load(context.Background(), &pb.LoadRequest{SessionId: p.session, InstanceId: p.instance, Blocks: grefs([]gref{{g, 0, h}})})
		require.ErrorIs(t, err, ErrInvalid, "load group %d", g)
	}
	// The same hash in two groups is two blocks; twice in one group, a repeat.
	_, err := e.Save(context.Background(), &pb.SaveRequest{SessionId: p.session, InstanceId: p.instance, Blocks: grefs([]gref{{0, 0, h}, {0, 1, h}})})
	require.ErrorIs(t, err, ErrInvalid)
	// One block id in two groups of one call: refused (the layers may share memory).
	_, err = e.Save(context.Background(), &pb.SaveRequest{SessionId: p.session, InstanceId: p.instance, Blocks: grefs([]gref{{0, 1, h}, {2, 1, h}})})
	require.ErrorIs(t, err, ErrInvalid)
	// A one-group namespace has group 0 only.
	w := newWorker(t, e, "plain", 0, 1, smallSpec)
	_, err = e.Save(context.Background(), &pb.SaveRequest{SessionId: w.session, InstanceId: w.instance, Blocks: grefs([]gref{{1, 0, h}})})
	require.ErrorIs(t, err, ErrInvalid)

	many := make([]*pb.KVGroup, 65)
	for i := range many {
		many[i] = &pb.KVGroup{Index: uint32(i), Kind: GroupFull}
	}
	many[64].Index = 0
	for _, tc := range []struct {
		name   string
		groups []*pb.KVGroup
		edit   func(*pb.RegisterRequest)
		want   error
	}{
		{"layer in an unlisted group", hybridGroups, func(r *pb.RegisterRequest) { r.Layers[3].Group = 4 }, ErrInvalid},
		{"group without layers", hybridGroups, func(r *pb.RegisterRequest) { r.Layers[3].Group = 2 }, ErrInvalid},
		{"layer in group 1 without groups", nil, func(r *pb.RegisterRequest) { r.Layers[0].Group = 1 }, ErrInvalid},
		{"duplicate group index", append(hybridGroups[:3:3], &pb.KVGroup{Index: 2, Kind: GroupState}), nil, ErrInvalid},
		{"65 groups", many, nil, ErrInvalid},
		{"index 64", []*pb.KVGroup{{Index: 64, Kind: GroupFull}}, nil, ErrInvalid},
		{"chunk not a multiple of block size", []*pb.KVGroup{{Index: 0, Kind: GroupChunkedLocal, WindowTokens: 6}}, nil, ErrInvalid},
		{"window of 0", []*pb.KVGroup{{Index: 0, Kind: GroupSlidingWindow}}, nil, ErrInvalid},
		{"window on a full group", []*pb.KVGroup{{Index: 0, Kind: GroupFull, WindowTokens: 8}}, nil, ErrInvalid},
		{"unknown kind", []*pb.KVGroup{{Index: 0, Kind: "cross_attention"}}, nil, ErrInvalid},
		{"nil group", []*pb.KVGroup{nil}, nil, ErrInvalid},
		{"other groups than the namespace's layers", []*pb.KVGroup{{Index: 0, Kind: GroupFull}, {Index: 2, Kind: GroupSlidingWindow, WindowTokens: 6},
			{Index: 5, Kind: GroupState}}, func(r *pb.RegisterRequest) { r.Layers[1].Group, r.Layers[2].Group = 2, 0 }, ErrPrecondition},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newCache(t, hybridSpec)
			req := hybridRegister(c, "X", hybridNS(tc.groups))
			if tc.groups == nil {
				req = c.RegisterRequest("X", 0, hybridSpec.Namespace("plain-hy", 1))
			}
			if tc.edit != nil {
				tc.edit(req)
			}
			req.SessionId = p.session
			_, err := e.Register(context.Background(), req)
			require.ErrorIs(t, err, tc.want)
			if tc.groups != nil && tc.edit == nil {
				_, err := e.OpenNamespace(p.session, hybridNS(tc.groups))
				require.ErrorIs(t, err, ErrInvalid)
			}
		})
	}
}

// Groups are part of the namespace id only when set: namespaces without
// them keep their ids (TestNamespaceIDPinned), and group order does not
// matter.
func TestHybridNamespaceID(t *testing.T) {
	plain := namespaceFromPB(hybridSpec.Namespace("hybrid", 1))
	withEmpty := namespaceFromPB(hybridNS([]*pb.KVGroup{}))
	hy := namespaceFromPB(hybridNS(hybridGroups))
	reordered := namespaceFromPB(hybridNS([]*pb.KVGroup{hybridGroups[2], hybridGroups[0], hybridGroups[1]}))
	require.Equal(t, namespaceID(plain), namespaceID(withEmpty))
	require.NotEqual(t, namespaceID(plain), namespaceID(hy))
	require.NotEqual(t, servingKey(plain), servingKey(hy))
	require.Equal(t, namespaceID(hy), namespaceID(reordered))
	require.Equal(t, "ns-78f01da54c1a4391660863f056d5101a", namespaceID(hy))
	other := namespaceFromPB(hybridNS([]*pb.KVGroup{hybridGroups[0], {Index: 2, Kind: GroupSlidingWindow, WindowTokens: 7}, hybridGroups[2]}))
	require.NotEqual(t, namespaceID(hy), namespaceID(other), "the window is part of the id")
}

// A D engine fetching from P's engine gets every group's blocks of P's
// hybrid boundary (group and position in the peer messages), with their
// own share sizes, and answers that boundary; the bytes arrive intact.
func TestHybridFetchFromPeer(t *testing.T) {
	ctl := &directPeers{peers: map[string]*Engine{}}
	a, b := newPeerEngine(t, ctl, "a:1", 8<<20), newPeerEngine(t, ctl, "b:1", 8<<20)
	p, d := newHybridWorker(t, a, "P"), newHybridWorker(t, b, "D")
	hashes := kvtest.Hashes("xhost", 5)
	var rs []gref
	for i, h := range hashes {
		p.cache.Fill(i, 3)
		p.cache.Fill(5+i, 4)
		rs = append(rs, gref{0, i, h}, gref{2, 5 + i, h})
	}
	p.cache.Fill(12, 5)
	rs = append(rs, gref{5, 12, hashes[3]})
	p.saveGroups(t, rs)
	// D holds one needed block already: it relies on it instead of reading it.
	d.cache.Fill(15, 4)
	require.NoError(t, func() error {
		_, err := b.Save(context.Background(), &pb.SaveRequest{SessionId: d.session, InstanceId: d.instance,
			Blocks: grefs([]gref{{2, 15, hashes[3]}})})
		return err
	}())
	resp := d.queryFrom(t, "a:1", hashes, 5*time.Second)
	require.EqualValues(t, 4, resp.NumHit, "P's boundary: the state is at 3")
	// Fetched: full 0..3, window 2 (3 was here), state 3; nothing else.
	b.mu.Lock()
	ns := b.namespaces[d.nsID]
	require.Len(t, ns.group(0).blocks, 4)
	require.Len(t, ns.group(2).blocks, 2)
	require.Len(t, ns.group(5).blocks, 1)
	b.mu.Unlock()
	load := []gref{{0, 0, hashes[0]}, {0, 1, hashes[1]}, {0, 2, hashes[2]}, {0, 3, hashes[3]}, {2, 4, hashes[2]}, {5, 6, hashes[3]}}
	src := []int{0, 1, 2, 3, 7, 12}
	require.Equal(t, allOK(len(load)), d.loadGroups(t, load, ""))
	for i, r := range load {
		require.Equal(t, groupSegments(p.cache, r.group, src[i]), groupSegments(d.cache, r.group, r.id), "block %d group %d", i, r.group)
	}
	require.Eventually(t, func() bool { return a.Stats().PinnedBlocks == 0 }, 5*time.Second, 10*time.Millisecond)
}

// A peer's hybrid answer naming an unknown group, a position past the
// hashes, one block twice or a share of another size is refused whole.
func TestHybridPeerAnswerChecked(t *testing.T) {
	ns := &namespace{desc: namespaceFromPB(hybridNS(hybridGroups))}
	ns.initGroups()
	for _, g := range ns.groups {
		g.rankBytes = groupBytes(g.index)
	}
	f := &fetchRange{ns: ns, hashes: kvtest.Hashes("p", 2), pools: []int{0}}
	blk := func(g, pos uint32, n uint64) *pb.PeerBlock {
		return &pb.PeerBlock{Group: g, Position: pos, Shares: []*pb.PeerExtent{{Length: n}}}
	}
	good := blk(5, 1, groupBytes(5))
	require.NoError(t, checkPeerBlocks(&pb.PeerOpenTransferResponse{Blocks: []*pb.PeerBlock{blk(0, 0, groupBytes(0)), good}}, f, -1))
	for name, bad := range map[string][]*pb.PeerBlock{
		"unknown group":   {blk(3, 0, groupBytes(0))},
		"past the hashes": {blk(0, 2, groupBytes(0))},
		"twice":           {good, good},
		"other size":      {blk(2, 0, groupBytes(0))},
		"nil share":       {{Group: 0, Shares: []*pb.PeerExtent{nil}}},
		"too many":        {good, good, good, good, good, good, good},
	} {
		require.ErrorIs(t, checkPeerBlocks(&pb.PeerOpenTransferResponse{Blocks: bad}, f, -1), errPeerMismatch, name)
	}
}

// BenchmarkQueryBoundary: the hybrid boundary (full + window + state,
// every block held) next to the one-group prefix, over 64Ki hashes.
func BenchmarkQueryBoundary(b *testing.B) {
	const n = 1 << 16
	hashes := kvtest.Hashes("bench", n)
	for _, groups := range [][]KVGroup{nil, {{Index: 0, Kind: GroupFull}, {Index: 1, Kind: GroupSlidingWindow, WindowTokens: 128},
		{Index: 2, Kind: GroupState}}} {
		ns := &namespace{desc: &Namespace{BlockSize: 16, TPSize: 1, Groups: groups}}
		ns.initGroups()
		for _, g := range ns.groups {
			for _, h := range hashes {
				g.blocks[string(h)] = &block{g: g, sealed: true}
			}
		}
		e := &Engine{}
		b.Run(fmt.Sprintf("groups=%d", len(ns.groups)), func(b *testing.B) {
			for b.Loop() {
				if hit, _ := e.hitLocked(ns, hashes, 0); hit != n {
					b.Fatal(hit)
				}
			}
		})
	}
}
