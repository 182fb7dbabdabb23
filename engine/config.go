package engine

import (
	"fmt"
	"time"

	"github.com/pegaflow/pegaflow/engine/topology"
	"github.com/pegaflow/pegaflow/native"
)

// Config sets up an Engine. Zero durations take the defaults below.
type Config struct {
	// PoolSize is the pinned host memory of all pools together.
	PoolSize uint64
	// NUMANode puts a single pool on that node; -1: Topology decides (one
	// pool per NUMA node that hosts GPUs, no binding in CPU mode).
	NUMANode    int
	Device      int // CUDA device for the pools, -1: none
	PoolFlags   native.PoolFlags
	CopyThreads int
	// LeaseTTL bounds how long a Query lease pins blocks.
	LeaseTTL time.Duration
	// TransferTTL bounds how long a transfer waits for its saves and then
	// pins its blocks for the decode side.
	TransferTTL time.Duration
	// PartialTTL frees blocks that some ranks saved but others never did.
	PartialTTL time.Duration
	// MaxQueryWait caps the wait a Query may ask for.
	MaxQueryWait time.Duration
	// CallbackTimeout bounds each POST to a transfer's ready_url.
	CallbackTimeout time.Duration
	// CopyTimeout caps how long a Save or Load waits for its copies (the
	// RPC's own deadline applies when shorter), and how long Close waits
	// for copies still running.
	CopyTimeout time.Duration
	// ShmDir is the directory producers' shared-memory files must lie
	// beneath (default DefaultShmDir); see openShmFile.
	ShmDir string
	// KVReadyAllow lists where a transfer's ready_url may point: host:port,
	// an http(s) URL prefix, KVReadyLoopback or (alone) KVReadyNone. Empty:
	// loopback only. A Save naming another URL fails (callback.go).
	KVReadyAllow []string
	// MaxTransfers caps the transfer records and, separately, the ids
	// waited for without a record (transferbound.go).
	MaxTransfers int
	// MaxCopyOps caps the copy operations in flight across all Save and
	// Load calls, and so the memory their plans take (bounds.go).
	MaxCopyOps int64
	Version    string
	// BlockEventRing is how many block events each namespace's feed
	// keeps for BlockEvents readers (default DefaultBlockEventRing).
	BlockEventRing int
	// Topology is the host's GPUs (topology.Discover); nil is CPU mode.
	// Registrations are checked against it and it places the pools.
	Topology *topology.Topology
	// Peers is the control plane to other engines (engine/peer.Client).
	// When set, the engine serves peers (PeerHandshake, OpenPeerTransfer,
	// OpenPeerRead) and fetches from them (QueryRequest.source_engine).
	// nil: neither.
	Peers PeerControl
	// PeerTransport is how fetched bytes move: PeerTransportTCP (default,
	// the validated stream) or PeerTransportRDMA (UCX one-sided reads; New
	// starts the UCX agent and registers the pools remote-read-only, and
	// refuses to unless UCX_TLS names RDMA transports only).
	PeerTransport string
	// ucxOverTCP lets this package's tests run PeerTransportRDMA over
	// UCX's tcp transport, the only one a test machine has; nothing
	// outside the package can set it.
	ucxOverTCP bool
	// PeerOpenTTL bounds how long a peer's open transfer pins blocks
	// without a release (default DefaultPeerOpenTTL).
	PeerOpenTTL time.Duration
	// PeerFetchTimeout bounds a fetch for a Query that does not wait
	// (a waiting Query's fetch ends within its wait).
	PeerFetchTimeout time.Duration
	// PeerAddress is the address peers reach this engine's peer API at
	// (--peer-advertise, else --peer-addr): sent in the Attach event and
	// the /kv_ready report so that D's side can name it as source_engine.
	// A Query naming it is local. Empty: the engine serves no peers.
	PeerAddress string
	// PeerAllow lists the source engines a Query may name (peerallow.go):
	// host:port, a subnet, or PeerAllowLoopback. Empty: none; a Query
	// naming another source fails ErrInvalid before anything is dialled.
	PeerAllow []string
	// SSD is the SSD tier (ssdtier.go); no Dirs: none.
	SSD SSDConfig
}

// SSDConfig configures the SSD tier: blocks the pool evicts from its
// main queue are spilled to files in Dirs and promoted back on a Query
// (docs/ssd.md).
type SSDConfig struct {
	// Dirs are one directory per device, created 0700; a directory that
	// is unusable at start (not ours, open to others, I/O errors) is left
	// out and logged, never fatal.
	Dirs []string
	// Size is the space the tier takes in each directory.
	Size uint64
	// StagingBytes bounds the spill queue: evicted blocks are copied to
	// a staging pool of this size and written from there (default 64 MiB).
	StagingBytes uint64
	// PromoteWait is the budget of SSD reads for a Query that waits less
	// (default 100 ms): what is not back by then is a shorter hit.
	PromoteWait time.Duration
	// CheckpointEvery is how often each directory's index is
	// checkpointed (default 30 s), besides a clean stop.
	CheckpointEvery time.Duration
	// Backend and Depth are the native I/O engine's (native.SSDAuto: io_uring
	// when built and allowed, else Depth threads; default depth 32).
	Backend native.SSDBackend
	Depth   int
}

