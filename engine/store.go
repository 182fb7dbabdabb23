package engine

import (
	"context"
	"fmt"
	"time"

	pb "github.com/pegaflow/pegaflow/engine/api/pegaflowv1"
	"github.com/pegaflow/pegaflow/native"
)

// ghostKey identifies a block across namespaces for the ghost set.
func (b *block) ghostKey() string {
	n := b.ns.idx
	return string([]byte{byte(n), byte(n >> 8), byte(n >> 16), byte(n >> 24)}) + b.hash
}

// share is one TP rank's part of a block: ns.rankBytes in one extent of
// the pool on the NUMA node of the GPU of the rank that saved it (the
// default pool for ranks without one). ext.size == 0 until that rank's
// save allocates it.
type share struct {
	b    *block
	pool int // index into e.pools
	ext  extent
	// Eviction state (evict.go): the queue of e.policy.pools[pool] that
	// holds the share, its links there, and its CLOCK bits.
	queue                queueID
	prev, next           *share
	referenced, promoted bool
}

// block is one KV block of a namespace: one share per TP rank (MLA's
// namespaces have TP size 1, so one share), each allocated by the rank
// that saves it, so P's ranks on different NUMA nodes each copy into
// their own node's pool. A sealed block has every share allocated.
type block struct {
	hash    string
	ns      *namespace
	freed   bool
	shares  []share // len ns.desc.TpSize, indexed by rank
	created time.Time
	saved   uint64 // ranks whose copy completed
	saving  uint64 // ranks copying now
	sealed  bool
	loading int32 // loads copying out now
	// pins counts reasons the block must stay: saves and loads in flight,
	// leases, transfers. Evictable iff sealed && pins == 0.
	pins int32
	// transfers still waiting for this block to seal.
	transfers []*transfer
	// queued: the shares are in the eviction queues (evict.go).
	queued bool
}

func newBlock(ns *namespace, hash string, now time.Time) *block {
	b := &block{hash: hash, ns: ns, created: now, shares: make([]share, ns.desc.TpSize)}
	for i := range b.shares {
		b.shares[i].b = b
	}
	return b
}

func (e *Engine) pinLocked(b *block) {
	if b.pins == 0 {
		e.policy.withdraw(b)
	}
	b.pins++
}

func (e *Engine) unpinLocked(b *block) {
	b.pins--
	if b.pins == 0 && b.sealed {
		if !b.freed {
			e.policy.admit(b)
		}
	}
}

// allocateLocked finds space for a share in pool p, evicting unpinned
// sealed blocks with a share there, in that pool's policy order, as
// needed. It fails when nothing evictable is left in p.
func (e *Engine) allocateLocked(p int, size uint64) (extent, bool) {
	for {
		if ext, ok := e.pools[p].alloc.alloc(size); ok {
			return ext, true
		}
		victim := e.policy.victim(p)
		if victim == nil {
			return extent{}, false
		}
		e.freeLocked(victim)
		e.stats.evictions++
	}
}

// releaseShareLocked returns a share's extent to its pool.
func (e *Engine) releaseShareLocked(s *share) {
	if s.ext.size == 0 {
		return
	}
	e.pools[s.pool].alloc.release(s.ext)
	s.ext = extent{}
}

// freeLocked drops a block from the index and returns its shares' extents.
func (e *Engine) freeLocked(b *block) {
	e.policy.withdraw(b)
	delete(b.ns.blocks, b.hash)
	b.freed = true
	e.numBlocks--
	delete(e.partial, b)
	for i := range b.shares {
		e.releaseShareLocked(&b.shares[i])
	}
}

// failBlockLocked frees a block no rank will complete and fails the
// transfers waiting on it.
func (e *Engine) failBlockLocked(b *block, why string) {
	for _, t := range b.transfers {
		if _, ok := t.blocks[b]; ok {
			delete(t.blocks, b)
			t.pending--
			b.pins--
		}
		t.settle(e, transferFailed, why)
	}
	b.transfers = nil
	e.freeLocked(b)
	e.broadcastLocked()
}

