// Package engine is PegaEngine: a KV block store in pinned host memory,
// indexed by vLLM block hashes and shared by the vLLM instances of a host.
//
// Invariants:
//   - The index is exact: a block is found iff it is resident.
//   - A block is visible to Query and Load only once every TP rank of its
//     namespace saved it (sealed). Partially saved blocks are never served.
//   - Pinned blocks (in-flight saves/loads, leases, pending transfers) are
//     never evicted; a save that finds nothing evictable fails cleanly.
//   - Every byte range a copy touches was bounds-checked against its region
//     at registration (block ids are checked per call).
//   - A block is one share per TP rank; share r lives in the pool on the
//     NUMA node of the GPU of the rank that saved it (the default pool
//     when there is one pool or the rank has no GPU of known node). A
//     sealed block has every share allocated; loads read share r wherever
//     it lives.
//
// The API layer (engine/server) maps the error kinds in errors.go to status
// codes; all methods are safe for concurrent use.
//
// The files, by concern:
//   - the engine: engine.go (this file) New, Close and the housekeeping
//     tick; config.go Config, its defaults and validation; types.go the
//     engine's own Namespace and a validated registration; errors.go the
//     error kinds;
//   - clients and their memory: session.go sessions and instances
//     (OpenSession, Register, Unregister); namespace.go namespaces
//     (OpenNamespace) and their block shape; hybrid.go KV cache groups
//     (hybrid namespaces: per-group blocks and shares, the hybrid
//     boundary a Query answers); shm.go producers'
//     shared-memory files, opened only as the caller's credentials allow
//     (Peer); cudaorder.go a CUDA IPC region's device and the producer's
//     event; placement.go a registration's host-level checks (local GPU,
//     pool fit, one parallelism per model);
//   - requests: store.go Save and Load; copy.go the plan, copy, commit
//     steps they share; query.go Query (the sealed prefix and its wait);
//     lease.go the leases a Query takes (Release); lookup.go Lookup (a
//     router's question, how much of a prompt is held: no session, lease,
//     wait or S3-FIFO reference); transfer.go transfers
//     and their settling (AwaitTransfer, ReleaseTransfer); transferbound.go
//     the bounds on transfer state (waiters, expiry); callback.go the
//     /kv_ready POST and its allow list (--kv-ready-allow);
//   - state: block.go blocks and their per-rank shares (pin, seal, free);
//     pool.go the pools, one per NUMA node; alloc.go a pool's extent
//     allocator; evict.go the per-pool S3-FIFO eviction;
//   - checks: validate.go request validation; bounds.go the copy-op budget
//     (MaxCopyOps); allowlist.go the host:port and URL rules both allow
//     lists use;
//   - peers: peer.go the side other engines read from (PeerHandshake,
//     OpenPeerTransfer, ReleasePeerTransfer; PeerControl); peerread.go the
//     validated read of an open transfer's shares (OpenPeerRead); fetch.go
//     a Query's fetch of missing blocks from its source engine; peerlink.go
//     the links to peers (and the UCX agent with rdma); peertransport.go
//     tcp or rdma, and the check that rdma runs on RDMA transports only;
//     rdmadev.go the RDMA device behind --peer-addr (UCX_NET_DEVICES);
//     peerallow.go the peers the engine may dial (--peer-allow);
//   - the SSD tier (docs/ssd.md): ssdtier.go the tier (open, lookups,
//     checkpoints, Close, accounting); ssddir.go a directory (checks, size
//     classes, its store's open and reopen); ssdio.go native batches and
//     fault injection; spill.go blocks that proved reuse staged and
//     written; promote.go a Query's (or a peer open's) promotion of
//     SSD blocks into the pool; ssdmetrics.go tier attribution and the
//     tier's metrics; the format and index are engine/ssd;
//   - observing: stats.go Health and Stats; metrics.go the Prometheus
//     metrics; events.go each namespace's feed of block events
//     (BlockEvents: sealed, present, removed; a bounded ring with a
//     cursor), which the connector publishes as vLLM KV events.
package engine

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/pegaflow/pegaflow/engine/topology"
	"github.com/pegaflow/pegaflow/internal/ids"
	"github.com/pegaflow/pegaflow/native"
)

