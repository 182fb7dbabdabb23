package engine

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"

	pb "github.com/pegaflow/pegaflow/engine/api/pegaflowv1"
	"github.com/pegaflow/pegaflow/engine/ssd"
	"github.com/pegaflow/pegaflow/internal/kvtest"
	"github.com/pegaflow/pegaflow/native"
)

// ssdSpec's blocks are 4 KiB per rank (2 layers x K,V x 4 tokens x 2
// heads x 64 x 2 bytes): one O_DIRECT unit, so the pool holds exactly
// poolBlocks of them.
var ssdSpec = kvtest.Spec{Layout: kvtest.FlashAttn, Layers: 2, NumBlocks: 64, BlockSize: 4, Heads: 2, HeadSize: 64, ElemSize: 2}

const poolBlocks = 12

func newSSDEngine(t *testing.T, dir string, tweak func(*Config)) (*Engine, *prometheus.Registry) {
	t.Helper()
	reg := prometheus.NewRegistry()
	cfg := Config{PoolSize: poolBlocks * uint64(ssdSpec.BlockBytes()), NUMANode: -1, Device: -1, CopyThreads: 2, PartialTTL: time.Hour,
		SSD: SSDConfig{Dirs: []string{dir}, Size: MinSSDSize, PromoteWait: 5 * time.Second, Backend: native.SSDThreads}}
	if tweak != nil {
		tweak(&cfg)
	}
	e, err := New(cfg, nil, reg)
	require.NoError(t, err)
	return e, reg
}

// waitClasses waits until the directory has a class for the registered
// namespace (learned in the background at Register).
func waitClasses(t *testing.T, e *Engine) {
	t.Helper()
	require.Eventually(t, func() bool {
		for _, d := range e.tier.dirs {
			d.ioMu.RLock()
			ok := d.store != nil
			d.ioMu.RUnlock()
			if !ok {
				return false
			}
		}
		return true
	}, 10*time.Second, 5*time.Millisecond)
}

func tierStatsOf(e *Engine) tierStats {
	s, _, _, _ := e.tier.counters()
	return s
}

// proveReuse saves prompt's blocks and queries them twice, so they are
// referenced and move to the main queue when probation evicts them.
func proveReuse(t *testing.T, w *worker, ids []int, hashes [][]byte) {
	t.Helper()
	w.save(t, ids, hashes, "", false)
	for range 2 {
		require.EqualValues(t, len(hashes), w.query(t, hashes, 0, false).NumHit)
	}
}

// churn saves and reuses n prompts of 4 blocks after the first: enough
// to push the first out of the pool's main queue.
func churn(t *testing.T, w *worker, name string, n int) {
	t.Helper()
	for i := range n {
		proveReuse(t, w, seq(4+i%12*4, 4), kvtest.Hashes(fmt.Sprintf("%s-%d", name, i), 4))
	}
}

// evictHot saves 4 "hot" blocks (filled from seed), proves their reuse
// and churns them out of the pool; wait: until they are on SSD.
func evictHot(t *testing.T, e *Engine, p *worker, seed uint64, wait bool) [][]byte {
	t.Helper()
	hot := kvtest.Hashes("hot", 4)
	for b := range 4 {
		p.cache.Fill(b, seed+uint64(b))
	}
	proveReuse(t, p, seq(0, 4), hot)
	churn(t, p, "other", 8) // every save succeeds (the helpers require it)
	if wait {
		waitSpilled(t, e, 4)
	}
	return hot
}

func waitSpilled(t *testing.T, e *Engine, min uint64) {
	t.Helper()
	require.Eventually(t, func() bool {
		s, _, jobs, _ := e.tier.counters()
		return s.spillBlocks >= min && jobs == 0
	}, 10*time.Second, 5*time.Millisecond)
}