func (e *Engine) sealLocked(b *block) {
	b.sealed = true
	delete(e.partial, b)
	waiting := b.transfers
	b.transfers = nil
	for _, t := range waiting {
		t.pending--
		t.check(e)
	}
}

// lockForCopy takes e.mu, finds the caller's instance and validates its
// block refs. On success it returns with e.mu held; on error, released.
func (e *Engine) lockForCopy(sessionID, instanceID string, rank uint32, blocks []*pb.BlockRef) (*instance, error) {
	e.mu.Lock()
	inst, err := e.instanceLocked(sessionID, instanceID, rank)
	if err == nil {
		err = validateBlocks(blocks, inst.layout.numBlocks)
	}
	if err != nil {
		e.mu.Unlock()
		return nil, err
	}
	return inst, nil
}

// planKey names one native batch: a batch copies between one region and
// one pool.
type planKey struct {
	region, pool int
}

type copyPlan struct {
	region *native.Region
	pool   *native.Pool
	ops    []native.CopyOp
	blocks []int // indexes into the call's block list, for failure reports
}

// planCopies appends the ops moving rank's share of block b (cache block
// id) to per-(region, pool) plans. A Save's shares are all in the rank's
// own pool, so it makes one batch per region; a Load's may come from
// several pools (blocks saved by instances on other nodes).
func (e *Engine) planCopies(plans map[planKey]*copyPlan, inst *instance, b *block, id uint32, idx int) {
	s := &b.shares[inst.key.rank]
	base := s.ext.off
	for l, layer := range inst.layout.layers {
		key := planKey{layer.region, s.pool}
		p := plans[key]
		if p == nil {
			p = &copyPlan{region: inst.regions[layer.region], pool: e.pools[s.pool].mem}
			plans[key] = p
		}
		for s, seg := range layer.segments {
			p.ops = append(p.ops, native.CopyOp{
				RegionOffset: seg.offset + uint64(id)*seg.stride,
				PoolOffset:   base + b.ns.segOffset[l][s],
				Len:          seg.length,
			})
		}
		if n := len(p.blocks); n == 0 || p.blocks[n-1] != idx {
			p.blocks = append(p.blocks, idx)
		}
	}
}

// runCopies executes the plans concurrently and returns, per block index,
// whether all of its copies succeeded. It waits for every copy even when
// ctx ends: the memory is in use until then. With after set, the copies
// wait on the GPU for the producer's event first.
func (e *Engine) runCopies(plans map[planKey]*copyPlan, dir native.Direction, n int, after *native.Event) []bool {
	ok := make([]bool, n)
	for i := range ok {
		ok[i] = true
	}
	type started struct {
		plan    *copyPlan
		pending *native.Pending
	}
	var all []started
	for _, p := range plans {
		pending, err := e.copier.SubmitAfter(p.region, p.pool, dir, p.ops, after)
		if err != nil {
			e.log.Warn("copy submit failed", "err", err)
			for _, i := range p.blocks {
				ok[i] = false
			}
			continue
		}
		all = append(all, started{p, pending})
	}
	for _, s := range all {
		<-s.pending.Done()
		if err := s.pending.Err(); err != nil {
			e.log.Warn("copy failed", "err", err)
			for _, i := range s.plan.blocks {
				ok[i] = false
			}
		}
	}
	return ok
}