// Engine is the block store. Create with New, stop with Close.
type Engine struct {
	cfg Config
	log *slog.Logger
	// pools are fixed at New, one per entry of placement.Pools; a rank's
	// block shares live in pools[instance.pool].
	pools       []*pool
	defaultPool int
	// placement is where the pools' memory was asked to live.
	placement topology.Placement
	copier    *native.Copier
	http      *http.Client
	m         *metrics
	// readyAllow and peerAllow are Config.KVReadyAllow and
	// Config.PeerAllow parsed (allowlist.go).
	readyAllow, peerAllow *allowlist
	// budget is the engine-wide budget of in-flight copy ops (bounds.go).
	budget *copyBudget
	// epoch is new on every start (peers see a restart by it).
	epoch string
	// peers is the cross-host side, nil without Config.Peers (peerlink.go).
	peers *peerState
	// tier is the SSD tier, nil without Config.SSD.Dirs (ssdtier.go).
	tier *ssdTier

	mu         sync.Mutex
	closed     bool
	policy     *evictionPolicy
	namespaces map[string]*namespace
	sessions   map[string]*session
	instances  map[instanceKey]*instance
	numBlocks  int
	partial    map[*block]struct{} // unsealed blocks, for the partial reaper
	leases     map[string]*lease
	transfers  map[string]*transfer
	// peerOpens are the transfers peers opened here (peer.go).
	peerOpens map[string]*peerOpen
	// fetchesReading are this engine's fetches from peers between their
	// plan and their seal (fetch.go): reads sent or about to be.
	fetchesReading int
	// waits holds the waiters on transfers without a record; expiry is
	// the records' FIFO in expiry order, live from expiryHead
	// (transferbound.go).
	waits      map[string]*transferWait
	expiry     []transferExpiry
	expiryHead int
	// changed is closed and replaced whenever a block seals or a save
	// fails, waking Query calls that wait for in-flight saves.
	changed chan struct{}
	stats   counters

	// stopped ends when Close begins: housekeeping and callback retries
	// stop on it.
	stopped context.Context
	stop    context.CancelFunc
	bg      sync.WaitGroup
	// copies counts Save and Load calls from planning until every batch
	// they submitted has finished (for a call past its deadline, after it
	// returned). Add runs under mu while the engine is open.
	copies sync.WaitGroup
	// freed is closed once the copier and pools are gone (Close, or later
	// when Close gave up waiting for copies).
	freed    chan struct{}
	closeErr error
}

// New allocates the pools and starts the engine's housekeeping.
func New(cfg Config, log *slog.Logger, reg prometheus.Registerer) (*Engine, error) {
	cfg.setDefaults()
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	readyAllow, peerAllow, err := cfg.validate()
	if err != nil {
		return nil, err
	}
	placement := cfg.Topology.PoolPlacement(cfg.NUMANode, cfg.PoolSize)
	align := uint64(allocAlign)
	if len(cfg.SSD.Dirs) > 0 {
		align = ssdAlign // promotes read slots straight into extents, O_DIRECT
	}
	pools, def, err := openPools(placement, cfg.Device, cfg.PoolFlags, align)
	if err != nil {
		return nil, err
	}
	logPlacement(log, cfg.Topology, placement)
	copier, err := native.NewCopier(cfg.CopyThreads)
	if err != nil {
		_ = closePools(pools)
		return nil, fmt.Errorf("start copier: %w", err)
	}
	capacities := make([]uint64, len(pools))
	for i, p := range pools {
		capacities[i] = p.mem.Size()
	}
	policy, err := newEvictionPolicy(capacities, ghostEntriesFor(cfg.PoolSize))
	if err != nil {
		_ = copier.Close()
		_ = closePools(pools)
		return nil, fmt.Errorf("eviction policy: %w", err)
	}
	var tier *ssdTier
	if len(cfg.SSD.Dirs) > 0 {
		if tier, err = openSSDTier(cfg.SSD, pools, cfg.PoolFlags, log.With("component", "ssd")); err != nil {
			policy.close()
			_ = copier.Close()
			_ = closePools(pools)
			return nil, err
		}
	}
	var peers *peerState
	if cfg.Peers != nil {
		if peers, err = startPeers(pools, &cfg, log.With("component", "peer")); err != nil {
			if tier != nil {
				_ = tier.close()
			}
			policy.close()
			_ = copier.Close()
			_ = closePools(pools)
			return nil, err
		}
	}
	stopped, stop := context.WithCancel(context.Background())
	e := &Engine{
		epoch:       ids.New("ep-"),
		peers:       peers,
		tier:        tier,
		peerOpens:   map[string]*peerOpen{},
		stopped:     stopped,
		stop:        stop,
		cfg:         cfg,
		log:         log,
		pools:       pools,
		defaultPool: def,
		placement:   placement,
		copier:      copier,
		http:        newCallbackClient(cfg.CallbackTimeout),
		readyAllow:  readyAllow,
		peerAllow:   peerAllow,
		budget:      newCopyBudget(cfg.MaxCopyOps),
		policy:      policy,
		namespaces:  map[string]*namespace{},
		sessions:    map[string]*session{},
		instances:   map[instanceKey]*instance{},
		partial:     map[*block]struct{}{},
		leases:      map[string]*lease{},
		transfers:   map[string]*transfer{},
		waits:       map[string]*transferWait{},
		changed:     make(chan struct{}),
		freed:       make(chan struct{}),
	}
	if tier != nil {
		policy.proven = e.provenLocked
		tier.drain = e.drainProven
	}
	if reg != nil {
		m, err := newMetrics(e, reg)
		if err != nil {
			e.Close()
			return nil, err
		}
		e.m = m
	}
	e.bg.Add(1)
	go e.housekeeping()
	log.Info("engine started", "backend", native.Backend(), "pool_bytes", e.capacity(), "pools", len(pools), "copy_threads", cfg.CopyThreads,
		"epoch", e.epoch, "peer_transfers", peers != nil)
	return e, nil
}