func tierHits(t *testing.T, reg *prometheus.Registry, tier string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	require.NoError(t, err)
	for _, mf := range mfs {
		if mf.GetName() != "pegaflow_engine_query_blocks_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			if m.GetLabel()[0].GetValue() == tier {
				return m.GetCounter().GetValue()
			}
		}
	}
	return 0
}

func TestSSDSpillThenPromoteByteExact(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ssd")
	e, reg := newSSDEngine(t, dir, nil)
	defer func() { require.NoError(t, e.Close()) }()
	p := newWorker(t, e, "P", 0, 1, ssdSpec)
	d := newWorker(t, e, "D", 0, 1, ssdSpec)
	waitClasses(t, e)
	hot := evictHot(t, e, p, 100, true)
	require.EqualValues(t, 4, d.query(t, hot, 0, false).NumHit, "promoted from SSD within the query")
	// It was not in the pool: the hit came from the SSD, byte-exact.
	require.EqualValues(t, 4, tierHits(t, reg, "ssd"))
	st := tierStatsOf(e)
	require.EqualValues(t, 4, st.promoteBlocks)
	dst := []int{40, 41, 42, 43}
	require.Equal(t, allOK(4), d.load(t, dst, hot, "", ""))
	for i := range 4 {
		require.True(t, p.cache.Equal(i, d.cache, dst[i]), "block %d", i)
	}
	// A second query is a DRAM hit.
	require.EqualValues(t, 4, d.query(t, hot, 0, false).NumHit)
	require.EqualValues(t, 4, tierHits(t, reg, "ssd"))
	require.Positive(t, testutil.CollectAndCount(reg, "pegaflow_engine_ssd_used_bytes"))
	fi, err := os.Stat(dir)
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o700), fi.Mode().Perm())
	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	for _, en := range entries {
		info, err := en.Info()
		require.NoError(t, err)
		require.Equal(t, os.FileMode(0o600), info.Mode().Perm(), en.Name())
	}
}

func TestSSDScanDoesNotFlushTheTier(t *testing.T) {
	e, _ := newSSDEngine(t, filepath.Join(t.TempDir(), "ssd"), nil)
	defer func() { require.NoError(t, e.Close()) }()
	p := newWorker(t, e, "P", 0, 1, ssdSpec)
	waitClasses(t, e)
	hot := evictHot(t, e, p, 0, true)
	// A scan: ten pools of one-off blocks, each saved once, never reused.
	var scan [][]byte
	for i := range 30 {
		h := kvtest.Hashes(fmt.Sprintf("scan-%d", i), 4)
		scan = append(scan, h...)
		p.save(t, seq(4+i%12*4, 4), h, "", false)
	}
	waitSpilled(t, e, 4)
	for _, h := range scan {
		require.Nil(t, e.tier.holder(ssd.Key{Namespace: p.nsID, Hash: string(h)}), "one-hit wonders are never spilled")
	}
	require.Zero(t, tierStatsOf(e).skipped["ring_busy"])
	require.EqualValues(t, 4, p.query(t, hot, 0, false).NumHit, "the hot prefix is still on SSD")
}

func TestSSDFailingDeviceNeverFailsSaveOrQuery(t *testing.T) {
	for _, tc := range []struct {
		name string
		err  error
		op   string
	}{
		{"enospc on write", native.ErrNoSpace, "write"},
		{"eio on write", fmt.Errorf("%w: injected", native.ErrCopy), "write"},
		{"eio on read", fmt.Errorf("%w: injected", native.ErrCopy), "read"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e, _ := newSSDEngine(t, filepath.Join(t.TempDir(), "ssd"), nil)
			defer func() { require.NoError(t, e.Close()) }()
			var mu sync.Mutex
			failing := true
			e.tier.setFault(func(op string) error {
				mu.Lock()
				defer mu.Unlock()
				if failing && op == tc.op {
					return tc.err
				}
				return nil
			})
			p := newWorker(t, e, "P", 0, 1, ssdSpec)
			waitClasses(t, e)
			hot := evictHot(t, e, p, 0, false)
			require.Eventually(t, func() bool {
				s, _, jobs, _ := e.tier.counters()
				return jobs == 0 && s.spillBlocks+s.skipped["no_space"]+s.skipped["io_error"] >= 4
			}, 10*time.Second, 5*time.Millisecond)
			st := tierStatsOf(e)
			if tc.op == "write" {
				require.Zero(t, st.spillBlocks)
				require.Positive(t, st.ioErrors["write"])
				require.Zero(t, p.query(t, hot, 0, false).NumHit, "nothing spilled: a miss, not an error")
				return
			}
			// Reads fail: a shorter hit (none), the slots dropped.
			require.Zero(t, p.query(t, hot, 0, false).NumHit)
			require.Positive(t, tierStatsOf(e).ioErrors["read"])
			mu.Lock()
			failing = false
			mu.Unlock()
			require.Zero(t, p.query(t, hot, 0, false).NumHit, "a slot that failed a read is dropped")
		})
	}
}