// Save copies blocks from the caller's registered memory into the pool and
// returns when the copies are done. Blocks already sealed, or already saved
// by this rank, are skipped. With a transfer id the blocks are tagged and
// pinned for the decode side.
func (e *Engine) Save(ctx context.Context, req *pb.SaveRequest) (*pb.SaveResponse, error) {
	start := time.Now()
	if req.TransferId != "" {
		if err := validateTransfer(req.TransferId, req.ReadyUrl, req.ReadyToken); err != nil {
			return nil, err
		}
	}
	inst, err := e.lockForCopy(req.SessionId, req.InstanceId, req.Rank, req.Blocks)
	if err != nil {
		return nil, err
	}
	// Copying without the wait the worker asked for would read KV bytes
	// its kernels may still be writing: refuse instead.
	var after *native.Event
	if req.WaitEvent {
		if after = inst.event; after == nil {
			e.mu.Unlock()
			return nil, fmt.Errorf("%w: wait_event set but instance %q rank %d has no CUDA event open "+
				"(RegisterResponse.cuda_event was false)", ErrPrecondition, req.InstanceId, req.Rank)
		}
	}
	ns := inst.ns
	bit := uint64(1) << inst.key.rank
	var t *transfer
	if req.TransferId != "" {
		t = e.transferLocked(req.TransferId)
		t.bind(ns, req.ReadyUrl, req.ReadyToken)
	}
	resp := &pb.SaveResponse{}
	plans := map[planKey]*copyPlan{}
	saving := make([]*block, 0, len(req.Blocks))
	now := time.Now()
	for _, ref := range req.Blocks {
		b := ns.blocks[string(ref.Hash)]
		if b != nil && (b.sealed || (b.saved|b.saving)&bit != 0) {
			resp.Skipped++
			if t != nil {
				t.add(e, b)
			}
			continue
		}
		// This rank's share goes to its own node's pool. Evicting for it
		// cannot take b: b is not sealed, so not evictable.
		ext, ok := e.allocateLocked(inst.pool, ns.rankBytes)
		if !ok {
			resp.Failed++
			e.stats.saveFailures++
			if t != nil {
				t.settle(e, transferFailed, fmt.Sprintf("pool on NUMA node %d exhausted: every resident block with a share there is pinned",
					e.pools[inst.pool].node))
			}
			// Without this share the block never seals: drop what the
			// other ranks stored unless one of them is copying now (then
			// the partial reaper frees it).
			if b != nil && b.saving == 0 {
				e.failBlockLocked(b, "a rank's share did not fit its pool")
			}
			continue
		}
		if b == nil {
			b = newBlock(ns, string(ref.Hash), now)
			ns.blocks[b.hash] = b
			e.numBlocks++
			e.partial[b] = struct{}{}
		}
		b.shares[inst.key.rank].pool = inst.pool
		b.shares[inst.key.rank].ext = ext
		b.saving |= bit
		e.pinLocked(b)
		if t != nil {
			t.add(e, b)
		}
		e.planCopies(plans, inst, b, ref.BlockId, len(saving))
		saving = append(saving, b)
	}
	e.mu.Unlock()

	ok := e.runCopies(plans, native.RegionToPool, len(saving), after)

	e.mu.Lock()
	defer e.mu.Unlock()
	var bytes uint64
	for i, b := range saving {
		b.saving &^= bit
		if ok[i] {
			b.saved |= bit
			resp.Saved++
			bytes += ns.rankBytes
			if b.saved == ns.allRanks && !b.sealed {
				e.sealLocked(b)
			}
			e.unpinLocked(b)
			continue
		}
		resp.Failed++
		e.stats.saveFailures++
		// The rank may save the block again; it will allocate anew.
		e.releaseShareLocked(&b.shares[inst.key.rank])
		e.unpinLocked(b)
		if b.saved == 0 && b.saving == 0 {
			e.failBlockLocked(b, "copy failed")
		} else if t != nil {
			t.settle(e, transferFailed, "copy failed")
		}
	}
	if t != nil && req.TransferLast {
		t.lastRanks |= bit
		t.check(e)
	}
	e.stats.saves += uint64(resp.Saved)
	e.stats.bytesSaved += bytes
	e.broadcastLocked()
	e.m.observeSave(time.Since(start), bytes)
	return resp, nil
}

