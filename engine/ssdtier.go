package engine

import (
	"context"
	"errors"
	"fmt"
	"hash/maphash"
	"log/slog"
	"maps"
	"path/filepath"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/pegaflow/pegaflow/engine/ssd"
	"github.com/pegaflow/pegaflow/native"
)

// The SSD tier (docs/ssd.md): blocks that prove reuse are written to slot
// files (spill.go) and promoted back into the pool when a Query reaches
// them (promote.go). This file owns the tier: opening it (directories in
// ssddir.go, I/O in ssdio.go), lookups, the checkpoint timer, Close and
// the accounting.

// Bounds of the SSD tier.
const (
	// MaxSSDDirs bounds --ssd-dir.
	MaxSSDDirs = 16
	// MinSSDSize is the smallest --ssd-size.
	MinSSDSize = 64 << 20
	// maxSSDClasses bounds the distinct block sizes a directory keeps:
	// each new one takes an equal share of the directory's space, so
	// registrations of ever new shapes cannot shrink the others to nothing.
	maxSSDClasses = 8
	// ssdFailAfter consecutive write errors take a directory out of the
	// spill for ssdFailBackoff (promotes still try it).
	ssdFailAfter   = 8
	ssdFailBackoff = 30 * time.Second
	// ssdFlushTimeout bounds how long a clean stop waits for the writer
	// to put what proved reuse on SSD.
	ssdFlushTimeout = 10 * time.Second
	// classesFile lists a directory's size classes (payload bytes, one
	// per line): a restart opens the same classes and finds its blocks.
	classesFile = "classes"
)