func TestSSDFlippedByteIsNeverServed(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ssd")
	e, _ := newSSDEngine(t, dir, nil)
	defer func() { require.NoError(t, e.Close()) }()
	p := newWorker(t, e, "P", 0, 1, ssdSpec)
	waitClasses(t, e)
	hot := evictHot(t, e, p, 7, true)
	// Flip one payload byte of every slot in use: whichever holds the
	// hot blocks, their payload no longer matches its checksum.
	flipPayloads(t, dir)
	require.Zero(t, p.query(t, hot, 0, false).NumHit)
	require.Positive(t, tierStatsOf(e).corrupt)
}

func flipPayloads(t *testing.T, dir string) {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(dir, "slots-*.pgf"))
	require.NoError(t, err)
	require.NotEmpty(t, files)
	for _, path := range files {
		var payload uint64
		_, err := fmt.Sscanf(strings.TrimPrefix(filepath.Base(path), "slots-"), "%d.pgf", &payload)
		require.NoError(t, err)
		slot := int64(4096 + payload)
		f, err := os.OpenFile(path, os.O_RDWR, 0)
		require.NoError(t, err)
		fi, err := f.Stat()
		require.NoError(t, err)
		b := make([]byte, 1)
		for off := int64(0); off+slot <= fi.Size() && off < 64*slot; off += slot {
			_, err := f.ReadAt(b, off+4096+10)
			require.NoError(t, err)
			b[0] ^= 0x40
			_, err = f.WriteAt(b, off+4096+10)
			require.NoError(t, err)
		}
		require.NoError(t, f.Close())
	}
}

func TestSSDRestartServesSpilledBlocks(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ssd")
	e, _ := newSSDEngine(t, dir, nil)
	p := newWorker(t, e, "P", 0, 1, ssdSpec)
	waitClasses(t, e)
	hot := evictHot(t, e, p, 31, true)
	require.NoError(t, e.Close())

	e2, reg := newSSDEngine(t, dir, nil)
	defer func() { require.NoError(t, e2.Close()) }()
	// The classes came back from the directory: no registration needed
	// for the store to be open.
	require.NotNil(t, e2.tier.dirs[0].store)
	require.Positive(t, e2.tier.dirs[0].recovered)
	d := newWorker(t, e2, "D", 0, 1, ssdSpec)
	require.EqualValues(t, 4, d.query(t, hot, 0, false).NumHit)
	require.EqualValues(t, 4, tierHits(t, reg, "ssd"))
	dst := []int{50, 51, 52, 53}
	require.Equal(t, allOK(4), d.load(t, dst, hot, "", ""))
	for i := range 4 {
		require.True(t, p.cache.Equal(i, d.cache, dst[i]), "block %d", i)
	}
}