// Defaults for Config.
const (
	DefaultLeaseTTL        = 30 * time.Second
	DefaultTransferTTL     = 120 * time.Second
	DefaultPartialTTL      = 60 * time.Second
	DefaultMaxQueryWait    = 30 * time.Second
	DefaultCallbackTimeout = 5 * time.Second
	DefaultCopyTimeout     = 30 * time.Second
	DefaultMaxTransfers    = 1 << 17
	// DefaultMaxCopyOps bounds in-flight copy plans to roughly 300 MB (an
	// op is held by the Go plan, the coalesced batch and the native
	// layer); a 32k-token prompt of an 80-layer model needs 320k ops.
	DefaultMaxCopyOps = 1 << 22
	// DefaultPeerFetchTimeout: see Config.PeerFetchTimeout.
	DefaultPeerFetchTimeout = 10 * time.Second
)

func (c *Config) setDefaults() {
	orDefault(&c.CopyThreads, 2)
	orDefault(&c.LeaseTTL, DefaultLeaseTTL)
	orDefault(&c.TransferTTL, DefaultTransferTTL)
	orDefault(&c.PartialTTL, DefaultPartialTTL)
	orDefault(&c.MaxQueryWait, DefaultMaxQueryWait)
	orDefault(&c.CallbackTimeout, DefaultCallbackTimeout)
	orDefault(&c.CopyTimeout, DefaultCopyTimeout)
	orDefault(&c.MaxTransfers, DefaultMaxTransfers)
	orDefault(&c.MaxCopyOps, DefaultMaxCopyOps)
	orDefault(&c.BlockEventRing, DefaultBlockEventRing)
	orDefault(&c.PeerOpenTTL, DefaultPeerOpenTTL)
	orDefault(&c.PeerFetchTimeout, DefaultPeerFetchTimeout)
	if len(c.SSD.Dirs) > 0 {
		if c.SSD.StagingBytes == 0 {
			c.SSD.StagingBytes = 64 << 20
		}
		orDefault(&c.SSD.PromoteWait, 100*time.Millisecond)
		orDefault(&c.SSD.CheckpointEvery, 30*time.Second)
		orDefault(&c.SSD.Depth, 32)
	}
	if c.ShmDir == "" {
		c.ShmDir = DefaultShmDir
	}
	if c.Version == "" {
		c.Version = "dev"
	}
	if c.Topology == nil {
		c.Topology = topology.CPU("no topology given")
	}
}

// orDefault sets *v to def unless it is positive (zero and negative
// values mean "not set" for every numeric Config field).
func orDefault[T int | int64 | time.Duration](v *T, def T) {
	if *v <= 0 {
		*v = def
	}
}

// validate checks a Config after setDefaults and parses its allowlists.
func (c *Config) validate() (readyAllow, peerAllow *allowlist, err error) {
	if c.PoolSize < allocAlign {
		return nil, nil, fmt.Errorf("%w: pool size %d too small", ErrInvalid, c.PoolSize)
	}
	if readyAllow, err = parseKVReadyAllow(c.KVReadyAllow); err != nil {
		return nil, nil, err
	}
	if peerAllow, err = parsePeerAllow(c.PeerAllow); err != nil {
		return nil, nil, err
	}
	if len(c.SSD.Dirs) > 0 {
		if len(c.SSD.Dirs) > MaxSSDDirs {
			return nil, nil, fmt.Errorf("%w: %d SSD directories, max %d", ErrInvalid, len(c.SSD.Dirs), MaxSSDDirs)
		}
		if c.SSD.Size < MinSSDSize {
			return nil, nil, fmt.Errorf("%w: SSD size %d below %d", ErrInvalid, c.SSD.Size, MinSSDSize)
		}
		if c.SSD.StagingBytes < ssdAlign || c.SSD.StagingBytes > 1<<40 {
			return nil, nil, fmt.Errorf("%w: SSD staging of %d bytes", ErrInvalid, c.SSD.StagingBytes)
		}
	}
	if c.PeerAddress != "" {
		if err := validatePeerAddr("peer address", c.PeerAddress); err != nil {
			return nil, nil, err
		}
	}
	return readyAllow, peerAllow, nil
}