// ssdTier is the engine's SSD tier.
//
// Concurrency: the tier is driven under e.mu (stage, the promote plan) and
// by its own goroutines (the spill writer, promotions' I/O, the
// checkpoint timer), which never take e.mu while holding a directory's
// ioMu or t.mu. Lock order: e.mu, then a directory's ioMu (read), then
// t.mu or the store's own lock.
type ssdTier struct {
	cfg SSDConfig
	log *slog.Logger
	// dirs are fixed at New; a directory's store comes and goes.
	dirs []*ssdDir
	// engines moves bytes between slot files and the pools, one per pool
	// (e.pools index), so a promote reads straight into its extent.
	engines []*native.SSDEngine
	// staging holds evicted blocks until they are written (spill.go).
	staging  *native.Pool
	stageEng *native.SSDEngine
	seed     maphash.Seed
	// spillSeconds and promoteSeconds time writer batches and
	// promotions; metrics.go registers them.
	spillSeconds, promoteSeconds prometheus.Histogram

	mu         sync.Mutex
	stageAlloc *allocator
	queue      []spillJob
	queued     uint64 // staged bytes queued or being written
	learned    map[uint64]bool
	// pending are the keys staged and not yet written or dropped.
	pending map[ssd.Key]struct{}
	// proven are blocks that proved reuse, waiting for the spill writer
	// to copy them into staging (drain); writing: a batch is in hand.
	proven    []*block
	writing   bool
	promoting int // blocks being read
	stats     tierStats
	kick      chan struct{}
	// fault, when set (this package's tests only, setFault), fails I/O
	// as a device would: "write" and "read" before each batch is
	// submitted.
	fault func(op string) error
	// drain is the engine's drainProven (set once at New, before any
	// block can prove reuse).
	drain func() bool

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// tierStats are the tier's counters (t.mu).
type tierStats struct {
	spillBlocks, spillBytes     uint64
	promoteBlocks, promoteBytes uint64
	promoteLate                 uint64
	skipped                     map[string]uint64
	ioErrors                    map[string]uint64 // by op
	corrupt                     uint64
}

// The reasons a block evicted from the main queue is not spilled.
var spillSkipReasons = []string{"queue_full", "ring_busy", "io_error", "no_space", "device_failed", "no_class"}

// ssdDir is one directory (device).
type ssdDir struct {
	path string
	// ioMu is held shared by I/O on the store and its files, exclusively
	// to replace them (a new size class). Promotes only try it: a query
	// never waits for a reopen.
	ioMu    sync.RWMutex
	store   *ssd.Store
	files   []*native.SSDFile // by class
	classes []uint64          // payload bytes, ascending; the store's classes
	// recovery is how long the last Open took and what it found.
	recovery  time.Duration
	recovered int
	// guarded by t.mu:
	errRun      int
	failedUntil time.Time
	usable      bool
}

// openSSDTier opens the directories (their stores when they have
// classes already: a warm restart) and the native engines.
func openSSDTier(cfg SSDConfig, pools []*pool, poolFlags native.PoolFlags, log *slog.Logger) (*ssdTier, error) {
	t := &ssdTier{cfg: cfg, log: log, seed: maphash.MakeSeed(), kick: make(chan struct{}, 1), learned: map[uint64]bool{}, pending: map[ssd.Key]struct{}{},
		stats: tierStats{skipped: map[string]uint64{}, ioErrors: map[string]uint64{}}}
	t.ctx, t.cancel = context.WithCancel(context.Background())
	t.spillSeconds = prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: "pegaflow_engine", Name: "ssd_spill_seconds",
		Help: "Duration of SSD spill batches (reserve, write, headers).", Buckets: prometheus.ExponentialBuckets(100e-6, 2, 18)})
	t.promoteSeconds = prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: "pegaflow_engine", Name: "ssd_promote_seconds",
		Help: "Duration of SSD promotions (reads, checksums, seal), including those that finished past their query's budget.", Buckets: prometheus.ExponentialBuckets(100e-6, 2, 18)})
	staging, err := native.NewPool(cfg.StagingBytes, -1, -1, poolFlags)
	if err != nil {
		return nil, fmt.Errorf("ssd staging pool: %w", err)
	}
	t.staging = staging
	t.stageAlloc = newAlignedAllocator(staging.Size(), ssdAlign)
	if t.stageEng, err = native.NewSSDEngine(staging, cfg.Backend, cfg.Depth); err != nil {
		t.closeNative()
		return nil, fmt.Errorf("ssd engine: %w", err)
	}
	for _, p := range pools {
		eng, err := native.NewSSDEngine(p.mem, cfg.Backend, cfg.Depth)
		if err != nil {
			t.closeNative()
			return nil, fmt.Errorf("ssd engine for pool %d: %w", p.idx, err)
		}
		t.engines = append(t.engines, eng)
	}
	for _, path := range cfg.Dirs {
		d := &ssdDir{path: filepath.Clean(path)}
		t.dirs = append(t.dirs, d)
		if err := checkSSDDir(d.path); err != nil {
			log.Error("ssd: directory left out", "dir", d.path, "err", err)
			continue
		}
		d.usable = true
		classes, err := readClasses(d.path)
		if err != nil {
			log.Warn("ssd: size classes unreadable; starting the directory cold", "dir", d.path, "err", err)
		}
		if len(classes) > 0 {
			if err := t.openStore(d, classes); err != nil {
				log.Error("ssd: directory left out", "dir", d.path, "err", err)
				d.usable = false
			}
		}
	}
	log.Info("ssd tier", "dirs", len(t.dirs), "bytes_per_dir", cfg.Size, "backend", t.stageEng.Backend(),
		"registered_buffers", t.stageEng.Registered(), "staging_bytes", cfg.StagingBytes)
	t.wg.Add(2)
	go t.spillLoop()
	go t.checkpointLoop()
	return t, nil
}

// dirFor is the directory a key is spilled to: a hash of the key picks
// it, so blocks spread over the devices.
func (t *ssdTier) dirFor(k ssd.Key) *ssdDir {
	if len(t.dirs) == 1 {
		return t.dirs[0]
	}
	var h maphash.Hash
	h.SetSeed(t.seed)
	h.WriteString(k.Namespace)
	h.WriteString(k.Hash)
	return t.dirs[h.Sum64()%uint64(len(t.dirs))]
}

// checkpointLoop checkpoints every directory on a timer.
func (t *ssdTier) checkpointLoop() {
	defer t.wg.Done()
	tick := time.NewTicker(t.cfg.CheckpointEvery)
	defer tick.Stop()
	for {
		select {
		case <-t.ctx.Done():
			return
		case <-tick.C:
			for _, d := range t.dirs {
				d.ioMu.RLock()
				if d.store != nil {
					if err := d.store.Checkpoint(t.ctx); err != nil && t.ctx.Err() == nil {
						t.log.Warn("ssd: checkpoint", "dir", d.path, "err", err)
					}
				}
				d.ioMu.RUnlock()
			}
		}
	}
}