func TestSSDConcurrentPromotesReadOnce(t *testing.T) {
	e, _ := newSSDEngine(t, filepath.Join(t.TempDir(), "ssd"), nil)
	defer func() { require.NoError(t, e.Close()) }()
	p := newWorker(t, e, "P", 0, 1, ssdSpec)
	waitClasses(t, e)
	hot := evictHot(t, e, p, 0, true)
	// Hold the reads until every query is in, then let them go.
	release := make(chan struct{})
	var reads int
	var mu sync.Mutex
	e.tier.setFault(func(op string) error {
		if op == "read" {
			mu.Lock()
			reads++
			mu.Unlock()
			<-release
		}
		return nil
	})
	const n = 8
	hits := make([]uint32, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			resp, err := e.Query(context.Background(), &pb.QueryRequest{SessionId: p.session, NamespaceId: p.nsID, Hashes: hot, WaitMs: 5000})
			if err == nil {
				hits[i] = resp.NumHit
			}
		})
	}
	require.Eventually(t, func() bool {
		mu.Lock()
		defer mu.Unlock()
		return reads > 0
	}, 5*time.Second, time.Millisecond)
	time.Sleep(50 * time.Millisecond) // the other queries join the promotion
	close(release)
	wg.Wait()
	for i := range n {
		require.EqualValues(t, 4, hits[i], "query %d", i)
	}
	require.Equal(t, 1, reads, "one batch read the blocks for every query")
	require.EqualValues(t, 4, tierStatsOf(e).promoteBlocks)
}

// A peer fetching blocks this engine holds on SSD gets them (promoted for
// its open), byte-exact, and a router's Lookup counts them.
func TestSSDBlocksServeLookupAndPeers(t *testing.T) {
	ctl := &directPeers{peers: map[string]*Engine{}}
	a, _ := newSSDEngine(t, filepath.Join(t.TempDir(), "ssd"), func(c *Config) {
		c.Peers, c.PeerAddress, c.PeerAllow = ctl, "a:1", []string{"b:1"}
	})
	defer func() { require.NoError(t, a.Close()) }()
	ctl.mu.Lock()
	ctl.peers["a:1"] = a
	ctl.mu.Unlock()
	b := newPeerEngine(t, ctl, "b:1", 8<<20)
	p := newWorker(t, a, "P", 0, 1, ssdSpec)
	d := newWorker(t, b, "D", 0, 1, ssdSpec)
	waitClasses(t, a)
	hot := evictHot(t, a, p, 70, true)
	a.mu.Lock()
	ns := a.namespaces[p.nsID]
	require.Nil(t, ns.groups[0].blocks[string(hot[0])], "the block left the pool")
	a.mu.Unlock()
	res, err := a.Lookup(LookupQuery{BlockSize: ns.desc.BlockSize, HashAlgo: ns.desc.HashAlgo, SeedFingerprint: ns.fingerprint, Hashes: hot})
	require.NoError(t, err)
	require.Equal(t, 4, res.Blocks, "a lookup counts the SSD's blocks")
	require.EqualValues(t, 4, d.queryFrom(t, "a:1", hot, 5*time.Second).NumHit)
	dst := []int{20, 21, 22, 23}
	require.Equal(t, allOK(4), d.load(t, dst, hot, "", ""))
	for i := range 4 {
		require.True(t, p.cache.Equal(i, d.cache, dst[i]), "block %d", i)
	}
}

