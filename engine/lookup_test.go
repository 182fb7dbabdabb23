package engine

import (
	"bytes"
	"fmt"
	"strings"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"

	pb "github.com/pegaflow/pegaflow/engine/api/pegaflowv1"
	"github.com/pegaflow/pegaflow/internal/kvtest"
)

// lookupOf is the LookupQuery a router would send for smallSpec's
// namespace (kvtest.Spec.Namespace).
func lookupOf(hashes [][]byte) LookupQuery {
	return LookupQuery{Model: "m", BlockSize: uint32(smallSpec.BlockSize), HashAlgo: "sha256_cbor",
		SeedFingerprint: []byte("seed-0"), Hashes: hashes}
}

func TestLookup(t *testing.T) {
	e := newTestEngine(t, 4<<20)
	p := newWorker(t, e, "P", 0, 1, smallSpec)
	held := kvtest.Hashes("held", 5)
	p.save(t, seq(0, 5), held, "", false)
	other := kvtest.Hashes("other", 5)
	holey := [][]byte{held[0], held[1], other[2], held[3]}
	for _, tc := range []struct {
		name string
		edit func(q *LookupQuery)
		want int
	}{
		{"the whole prompt", func(*LookupQuery) {}, 5},
		{"any model", func(q *LookupQuery) { q.Model = "" }, 5},
		{"a longer prompt: the held prefix", func(q *LookupQuery) { q.Hashes = append(q.Hashes, other...) }, 5},
		{"a missing block ends the prefix", func(q *LookupQuery) { q.Hashes = holey }, 2},
		{"no hashes", func(q *LookupQuery) { q.Hashes = nil }, 0},
		{"another model", func(q *LookupQuery) { q.Model = "m2" }, 0},
		{"another block size", func(q *LookupQuery) { q.BlockSize = 16 }, 0},
		{"another algorithm", func(q *LookupQuery) { q.HashAlgo = "sha256" }, 0},
		{"another seed", func(q *LookupQuery) { q.SeedFingerprint = []byte("seed-1") }, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			q := lookupOf(held)
			tc.edit(&q)
			res, err := e.Lookup(q)
			require.NoError(t, err)
			require.Equal(t, tc.want, res.Blocks)
			require.Equal(t, e.epoch, res.Epoch)
			if tc.want > 0 {
				require.Equal(t, p.nsID, res.NamespaceID)
			} else {
				require.Empty(t, res.NamespaceID)
			}
		})
	}
	// Nothing was leased, pinned or counted as a query.
	e.mu.Lock()
	require.Empty(t, e.leases)
	for _, b := range e.namespaces[p.nsID].groups[0].blocks {
		require.Zero(t, b.pins)
	}
	require.Zero(t, e.stats.hits+e.stats.misses)
	e.mu.Unlock()
}

// Of several matching namespaces (one model at two TP sizes; "" matches
// every model) the one holding the most answers.
func TestLookupBestNamespace(t *testing.T) {
	e := newTestEngine(t, 4<<20)
	a := newWorker(t, e, "A", 0, 1, smallSpec)
	hashes := kvtest.Hashes("p", 6)
	a.save(t, seq(0, 2), hashes[:2], "", false)
	c := newCache(t, smallSpec)
	sid, err := e.OpenSession("B")
	require.NoError(t, err)
	ns := smallSpec.Namespace("m-other", 1)
	req := c.RegisterRequest("B", 0, ns)
	req.SessionId = sid
	resp, err := e.Register(t.Context(), req)
	require.NoError(t, err)
	b := &worker{e: e, session: sid, instance: "B", cache: c, nsID: resp.NamespaceId}
	b.save(t, seq(0, 4), hashes[:4], "", false)

	q := lookupOf(hashes)
	q.Model = ""
	res, err := e.Lookup(q)
	require.NoError(t, err)
	require.Equal(t, LookupResult{Blocks: 4, NamespaceID: b.nsID, Epoch: e.epoch}, res)
	q.Model = "m"
	res, err = e.Lookup(q)
	require.NoError(t, err)
	require.Equal(t, LookupResult{Blocks: 2, NamespaceID: a.nsID, Epoch: e.epoch}, res)
}

