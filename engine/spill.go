package engine

import (
	"errors"
	"time"

	"github.com/pegaflow/pegaflow/engine/ssd"
	"github.com/pegaflow/pegaflow/native"
)

// The spill path (DRAM -> SSD). A block that proves reuse (a share of it
// enters a main queue of the S3-FIFO policy; probation's one-hit wonders
// are never spilled, so a scan cannot flush the SSD) is copied, under
// e.mu, into the staging pool and queued; the spill writer writes the
// queue in batches, O_DIRECT from the staging pool, and frees the staging
// space. Writing at main admission rather than at eviction puts the hot
// set on SSD while it is still served from DRAM, so a restart, even
// after a kill -9, finds it, and an eviction finds its block written
// already. A main-queue victim not on SSD (staging was full, or the SSD
// ring dropped it since) is staged on its way out, and a hot block
// re-admitted to main is rewritten once its SSD copy aged out.
//
// The copy is a memcpy bounded by the block; a save never waits for the
// SSD: with staging full, the block is not spilled (counted queue_full),
// exactly as a full or failing device only costs the spill. A key staged
// or already on SSD is not staged again (t.pending, holder).

// maxSpillBatch bounds the blocks one writer batch takes: within the
// store's bound on writes in flight per class (ssd.DefaultWindow), so a
// batch never finds its own class's ring busy.
const maxSpillBatch = ssd.DefaultWindow / 2

// spillJob is one block waiting in the staging pool.
type spillJob struct {
	key    ssd.Key
	shares []uint64 // per rank, each slotShare bytes
	ext    extent   // in the staging pool
	dir    *ssdDir
	queued time.Time
}

// stageLocked copies a block that entered the main queue, or is evicted
// from it, into staging and queues it; caller holds e.mu, the block is
// sealed and, when evicted, not yet freed.
func (e *Engine) stageLocked(b *block) {
	t := e.tier
	key := ssdKey(b)
	share := slotShare(b.g)
	d := t.dirFor(key)
	for i := range b.shares {
		if b.shares[i].ext.size < share {
			return // a pool not aligned for the SSD: cannot happen with a tier
		}
	}
	if t.holder(key) != nil {
		return // spilled before and still there
	}
	size := share * uint64(len(b.shares))
	t.mu.Lock()
	usable := d.usable
	t.mu.Unlock()
	if !usable {
		return
	}
	if !t.fits(d, size) {
		t.skip("no_class", 1)
		return
	}
	t.mu.Lock()
	_, pending := t.pending[key]
	switch {
	case pending:
		t.mu.Unlock()
		return
	case time.Now().Before(d.failedUntil):
		t.stats.skipped["device_failed"]++
		t.mu.Unlock()
		return
	}
	ext, ok := t.stageAlloc.alloc(size)
	if !ok {
		t.stats.skipped["queue_full"]++
		t.mu.Unlock()
		return
	}
	t.queued += ext.size
	t.pending[key] = struct{}{}
	t.mu.Unlock()

	staging := t.staging.Bytes()
	shares := make([]uint64, len(b.shares))
	for r := range b.shares {
		s := &b.shares[r]
		src := e.pools[s.pool].mem.Bytes()[s.ext.off : s.ext.off+share]
		copy(staging[ext.off+uint64(r)*share:], src)
		shares[r] = share
	}

	t.mu.Lock()
	t.queue = append(t.queue, spillJob{key: key, shares: shares, ext: ext, dir: d, queued: time.Now()})
	t.mu.Unlock()
	select {
	case t.kick <- struct{}{}:
	default:
	}
}

// spillLoop is the spill writer: it takes the queue in batches until the
// tier closes (what is still queued then is dropped: it was never
// acknowledged to anyone).
func (t *ssdTier) spillLoop() {
	defer t.wg.Done()
	for {
		select {
		case <-t.ctx.Done():
			return
		case <-t.kick:
		}
		for {
			t.mu.Lock()
			n := min(len(t.queue), maxSpillBatch)
			jobs := append([]spillJob(nil), t.queue[:n]...)
			t.queue = append(t.queue[:0], t.queue[n:]...)
			t.mu.Unlock()
			if n == 0 || t.ctx.Err() != nil {
				t.release(jobs)
				break
			}
			t.writeBatch(jobs)
		}
	}
}