// Load copies sealed blocks into the caller's registered memory. Each
// block's outcome is reported; missing and failed blocks are for the caller
// to recompute.
func (e *Engine) Load(ctx context.Context, req *pb.LoadRequest) (*pb.LoadResponse, error) {
	start := time.Now()
	inst, err := e.lockForCopy(req.SessionId, req.InstanceId, req.Rank, req.Blocks)
	if err != nil {
		return nil, err
	}
	ns := inst.ns
	status := make([]pb.BlockStatus, len(req.Blocks))
	plans := map[planKey]*copyPlan{}
	var loading []*block
	var loadingIdx []int
	for i, ref := range req.Blocks {
		b := ns.blocks[string(ref.Hash)]
		if b == nil || !b.sealed {
			status[i] = pb.BlockStatus_BLOCK_STATUS_MISSING
			continue
		}
		e.pinLocked(b)
		b.loading++
		e.policy.touch(b)
		e.planCopies(plans, inst, b, ref.BlockId, len(loading))
		loading = append(loading, b)
		loadingIdx = append(loadingIdx, i)
	}
	e.mu.Unlock()

	ok := e.runCopies(plans, native.PoolToRegion, len(loading), nil)

	e.mu.Lock()
	defer e.mu.Unlock()
	var bytes uint64
	for j, b := range loading {
		b.loading--
		e.unpinLocked(b)
		if ok[j] {
			status[loadingIdx[j]] = pb.BlockStatus_BLOCK_STATUS_OK
			bytes += ns.rankBytes
		} else {
			status[loadingIdx[j]] = pb.BlockStatus_BLOCK_STATUS_FAILED
		}
	}
	bit := uint64(1) << inst.key.rank
	if l, found := e.leases[req.LeaseId]; found && req.LeaseId != "" {
		l.loaded |= bit
		if l.loaded&l.ranks == l.ranks {
			e.releaseLeaseLocked(req.LeaseId, l)
		}
	}
	if t, found := e.transfers[req.TransferId]; found && req.TransferId != "" {
		t.loaded |= bit
		if t.loaded&ns.allRanks == ns.allRanks {
			t.release(e)
		}
	}
	e.stats.loads += uint64(len(loading))
	e.stats.bytesLoaded += bytes
	e.m.observeLoad(time.Since(start), bytes)
	return &pb.LoadResponse{Status: status}, nil
}

// lease pins the blocks a Query hit until every rank loaded them.
type lease struct {
	session *session
	blocks  []*block
	ranks   uint64
	loaded  uint64
	expires time.Time
}

func (e *Engine) releaseLeaseLocked(id string, l *lease) {
	for _, b := range l.blocks {
		e.unpinLocked(b)
	}
	l.blocks = nil
	delete(e.leases, id)
	delete(l.session.leases, id)
}

// Query returns the longest sealed prefix of req.Hashes. With WaitMs it
// waits (bounded by MaxQueryWait and ctx) for hashes whose save is in
// flight and, with TransferId, for that transfer to settle.
func (e *Engine) Query(ctx context.Context, req *pb.QueryRequest) (*pb.QueryResponse, error) {
	hashes, err := queryHashes(req)
	if err != nil {
		return nil, err
	}
	if req.TransferId != "" {
		if err := validateTransfer(req.TransferId, "", ""); err != nil {
			return nil, err
		}
	}
	wait := min(time.Duration(req.WaitMs)*time.Millisecond, e.cfg.MaxQueryWait)
	ctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()

	e.mu.Lock()
	defer e.mu.Unlock()
	if err := e.checkOpen(); err != nil {
		return nil, err
	}
	s, err := e.sessionLocked(req.SessionId)
	if err != nil {
		return nil, err
	}
	ns, ok := e.namespaces[req.NamespaceId]
	if !ok {
		return nil, fmt.Errorf("%w: namespace %q", ErrNotFound, req.NamespaceId)
	}
	if req.TransferId != "" && wait > 0 {
		t := e.transferLocked(req.TransferId)
		done := t.done
		e.mu.Unlock()
		select {
		case <-done:
		case <-ctx.Done():
		}
		e.mu.Lock()
		if err := e.checkOpen(); err != nil {
			return nil, err
		}
	}
	var hit, inflight int
	for {
		hit, inflight = e.prefixLocked(ns, hashes)
		if inflight == 0 || wait == 0 {
			break
		}
		changed := e.changed
		e.mu.Unlock()
		select {
		case <-changed:
		case <-ctx.Done():
		}
		e.mu.Lock()
		if err := e.checkOpen(); err != nil {
			return nil, err
		}
		if ctx.Err() != nil {
			hit, inflight = e.prefixLocked(ns, hashes)
			break
		}
	}
	e.stats.hits += uint64(hit)
	e.stats.misses += uint64(len(hashes) - hit)
	resp := &pb.QueryResponse{NumHit: uint32(hit), NumInflight: uint32(inflight)}
	if req.Lease && hit > 0 {
		ttl := e.cfg.LeaseTTL
		if req.LeaseTtlMs > 0 {
			ttl = min(time.Duration(req.LeaseTtlMs)*time.Millisecond, 10*e.cfg.LeaseTTL)
		}
		l := &lease{session: s, ranks: ns.allRanks, expires: time.Now().Add(ttl), blocks: make([]*block, 0, hit)}
		for _, h := range hashes[:hit] {
			b := ns.blocks[string(h)]
			e.pinLocked(b)
			l.blocks = append(l.blocks, b)
		}
		id := newID("l-")
		e.leases[id] = l
		s.leases[id] = l
		resp.LeaseId = id
	}
	return resp, nil
}