func TestLookupRefusesMalformed(t *testing.T) {
	e := newTestEngine(t, 1<<20)
	ok := kvtest.Hashes("x", 2)
	for _, tc := range []struct {
		name string
		edit func(q *LookupQuery)
	}{
		{"no fingerprint", func(q *LookupQuery) { q.SeedFingerprint = nil }},
		{"fingerprint too long", func(q *LookupQuery) { q.SeedFingerprint = make([]byte, MaxHashLen+1) }},
		{"block size 0", func(q *LookupQuery) { q.BlockSize = 0 }},
		{"no algorithm", func(q *LookupQuery) { q.HashAlgo = "" }},
		{"model too long", func(q *LookupQuery) { q.Model = strings.Repeat("m", MaxIDLen+1) }},
		{"model not UTF-8", func(q *LookupQuery) { q.Model = "\xff" }},
		{"short hash", func(q *LookupQuery) { q.Hashes = [][]byte{ok[0], make([]byte, MinHashLen-1)} }},
		{"long hash", func(q *LookupQuery) { q.Hashes = [][]byte{make([]byte, MaxHashLen+1)} }},
		{"too many hashes", func(q *LookupQuery) { q.Hashes = kvtest.Hashes("many", MaxLookupHashes+1) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			q := lookupOf(ok)
			tc.edit(&q)
			_, err := e.Lookup(q)
			require.ErrorIs(t, err, ErrInvalid)
		})
	}
	for _, tc := range []struct {
		name    string
		packed  []byte
		hashLen uint32
	}{
		{"hash_len 0", make([]byte, 64), 0},
		{"hash_len too big", make([]byte, 130), 65},
		{"not a multiple", make([]byte, 33), 32},
		{"too many", make([]byte, 8*(MaxLookupHashes+1)), 8},
	} {
		t.Run("packed "+tc.name, func(t *testing.T) {
			_, err := e.PeerLookup(&pb.PeerLookupRequest{Model: "m", BlockSize: 4, HashAlgo: "sha256_cbor",
				HashSeedFingerprint: []byte("seed-0"), PackedHashes: tc.packed, HashLen: tc.hashLen})
			require.ErrorIs(t, err, ErrInvalid)
		})
	}
	resp, err := e.PeerLookup(&pb.PeerLookupRequest{Model: "m", BlockSize: 4, HashAlgo: "sha256_cbor",
		HashSeedFingerprint: []byte("seed-0"), PackedHashes: bytes.Join(ok, nil), HashLen: uint32(len(ok[0]))})
	require.NoError(t, err)
	require.Zero(t, resp.NumHit)
	require.NoError(t, e.Close())
	_, err = e.Lookup(lookupOf(ok))
	require.ErrorIs(t, err, ErrClosed)
}

// A router looking up a prefix on every request must not make it hot: a
// prefix that is only looked up is evicted by a scan like any one-off
// block (TestScanDoesNotEvictHotPrefix is the same prefix kept by use).
func TestLookupIsNotAUse(t *testing.T) {
	spec := smallSpec
	spec.NumBlocks = 64
	e := newTestEngine(t, 20*uint64(spec.BlockBytes()))
	p := newWorker(t, e, "P", 0, 1, spec)
	cold := kvtest.Hashes("looked-up", 4)
	p.save(t, seq(0, 4), cold, "", false)
	lookup := func() int {
		res, err := e.Lookup(lookupOf(cold))
		require.NoError(t, err)
		return res.Blocks
	}
	for range 3 {
		require.Equal(t, 4, lookup())
	}
	for i := range 12 {
		p.save(t, seq(4+i%8*5, 5), kvtest.Hashes(fmt.Sprintf("scan-%d", i), 5), "", false)
		lookup()
	}
	require.Less(t, lookup(), 4, "lookups kept the prefix alive")
	checkPools(t, e)
}

// Lookups running while saves evict: every answer is a prefix the
// engine held at some point, nothing races (-race), and once quiet the
// lookup agrees with a Query.
func TestLookupDuringEviction(t *testing.T) {
	spec := smallSpec
	spec.NumBlocks = 64
	e := newTestEngine(t, 12*uint64(spec.BlockBytes()))
	p := newWorker(t, e, "P", 0, 1, spec)
	prompts := make([][][]byte, 6)
	for i := range prompts {
		prompts[i] = kvtest.Hashes(fmt.Sprintf("prompt-%d", i), 5)
	}
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for w := range 2 {
		wg.Go(func() {
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				res, err := e.Lookup(lookupOf(prompts[(i+w)%len(prompts)]))
				if err != nil || res.Blocks > 5 {
					t.Errorf("lookup: %+v, %v", res, err)
					return
				}
			}
		})
	}
	for round := range 20 {
		i := round % len(prompts)
		p.save(t, seq(round%4*5, 5), prompts[i], "", false)
	}
	close(stop)
	wg.Wait()
	require.Positive(t, e.Stats().Evictions)
	for _, h := range prompts {
		res, err := e.Lookup(lookupOf(h))
		require.NoError(t, err)
		require.EqualValues(t, p.query(t, h, 0, false).NumHit, res.Blocks)
	}
	checkPools(t, e)
}

// A hybrid namespace answers its hybrid boundary from the request's
// first block: what a Query with first_block 0 hits.
func TestLookupHybridBoundary(t *testing.T) {
	e := newTestEngine(t, 4<<20)
	p := newHybridWorker(t, e, "P")
	hashes := kvtest.Hashes("hybrid", 4)
	var rs []gref
	for i, h := range hashes {
		rs = append(rs, gref{0, i, h}, gref{2, 4 + i, h})
		if i == 1 { // the state only after block 1
			rs = append(rs, gref{5, 8 + i, h})
		}
	}
	p.saveGroups(t, rs)
	q := LookupQuery{Model: "hybrid", BlockSize: uint32(hybridSpec.BlockSize), HashAlgo: "sha256_cbor",
		SeedFingerprint: []byte("seed-0"), Hashes: hashes}
	res, err := e.Lookup(q)
	require.NoError(t, err)
	require.Equal(t, 2, res.Blocks, "the boundary is where the state is, not the full prefix of 4")
	require.EqualValues(t, p.query(t, hashes, 0, false).NumHit, res.Blocks)
	require.Equal(t, p.nsID, res.NamespaceID)
}