// release frees jobs' staging space.
func (t *ssdTier) release(jobs []spillJob) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, j := range jobs {
		t.stageAlloc.release(j.ext)
		t.queued -= j.ext.size
		delete(t.pending, j.key)
	}
}

// spillWrite is one job's slot and outcome in a batch.
type spillWrite struct {
	job spillJob
	res *ssd.Reservation
	crc uint32
	err error
}

// writeBatch writes jobs: per directory, a slot reserved for each, one
// native write batch per class file, then the headers (Commit).
func (t *ssdTier) writeBatch(jobs []spillJob) {
	defer t.release(jobs)
	start := time.Now()
	byDir := map[*ssdDir][]*spillWrite{}
	for _, j := range jobs {
		byDir[j.dir] = append(byDir[j.dir], &spillWrite{job: j})
	}
	staging := t.staging.Bytes()
	var bytes, blocks uint64
	for d, ws := range byDir {
		d.ioMu.RLock()
		if d.store == nil {
			t.skip("no_class", len(ws))
			d.ioMu.RUnlock()
			continue
		}
		type batch struct {
			ops []native.SSDOp
			ws  []*spillWrite
		}
		perClass := map[int]*batch{}
		for _, w := range ws {
			r, err := d.store.Reserve(w.job.key, w.job.shares)
			switch {
			case errors.Is(err, ssd.ErrExists):
				continue
			case errors.Is(err, ssd.ErrFull):
				t.skip("ring_busy", 1)
				continue
			case err != nil:
				t.skip("no_class", 1)
				continue
			}
			w.res = r
			w.crc = ssd.Checksum(staging[w.job.ext.off : w.job.ext.off+r.PayloadLen])
			b := perClass[r.Class]
			if b == nil {
				b = &batch{}
				perClass[r.Class] = b
			}
			b.ops = appendSSDOps(b.ops, uint64(r.PayloadOffset), w.job.ext.off, r.PayloadLen)
			b.ws = append(b.ws, w)
		}
		ios := map[*batch]*ssdIO{}
		for ci, b := range perClass {
			ios[b] = t.submit(t.stageEng, d.files[ci], true, b.ops)
		}
		for b, io := range ios {
			err := io.wait()
			for _, w := range b.ws {
				w.err = err
			}
		}
		for _, w := range ws {
			if w.res == nil {
				continue
			}
			err := d.store.Commit(w.res, w.crc, w.err)
			t.mu.Lock()
			switch {
			case err == nil:
				d.errRun = 0
				blocks++
				bytes += w.res.PayloadLen
			case errors.Is(err, native.ErrNoSpace):
				t.stats.skipped["no_space"]++
				t.ioFailedLocked(d, "write")
			default:
				t.stats.skipped["io_error"]++
				t.ioFailedLocked(d, "write")
			}
			t.mu.Unlock()
		}
		d.ioMu.RUnlock()
	}
	t.mu.Lock()
	t.stats.spillBlocks += blocks
	t.stats.spillBytes += bytes
	t.mu.Unlock()
	if blocks > 0 {
		t.spillSeconds.Observe(time.Since(start).Seconds())
	}
}

func (t *ssdTier) skip(reason string, n int) {
	t.mu.Lock()
	t.stats.skipped[reason] += uint64(n)
	t.mu.Unlock()
}

func (t *ssdTier) injected(op string) error {
	t.mu.Lock()
	f := t.fault
	t.mu.Unlock()
	if f == nil {
		return nil
	}
	return f(op)
}

func (t *ssdTier) setFault(f func(op string) error) {
	t.mu.Lock()
	t.fault = f
	t.mu.Unlock()
}