// A directory the engine cannot trust (open to others, a symlink) is left
// out with a log line: the engine starts and serves from DRAM.
func TestSSDUnusableDirectoryIsLeftOut(t *testing.T) {
	base := t.TempDir()
	open := filepath.Join(base, "open")
	require.NoError(t, os.Mkdir(open, 0o755))
	require.NoError(t, os.Chmod(open, 0o755))
	target := filepath.Join(base, "target")
	require.NoError(t, os.Mkdir(target, 0o700))
	link := filepath.Join(base, "link")
	require.NoError(t, os.Symlink(target, link))
	for _, dir := range []string{open, link} {
		t.Run(filepath.Base(dir), func(t *testing.T) {
			e, reg := newSSDEngine(t, dir, nil)
			defer func() { require.NoError(t, e.Close()) }()
			require.False(t, e.tier.dirs[0].usable)
			p := newWorker(t, e, "P", 0, 1, ssdSpec)
			proveReuse(t, p, seq(0, 4), kvtest.Hashes("hot", 4))
			churn(t, p, "other", 8)
			require.Zero(t, tierStatsOf(e).spillBlocks)
			require.Zero(t, gaugeValue(t, reg, "pegaflow_engine_ssd_capacity_bytes"))
			require.Zero(t, gaugeValue(t, reg, "pegaflow_engine_ssd_dir_usable"))
			entries, err := os.ReadDir(dir)
			require.NoError(t, err)
			require.Empty(t, entries, "nothing written there")
		})
	}
}

func gaugeValue(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	require.NoError(t, err)
	for _, mf := range mfs {
		if mf.GetName() == name {
			return mf.GetMetric()[0].GetGauge().GetValue()
		}
	}
	t.Fatalf("no %s", name)
	return 0
}

// A device too small for --ssd-size (a real tmpfs of 16 MiB under a 64 MiB
// tier): the slot file cannot be preallocated, the directory is left
// out when the first namespace's class is added, and saves and queries
// go on from DRAM. Needs root (mount); skipped otherwise.
func TestSSDFullDeviceAtOpenIsLeftOut(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount a tmpfs")
	}
	mnt := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", mnt).CombinedOutput(); err != nil {
		t.Skipf("mount tmpfs: %v: %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("umount", "-l", mnt).Run() })
	e, _ := newSSDEngine(t, mnt, nil)
	defer func() { require.NoError(t, e.Close()) }()
	p := newWorker(t, e, "P", 0, 1, ssdSpec)
	require.Eventually(t, func() bool {
		e.tier.mu.Lock()
		defer e.tier.mu.Unlock()
		return !e.tier.dirs[0].usable
	}, 10*time.Second, 5*time.Millisecond, "preallocating 64 MiB on a 16 MiB device fails: the directory is left out")
	hot := evictHot(t, e, p, 0, false)
	require.Zero(t, tierStatsOf(e).spillBlocks)
	require.Zero(t, p.query(t, hot, 0, false).NumHit, "evicted and not spilled: a miss, not an error")
}

// A hybrid namespace (full, sliding-window and state groups): the blocks
// a hit needs of every group come back from SSD, each group's bytes
// exact.
func TestSSDHybridPromotesEveryGroupsNeed(t *testing.T) {
	e, _ := newSSDEngine(t, filepath.Join(t.TempDir(), "ssd"), func(c *Config) { c.PoolSize = 24 * ssdAlign })
	defer func() { require.NoError(t, e.Close()) }()
	p := newHybridWorker(t, e, "P")
	d := newHybridWorker(t, e, "D")
	waitClasses(t, e)
	// Block ids: full 0-5, sliding window 6-11, state 12.
	prompt := func(name string) ([][]byte, []gref) {
		h := kvtest.Hashes(name, 6)
		var rs []gref
		for i := range 6 {
			rs = append(rs, gref{0, i, h[i]}, gref{2, 6 + i, h[i]})
		}
		return h, append(rs, gref{5, 12, h[5]})
	}
	use := func(w *worker, h [][]byte, rs []gref) {
		w.saveGroups(t, rs)
		for range 2 {
			require.EqualValues(t, 6, w.query(t, h, 0, false).NumHit)
		}
	}
	for b := range 13 {
		p.cache.Fill(b, uint64(90+b))
	}
	hot, hotRefs := prompt("hot")
	use(p, hot, hotRefs)
	for i := range 6 {
		h, rs := prompt(fmt.Sprintf("other-%d", i))
		use(p, h, rs)
	}
	waitSpilled(t, e, 9)
	require.Nil(t, blockOf(e, p, 0, hot[0]), "the hot prompt left the pool")
	require.EqualValues(t, 6, d.query(t, hot, 0, false).NumHit, "every group's need promoted")
	// What a hit of 6 needs: full 0-5, the window's last two, the state at 5.
	var need []gref
	for _, r := range hotRefs {
		if r.group != 2 || r.id >= 10 {
			need = append(need, r)
		}
	}
	load := make([]gref, len(need))
	for i, r := range need {
		load[i] = gref{r.group, i, r.hash}
	}
	require.Equal(t, allOK(len(load)), d.loadGroups(t, load, ""))
	for i, r := range need {
		require.Equal(t, groupSegments(p.cache, r.group, r.id), groupSegments(d.cache, r.group, i), "group %d block %d", r.group, r.id)
	}
}