// ghostEntriesFor sizes the ghost set at roughly the number of 16 KiB blocks
// the pool holds, bounded so the sketch stays small.
func ghostEntriesFor(poolSize uint64) int64 {
	n := int64(poolSize / (16 << 10))
	return min(max(n, 1024), 1<<20)
}

// Backend is "cpu" or "cuda".
func (e *Engine) Backend() string { return native.Backend() }

// Topology is the host's GPUs as given in Config (CPU mode when none).
func (e *Engine) Topology() *topology.Topology { return e.cfg.Topology }

// PoolPlacement says which NUMA nodes the pools were bound to (-1: none),
// their sizes, and why.
func (e *Engine) PoolPlacement() topology.Placement { return e.placement }

func logPlacement(log *slog.Logger, topo *topology.Topology, p topology.Placement) {
	log.Info("pool placement", "default_numa_node", p.Node, "pools", len(p.Pools), "reason", p.Reason)
	for _, ps := range p.Pools {
		log.Info("pool", "numa_node", ps.Node, "gpus", ps.GPUs, "bytes", ps.Size)
	}
	if p.Spread && len(p.Pools) == 1 {
		// One pool has one node: copies for GPUs elsewhere cross the
		// inter-socket link (see docs/gpu.md).
		log.Warn("GPUs span NUMA nodes but there is one pool; copies for GPUs on other nodes cross the socket link",
			"pool_numa_node", p.Node)
	}
	if topo.GPU() && native.Backend() != "cuda" {
		log.Warn("GPUs present but this is the CPU build: CUDA IPC registrations will fail; build with make CUDA=1",
			"gpus", len(topo.Devices))
	}
}

// PeerAddress is where peers reach this engine (Config.PeerAddress);
// empty when it serves none.
func (e *Engine) PeerAddress() string { return e.cfg.PeerAddress }

// Version is the build version given in Config.
func (e *Engine) Version() string { return e.cfg.Version }

// Close stops the engine: waiters wake with ErrClosed, regions close after
// their in-flight copies, and the pools are freed. It waits for copies
// still running at most Config.CopyTimeout: a copy that never ends (a dead
// producer's event) must not hang shutdown. It then returns an error and
// leaves the copier and pools to be freed when the copies end (never
// while a copier may still touch them).
func (e *Engine) Close() error {
	e.mu.Lock()
	if e.closed {
		e.mu.Unlock()
		return e.closeErr
	}
	e.closed = true
	e.stop()
	e.closeTransfersLocked()
	for _, inst := range e.instances {
		inst.close()
	}
	clear(e.instances)
	e.broadcastLocked()
	e.mu.Unlock()
	e.bg.Wait()
	e.policy.close()
	idle := make(chan struct{})
	go func() {
		e.copies.Wait()
		close(idle)
	}()
	select {
	case <-idle:
		e.closeErr = e.freeMemory()
	case <-time.After(e.cfg.CopyTimeout):
		e.closeErr = fmt.Errorf("%w: copies still running %v after close; the pools are freed when they end", ErrClosed, e.cfg.CopyTimeout)
		e.log.Error("engine closed with copies still running", "waited", e.cfg.CopyTimeout)
		go func() {
			<-idle
			if err := e.freeMemory(); err != nil {
				e.log.Error("freeing the pools after late copies", "err", err)
			}
		}()
	}
	return e.closeErr
}

// freeMemory stops the copier and frees the pools, once no copy runs.
func (e *Engine) freeMemory() error {
	defer close(e.freed)
	var err error
	if e.tier != nil {
		// Checkpoints, and stops its I/O engines, which hold the pools.
		err = e.tier.close()
	}
	// The copier waits for in-flight batches before the pools go away.
	if cerr := e.copier.Close(); err == nil {
		err = cerr
	}
	if e.peers != nil {
		// The pools cannot be freed while registered with UCX.
		if xerr := e.peers.close(); err == nil {
			err = xerr
		}
	}
	if perr := closePools(e.pools); err == nil {
		err = perr
	}
	return err
}

func (e *Engine) checkOpen() error {
	if e.closed {
		return ErrClosed
	}
	return nil
}

// broadcastLocked wakes every waiter on e.changed. Caller holds e.mu.
func (e *Engine) broadcastLocked() {
	close(e.changed)
	e.changed = make(chan struct{})
}

// housekeeping expires leases, transfers and partial blocks.
func (e *Engine) housekeeping() {
	defer e.bg.Done()
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-e.stopped.Done():
			return
		case now := <-tick.C:
			e.expire(now)
		}
	}
}

func (e *Engine) expire(now time.Time) {
	e.mu.Lock()
	defer e.mu.Unlock()
	for id, l := range e.leases {
		if now.After(l.expires) {
			e.releaseLeaseLocked(id, l)
		}
	}
	e.expireTransfersLocked(now)
	e.expirePeerOpensLocked(now)
	for b := range e.partial {
		if b.saving == 0 && now.Sub(b.created) > e.cfg.PartialTTL {
			e.failBlockLocked(b, "partially saved block expired")
		}
	}
}