// prefixLocked counts the sealed prefix and, after it, the run of blocks
// still being saved.
func (e *Engine) prefixLocked(ns *namespace, hashes [][]byte) (hit, inflight int) {
	for hit < len(hashes) {
		b := ns.blocks[string(hashes[hit])]
		if b == nil || !b.sealed {
			break
		}
		e.policy.touch(b)
		hit++
	}
	for i := hit; i < len(hashes); i++ {
		b := ns.blocks[string(hashes[i])]
		if b == nil || b.sealed || b.saving == 0 && b.saved == 0 {
			break
		}
		inflight++
	}
	return hit, inflight
}

// Release drops a lease and/or a transfer's pins.
func (e *Engine) Release(req *pb.ReleaseRequest) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if err := e.checkOpen(); err != nil {
		return err
	}
	if _, err := e.sessionLocked(req.SessionId); err != nil {
		return err
	}
	if req.LeaseId == "" && req.TransferId == "" {
		return invalid("release needs lease_id or transfer_id")
	}
	if req.LeaseId != "" {
		l, ok := e.leases[req.LeaseId]
		if !ok {
			return fmt.Errorf("%w: lease %q", ErrNotFound, req.LeaseId)
		}
		e.releaseLeaseLocked(req.LeaseId, l)
	}
	if req.TransferId != "" {
		if t, ok := e.transfers[req.TransferId]; ok {
			t.release(e)
		}
	}
	return nil
}

// queryHashes returns the query's hashes from either encoding, validated.
// Packed hashes are sliced in place, without copying.
func queryHashes(req *pb.QueryRequest) ([][]byte, error) {
	if len(req.PackedHashes) == 0 {
		if len(req.Hashes) > MaxQueryHashes {
			return nil, invalid("%d hashes in one query, max %d", len(req.Hashes), MaxQueryHashes)
		}
		for i, h := range req.Hashes {
			if err := validateHash(i, h); err != nil {
				return nil, err
			}
		}
		return req.Hashes, nil
	}
	if len(req.Hashes) > 0 {
		return nil, invalid("set hashes or packed_hashes, not both")
	}
	n := int(req.HashLen)
	if n < MinHashLen || n > MaxHashLen {
		return nil, invalid("hash_len %d, want %d..%d", n, MinHashLen, MaxHashLen)
	}
	if len(req.PackedHashes)%n != 0 {
		return nil, invalid("packed_hashes has %d bytes, not a multiple of hash_len %d", len(req.PackedHashes), n)
	}
	count := len(req.PackedHashes) / n
	if count > MaxQueryHashes {
		return nil, invalid("%d hashes in one query, max %d", count, MaxQueryHashes)
	}
	out := make([][]byte, count)
	for i := range out {
		out[i] = req.PackedHashes[i*n : (i+1)*n : (i+1)*n]
	}
	return out, nil
}