func TestAppendSSDOpsCutsAtTheLargestOp(t *testing.T) {
	const most = uint64(native.MaxSSDOpLen)
	for _, tc := range []struct {
		n    uint64
		want []native.SSDOp
	}{
		{0, nil},
		{4096, []native.SSDOp{{FileOffset: 8192, PoolOffset: 4096, Len: 4096}}},
		{most, []native.SSDOp{{FileOffset: 8192, PoolOffset: 4096, Len: most}}},
		{most + 4096, []native.SSDOp{{FileOffset: 8192, PoolOffset: 4096, Len: most}, {FileOffset: 8192 + most, PoolOffset: 4096 + most, Len: 4096}}},
	} {
		require.Equal(t, tc.want, appendSSDOps(nil, 8192, 4096, tc.n), "%d bytes", tc.n)
	}
}

// A backlog of spills (the writer was held up) is written in full: a
// writer batch never outruns its own ring's bound on writes in flight
// (it did: 256 reservations against a window of 64, the rest refused as
// ring_busy).
func TestSSDSpillBacklogIsWrittenWhole(t *testing.T) {
	e, _ := newSSDEngine(t, filepath.Join(t.TempDir(), "ssd"), nil)
	defer func() { require.NoError(t, e.Close()) }()
	p := newWorker(t, e, "P", 0, 1, ssdSpec)
	waitClasses(t, e)
	release := holdFirstWrite(e)
	churn(t, p, "backlog", 60)
	_, _, queued, _ := e.tier.counters()
	require.Greater(t, queued, maxSpillBatch/2, "a backlog formed behind the held writer")
	close(release)
	require.Eventually(t, func() bool {
		_, _, jobs, _ := e.tier.counters()
		return jobs == 0
	}, 10*time.Second, 5*time.Millisecond)
	st := tierStatsOf(e)
	require.Zero(t, st.skipped["ring_busy"])
	require.Positive(t, st.spillBlocks)
}