// close stops the spill writer (a batch in flight finishes), checkpoints
// and closes the stores, and stops the native engines. The engine calls
// it once no promotion runs and before the pools are freed.
func (t *ssdTier) close() error {
	t.flush(ssdFlushTimeout)
	t.cancel()
	t.wg.Wait()
	var err error
	for _, d := range t.dirs {
		d.ioMu.Lock()
		err = errors.Join(err, t.closeStore(d))
		d.ioMu.Unlock()
	}
	return errors.Join(err, t.closeNative())
}

func (t *ssdTier) closeNative() error {
	var err error
	for _, e := range t.engines {
		err = errors.Join(err, e.Close())
	}
	if t.stageEng != nil {
		err = errors.Join(err, t.stageEng.Close())
	}
	if t.staging != nil {
		err = errors.Join(err, t.staging.Close())
	}
	return err
}

// ssdKey is a block's name on SSD: the namespace id (derived from the
// model's compatibility fields, so the same after a restart), the group
// and the hash.
func ssdKey(b *block) ssd.Key {
	return ssd.Key{Namespace: b.ns.id, Group: b.g.index, Hash: b.hash}
}

// slotShare is one rank's share of a block as it lies in a slot and in
// its pool extent: the share's bytes rounded up to the O_DIRECT unit.
func slotShare(g *nsGroup) uint64 { return alignTo(g.rankBytes, ssdAlign) }

// holder is the directory holding key, nil when none does.
func (t *ssdTier) holder(k ssd.Key) *ssdDir {
	d := t.dirFor(k)
	if t.contains(d, k) {
		return d
	}
	if len(t.dirs) > 1 {
		// Spilled before the directories changed.
		for _, o := range t.dirs {
			if o != d && t.contains(o, k) {
				return o
			}
		}
	}
	return nil
}

// fits says whether d has a class for a payload of n bytes (false while
// it is being reopened: the block is not staged for nothing).
func (t *ssdTier) fits(d *ssdDir, n uint64) bool {
	if !d.ioMu.TryRLock() {
		return false
	}
	defer d.ioMu.RUnlock()
	return d.store != nil && d.store.Fits(n)
}

func (t *ssdTier) contains(d *ssdDir, k ssd.Key) bool {
	if !d.ioMu.TryRLock() {
		return false
	}
	defer d.ioMu.RUnlock()
	return d.store != nil && d.store.Contains(k)
}

// ssdDirStats is one directory's accounting for /metrics.
type ssdDirStats struct {
	path             string
	used, capacity   uint64
	blocks           int
	recovery         time.Duration
	recovered        int
	evicted, dropped uint64
	usable           bool
}

func (t *ssdTier) dirStats() []ssdDirStats {
	out := make([]ssdDirStats, 0, len(t.dirs))
	for _, d := range t.dirs {
		ds := ssdDirStats{path: d.path}
		d.ioMu.RLock()
		if d.store != nil {
			s := d.store.Stats()
			ds.used, ds.capacity, ds.blocks, ds.evicted = s.UsedBytes, s.CapacityBytes, s.Live, s.Evicted
			ds.dropped = uint64(s.RecoveryDroppedSlot)
		}
		ds.recovery, ds.recovered = d.recovery, d.recovered
		d.ioMu.RUnlock()
		t.mu.Lock()
		ds.usable = d.usable
		t.mu.Unlock()
		out = append(out, ds)
	}
	return out
}

// counters returns a copy of the tier's counters and queue depths.
func (t *ssdTier) counters() (s tierStats, queued uint64, queuedJobs, promoting int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	s = t.stats
	s.skipped = maps.Clone(t.stats.skipped)
	s.ioErrors = maps.Clone(t.stats.ioErrors)
	return s, t.queued, len(t.queue), t.promoting
}

// ioFailed records a failed write of d (t.mu held): a run of them takes
// the directory out of the spill for a while.
func (t *ssdTier) ioFailedLocked(d *ssdDir, op string) {
	t.stats.ioErrors[op]++
	if op != "write" {
		return
	}
	d.errRun++
	if d.errRun >= ssdFailAfter {
		d.failedUntil = time.Now().Add(ssdFailBackoff)
		d.errRun = 0
		t.log.Error("ssd: directory failing; spills stop for a while", "dir", d.path, "for", ssdFailBackoff)
	}
}
