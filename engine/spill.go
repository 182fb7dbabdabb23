package engine

import (
	"errors"
	"time"

	"github.com/pegaflow/pegaflow/engine/ssd"
	"github.com/pegaflow/pegaflow/native"
)

// The spill path (DRAM -> SSD). A block is written once it proves reuse:
// a prefix query hits it (not the load of its own P/D transfer), or a
// share of it enters a main queue of the S3-FIFO policy. Saved-once
// blocks (probation's one-hit wonders, a scan) are never written, so a
// scan cannot flush the SSD.
//
//   - Proven blocks are queued (provenLocked, a pointer each); the spill
//     writer copies them into the staging pool a few per hold of e.mu
//     (drainProven), off the request path, then writes the staged blocks
//     in batches, O_DIRECT from the staging pool, and frees the space.
//   - Writing on proof rather than at eviction puts the hot set on SSD
//     while DRAM still serves it: a restart, even after a kill -9, finds
//     it, and an eviction finds its block written already. A clean stop
//     lets the writer finish (flush).
//   - A main-queue victim not on SSD (staging was full, the SSD ring
//     dropped it since) is copied on its way out, under e.mu, since its
//     extents are about to be reused (stageLocked from allocateLocked).
//
// A save never waits for the SSD: with the queue or staging full, the
// block is not spilled (counted queue_full), exactly as a full or failing
// device only costs the spill. A key staged or already on SSD is not
// staged again (block.staged, t.pending, holder).

// maxSpillBatch bounds the blocks one writer batch takes: within the
// store's bound on writes in flight per class (ssd.DefaultWindow), so a
// batch never finds its own class's ring busy.
const maxSpillBatch = ssd.DefaultWindow / 2

// maxProven bounds the blocks waiting for the writer to copy them;
// provenPerHold bounds the blocks it copies per hold of the engine lock.
const (
	maxProven     = 1 << 16
	provenPerHold = 32
)

// spillJob is one block waiting in the staging pool.
type spillJob struct {
	key    ssd.Key
	shares []uint64 // per rank, each slotShare bytes
	ext    extent   // in the staging pool
	dir    *ssdDir
}

// provenLocked queues a block that proved reuse for the spill writer,
// which copies it into staging off the request path (drainProven).
// Caller holds e.mu.
func (e *Engine) provenLocked(b *block) {
	if b.staged || !b.sealed || b.freed {
		return
	}
	t := e.tier
	t.mu.Lock()
	full := len(t.proven) >= maxProven
	if full {
		t.stats.skipped["queue_full"]++
	} else {
		t.proven = append(t.proven, b)
	}
	t.mu.Unlock()
	if !full {
		b.staged = true
		t.wake()
	}
}

// provenHitLocked tells the tier of the blocks a prefix query's hit of
// hit blocks relied on, in every group.
func (e *Engine) provenHitLocked(ns *namespace, hashes [][]byte, first uint32, hit int) {
	for _, g := range ns.groups {
		for i := g.neededFrom(hit, uint64(first)); i < hit; i++ {
			if b := g.blocks[string(hashes[i])]; b != nil {
				e.provenLocked(b)
			}
		}
	}
}

// drainProven copies queued proven blocks into staging, at most
// provenPerHold blocks per hold of e.mu so that requests wait little. It
// reports whether blocks remain because staging is full (the writer
// frees it and comes back).
func (e *Engine) drainProven() bool {
	t := e.tier
	for {
		t.mu.Lock()
		batch := append([]*block(nil), t.proven[:min(len(t.proven), provenPerHold)]...)
		t.mu.Unlock()
		if len(batch) == 0 {
			return false
		}
		done := 0
		e.mu.Lock()
		for _, b := range batch {
			// A block freed or evicted meanwhile was staged on its way
			// out, or was not worth it.
			if !b.freed && b.sealed && !e.stageLocked(b) {
				break
			}
			done++
		}
		e.mu.Unlock()
		t.mu.Lock()
		// Only this goroutine takes from the front; appends go to the back.
		t.proven = append(t.proven[:0], t.proven[done:]...)
		t.mu.Unlock()
		if done < len(batch) {
			return true
		}
	}
}

// stageLocked copies a sealed block into staging and queues it for the
// writer, unless the SSD has it or it is queued already, or its directory
// cannot take it; caller holds e.mu, the block not yet freed. It returns
// false only when staging is full (and not empty): the caller may retry
// once the writer freed some.
func (e *Engine) stageLocked(b *block) bool {
	t := e.tier
	key := ssdKey(b)
	share := slotShare(b.g)
	d := t.dirFor(key)
	for i := range b.shares {
		if b.shares[i].ext.size < share {
			return true // a pool not aligned for the SSD: cannot happen with a tier
		}
	}
	if t.holder(key) != nil {
		return true // spilled before and still there
	}
	size := share * uint64(len(b.shares))
	t.mu.Lock()
	usable := d.usable
	t.mu.Unlock()
	if !usable {
		return true
	}
	if !t.fits(d, size) {
		t.skip("no_class", 1)
		return true
	}
	t.mu.Lock()
	_, pending := t.pending[key]
	switch {
	case pending:
		t.mu.Unlock()
		return true
	case time.Now().Before(d.failedUntil):
		t.stats.skipped["device_failed"]++
		t.mu.Unlock()
		return true
	}
	ext, ok := t.stageAlloc.alloc(size)
	if !ok {
		t.stats.skipped["queue_full"]++
		retry := t.queued > 0
		t.mu.Unlock()
		return !retry
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
	t.queue = append(t.queue, spillJob{key: key, shares: shares, ext: ext, dir: d})
	t.mu.Unlock()
	t.wake()
	return true
}

// wake kicks the spill writer.
func (t *ssdTier) wake() {
	select {
	case t.kick <- struct{}{}:
	default:
	}
}

// spillLoop is the spill writer: it copies proven blocks into staging
// (drain) and writes the queue in batches until the tier closes (what is
// still queued then is dropped: it was never acknowledged to anyone).
func (t *ssdTier) spillLoop() {
	defer t.wg.Done()
	for {
		select {
		case <-t.ctx.Done():
			return
		case <-t.kick:
		}
		for t.ctx.Err() == nil {
			if t.drain != nil {
				t.drain()
			}
			t.mu.Lock()
			n := min(len(t.queue), maxSpillBatch)
			jobs := append([]spillJob(nil), t.queue[:n]...)
			t.queue = append(t.queue[:0], t.queue[n:]...)
			t.writing = n > 0
			t.mu.Unlock()
			if n == 0 {
				break
			}
			t.writeBatch(jobs)
			t.mu.Lock()
			t.writing = false
			t.mu.Unlock()
		}
	}
}

// flush lets the writer finish what proved reuse (queued, staged, being
// written), for at most timeout: a clean stop keeps the hot set.
func (t *ssdTier) flush(timeout time.Duration) {
	deadline := time.Now().Add(timeout)
	for {
		t.mu.Lock()
		left := len(t.proven) + len(t.queue)
		idle := left == 0 && !t.writing
		t.mu.Unlock()
		if idle {
			return
		}
		if time.Now().After(deadline) {
			t.log.Warn("ssd: stopping with blocks not written", "blocks", left, "waited", timeout)
			return
		}
		t.wake()
		time.Sleep(5 * time.Millisecond)
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