// A block is written to SSD once it proves reuse (a prefix query hit it),
// with no eviction pressure at all: the hot set is on SSD while DRAM
// serves it, so a restart, even after a kill -9, finds it. A P/D
// transfer's own load is not reuse, and a scan is never written.
func TestSSDHotSetIsWrittenBeforeEviction(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ssd")
	e, _ := newSSDEngine(t, dir, nil)
	p := newWorker(t, e, "P", 0, 1, ssdSpec)
	d := newWorker(t, e, "D", 0, 1, ssdSpec)
	waitClasses(t, e)
	hot := kvtest.Hashes("hot", 4)
	for b := range 4 {
		p.cache.Fill(b, uint64(50+b))
	}
	proveReuse(t, p, seq(0, 4), hot)
	// A P/D transfer: P saves, D queries for it and loads it.
	moved := kvtest.Hashes("transfer", 2)
	p.save(t, seq(4, 2), moved, "t-1", true)
	resp, err := e.Query(context.Background(), &pb.QueryRequest{SessionId: d.session, NamespaceId: d.nsID, Hashes: moved,
		WaitMs: 1000, TransferId: "t-1"})
	require.NoError(t, err)
	require.EqualValues(t, 2, resp.NumHit)
	require.Equal(t, allOK(2), d.load(t, []int{4, 5}, moved, "", "t-1"))
	// A scan: saved once, never hit.
	once := kvtest.Hashes("once", 2)
	p.save(t, seq(6, 2), once, "", false)
	waitSpilled(t, e, 4)
	require.EqualValues(t, 4, tierStatsOf(e).spillBlocks, "only the hot blocks")
	e.mu.Lock()
	for i, h := range hot {
		require.NotNil(t, e.namespaces[p.nsID].groups[0].blocks[string(h)], "hot block %d still in DRAM", i)
	}
	e.mu.Unlock()
	onSSD := func(h []byte) bool { return e.tier.holder(ssd.Key{Namespace: p.nsID, Hash: string(h)}) != nil }
	for i, h := range hot {
		require.True(t, onSSD(h), "hot block %d on SSD", i)
	}
	for _, h := range append(moved, once...) {
		require.False(t, onSSD(h), "a transfer's load or a scan is not reuse")
	}
	// kill -9: the tier's files are left as they are (no checkpoint, no
	// flush); the pool and the engine are simply abandoned.
	abandon(t, e)
	e2, reg := newSSDEngine(t, dir, nil)
	defer func() { require.NoError(t, e2.Close()) }()
	d2 := newWorker(t, e2, "D", 0, 1, ssdSpec)
	require.EqualValues(t, 4, d2.query(t, hot, 0, false).NumHit)
	require.EqualValues(t, 4, tierHits(t, reg, "ssd"))
	require.Equal(t, allOK(4), d2.load(t, []int{30, 31, 32, 33}, hot, "", ""))
	for i := range 4 {
		require.True(t, p.cache.Equal(i, d2.cache, 30+i), "block %d", i)
	}
}

// A clean stop writes what proved reuse and is still queued: the writer
// was held up when Close began.
func TestSSDCleanStopFlushesTheQueue(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ssd")
	e, _ := newSSDEngine(t, dir, nil)
	p := newWorker(t, e, "P", 0, 1, ssdSpec)
	waitClasses(t, e)
	release := holdFirstWrite(e)
	hot := kvtest.Hashes("hot", 4)
	for b := range 4 {
		p.cache.Fill(b, uint64(60+b))
	}
	proveReuse(t, p, seq(0, 4), hot)
	go func() {
		time.Sleep(100 * time.Millisecond)
		close(release)
	}()
	require.NoError(t, e.Close())
	e2, _ := newSSDEngine(t, dir, nil)
	defer func() { require.NoError(t, e2.Close()) }()
	d := newWorker(t, e2, "D", 0, 1, ssdSpec)
	require.EqualValues(t, 4, d.query(t, hot, 0, false).NumHit)
	require.Equal(t, allOK(4), d.load(t, []int{30, 31, 32, 33}, hot, "", ""))
	for i := range 4 {
		require.True(t, p.cache.Equal(i, d.cache, 30+i), "block %d", i)
	}
}

// abandon stops e's SSD tier as a kill -9 would leave it: no checkpoint,
// nothing queued written, the files closed; the engine is closed after
// (its Close then finds the tier gone).
func abandon(t *testing.T, e *Engine) {
	t.Helper()
	tier := e.tier
	tier.cancel()
	tier.wg.Wait()
	for _, d := range tier.dirs {
		d.ioMu.Lock()
		if d.store != nil {
			d.store.Abandon()
		}
		for _, f := range d.files {
			require.NoError(t, f.Close())
		}
		d.store, d.files = nil, nil
		d.ioMu.Unlock()
	}
	require.NoError(t, e.Close())
}

// holdFirstWrite holds the spill writer's first batch until the returned
// channel is closed.
func holdFirstWrite(e *Engine) chan struct{} {
	release := make(chan struct{})
	var once sync.Once
	e.tier.setFault(func(op string) error {
		if op == "write" {
			once.Do(func() { <-release })
		}
		return nil
	})
	return release
}
