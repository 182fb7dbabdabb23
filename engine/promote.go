package engine

import (
	"context"
	"fmt"
	"time"

	"github.com/pegaflow/pegaflow/engine/ssd"
	"github.com/pegaflow/pegaflow/native"
)

// The promote path (SSD -> DRAM). A Query whose prefix continues on SSD
// enters those blocks in the index as being saved (so every other reader
// waits for them as for a save in flight, and concurrent queries for one
// block read it once), allocates their shares in the pools, and reads
// every slot straight into its extents, in parallel. It waits for the
// reads within its budget (its wait, at least SSDConfig.PromoteWait);
// what is not back by then is a shorter hit, and the reads still seal
// their blocks when they complete. Every payload is checked against the
// checksum written with it before its block is sealed; a failed or
// corrupt read frees the block and drops the slot, never serves it.

// Bounds of one query's promotion: blocks, and bytes as a share of the
// pools (a long prompt must not flush the DRAM tier for its tail).
const (
	maxPromoteBlocks    = 8192
	promotePoolFraction = 2
)

// Where a block's bytes came from, for tier attribution: its first hit
// counts it as an SSD or peer hit, later ones as DRAM.
const (
	originDRAM uint8 = iota
	originSSD
	originPeer
)

// promotion is one query's set of SSD reads; done closes when every
// block of it is sealed or failed.
type promotion struct {
	done   chan struct{}
	ns     *namespace
	blocks []*promoted
	dirs   map[*ssdDir]struct{} // read-held until the reads end
	start  time.Time
}

type promoted struct {
	b   *block
	dir *ssdDir
	rd  *ssd.Read
}

// promoteLocked starts the promotion of the blocks a hit over hashes
// needs that are on SSD and not in the pool, and returns what to wait
// for: its own promotion and those of other queries it relies on.
func (e *Engine) promoteLocked(ns *namespace, hashes [][]byte, first uint32) []*promotion {
	t := e.tier
	// k: how far every full group reaches with the pool and the SSD.
	k := len(hashes)
	for _, g := range ns.groups {
		if g.kind != kindFull {
			continue
		}
		n := 0
		for n < k && (g.blocks[string(hashes[n])] != nil || t.holder(ssd.Key{Namespace: ns.id, Group: g.index, Hash: string(hashes[n])}) != nil) {
			n++
		}
		k = n
	}
	var waits []*promotion
	seen := map[*promotion]bool{}
	p := &promotion{done: make(chan struct{}), ns: ns, dirs: map[*ssdDir]struct{}{}, start: time.Now()}
	var budget uint64
	for _, pl := range e.pools {
		budget += pl.mem.Size() / promotePoolFraction
	}
	for _, g := range ns.groups {
		if g.rankBytes == 0 {
			continue
		}
		share := slotShare(g)
		for i := g.neededFrom(k, uint64(first)); i < k; i++ {
			h := string(hashes[i])
			if b := g.blocks[h]; b != nil {
				if b.promo != nil && !seen[b.promo] {
					seen[b.promo] = true
					waits = append(waits, b.promo)
				}
				continue
			}
			size := share * uint64(ns.desc.TPSize)
			if len(p.blocks) >= maxPromoteBlocks || size > budget {
				break
			}
			if !e.startPromoteLocked(p, g, h, share) {
				break
			}
			budget -= size
		}
	}
	if len(p.blocks) == 0 {
		for d := range p.dirs {
			d.ioMu.RUnlock()
		}
		return waits
	}
	t.mu.Lock()
	t.promoting += len(p.blocks)
	t.mu.Unlock()
	e.copies.Add(1)
	go e.runPromotion(p)
	return append(waits, p)
}

// startPromoteLocked pins hash's slot and enters its block, shares
// allocated, as being saved. False when it cannot (not on SSD, a
// directory being reopened, the pool full): the promotion stops there.
func (e *Engine) startPromoteLocked(p *promotion, g *nsGroup, h string, share uint64) bool {
	t, ns := e.tier, p.ns
	key := ssd.Key{Namespace: ns.id, Group: g.index, Hash: h}
	d := t.holder(key)
	if d == nil {
		return false
	}
	if _, held := p.dirs[d]; !held {
		if !d.ioMu.TryRLock() {
			return false // being reopened: no query waits for that
		}
		p.dirs[d] = struct{}{}
	}
	if d.store == nil {
		return false
	}
	rd, err := d.store.Acquire(key)
	if err != nil {
		return false
	}
	tp := int(ns.desc.TPSize)
	if len(rd.Header.Shares) != tp {
		_ = d.store.Finish(rd, 0, fmt.Errorf("%w: %d shares, TP size %d", ssd.ErrCorrupt, len(rd.Header.Shares), tp))
		return false
	}
	for _, n := range rd.Header.Shares {
		if n != share {
			_ = d.store.Finish(rd, 0, fmt.Errorf("%w: share of %d bytes, want %d", ssd.ErrCorrupt, n, share))
			return false
		}
	}
	b := newBlock(ns, g, h, time.Now())
	for r := range b.shares {
		pool := e.rankPoolLocked(ns, uint32(r))
		ext, ok := e.allocateLocked(pool, g.rankBytes)
		if !ok {
			for q := range r {
				e.releaseShareLocked(&b.shares[q])
			}
			_ = d.store.Finish(rd, rd.Header.PayloadCRC, nil)
			return false
		}
		b.shares[r].pool, b.shares[r].ext = pool, ext
	}
	e.addBlockLocked(b)
	b.saving = ns.allRanks
	b.promo = p
	e.pinLocked(b)
	p.blocks = append(p.blocks, &promoted{b: b, dir: d, rd: rd})
	return true
}

// runPromotion reads a promotion's slots into their extents (one native
// batch per (directory, class file, pool)), checks every payload, and
// seals or fails each block.
func (e *Engine) runPromotion(p *promotion) {
	t := e.tier
	type key struct {
		d    *ssdDir
		cls  int
		pool int
	}
	batches := map[key][]native.SSDOp{}
	for _, pb := range p.blocks {
		off := uint64(pb.rd.PayloadOffset)
		share := slotShare(pb.b.g)
		for r := range pb.b.shares {
			s := &pb.b.shares[r]
			k := key{pb.dir, pb.rd.Class, s.pool}
			batches[k] = appendSSDOps(batches[k], off+uint64(r)*share, s.ext.off, share)
		}
	}
	ios := map[key]*ssdIO{}
	for k, ops := range batches {
		ios[k] = t.submit(t.engines[k.pool], k.d.files[k.cls], false, ops)
	}
	failed := map[key]error{}
	for k, io := range ios {
		if err := io.wait(); err != nil {
			failed[k] = err
		}
	}
	ok := make([]bool, len(p.blocks))
	var bytes uint64
	for i, pb := range p.blocks {
		share := slotShare(pb.b.g)
		var ioErr error
		var crc uint32
		for r := range pb.b.shares {
			s := &pb.b.shares[r]
			if err := failed[key{pb.dir, pb.rd.Class, s.pool}]; err != nil {
				ioErr = err
				break
			}
			crc = ssd.ChecksumUpdate(crc, e.pools[s.pool].mem.Bytes()[s.ext.off:s.ext.off+share])
		}
		err := pb.dir.store.Finish(pb.rd, crc, ioErr)
		ok[i] = err == nil
		if err != nil {
			t.mu.Lock()
			if ioErr != nil {
				t.ioFailedLocked(pb.dir, "read")
			} else {
				t.stats.corrupt++
			}
			t.mu.Unlock()
			e.log.Warn("ssd: block not promoted", "namespace", p.ns.id, "err", err)
			continue
		}
		bytes += pb.rd.Header.PayloadLen
	}
	for d := range p.dirs {
		d.ioMu.RUnlock()
	}
	late := time.Since(p.start) > t.cfg.PromoteWait
	e.mu.Lock()
	var sealed int
	for i, pb := range p.blocks {
		b := pb.b
		b.promo, b.saving = nil, 0
		if !ok[i] {
			e.unpinLocked(b)
			e.failBlockLocked(b, "SSD read failed or corrupt")
			continue
		}
		sealed++
		b.saved = p.ns.allRanks
		b.origin, b.staged = originSSD, true
		for r := range b.shares {
			// It was in the main queue when it left: it proved reuse.
			b.shares[r].promoted = true
		}
		e.sealLocked(b)
		e.unpinLocked(b)
	}
	e.broadcastLocked()
	e.mu.Unlock()
	e.copies.Done()
	t.mu.Lock()
	t.promoting -= len(p.blocks)
	t.stats.promoteBlocks += uint64(sealed)
	t.stats.promoteBytes += bytes
	if late {
		t.stats.promoteLate++
	}
	t.mu.Unlock()
	t.promoteSeconds.Observe(time.Since(p.start).Seconds())
	close(p.done)
}

// awaitPromotions waits for ps until deadline or ctx (without e.mu).
func awaitPromotions(ctx context.Context, ps []*promotion, deadline time.Time) {
	timer := time.NewTimer(time.Until(deadline))
	defer timer.Stop()
	for _, p := range ps {
		select {
		case <-p.done:
		case <-timer.C:
			return
		case <-ctx.Done():
			return
		}
	}
}

// ssdRunLocked counts the leading hashes of g that the SSD tier holds
// and the pool does not (0 without a tier): how far a Query's promotion
// would extend a prefix.
func (e *Engine) ssdRunLocked(ns *namespace, g *nsGroup, hashes [][]byte) int {
	if e.tier == nil {
		return 0
	}
	n := 0
	for n < len(hashes) && g.blocks[string(hashes[n])] == nil &&
		e.tier.holder(ssd.Key{Namespace: ns.id, Group: g.index, Hash: string(hashes[n])}) != nil {
		n++
	}
	return n
}
