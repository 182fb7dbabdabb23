// Package kvlookup answers the router's question (its KVIndex): how many
// leading blocks of a prompt does an engine hold? It asks the engines'
// own indexes, exact and restart-safe, instead of keeping a shadow index:
// in process for the engine beside the router (engine.Lookup), over the
// peer API's Lookup RPC for engines on other hosts. Nothing is cached, so
// an engine that restarted (a new epoch, an empty index) is never
// answered for by its predecessor.
//
// The caller names the engine by its peer address: which engine serves
// which backend is the router's concern (its --kv-engine and
// --kv-engine-port flags), not this package's. "" (router.LocalEngine)
// or Config.LocalAddr is the in-process engine; any other address is
// dialled.
//
// Failure is "no hit", fast: every remote call is bounded by the
// caller's ctx and Config.Timeout, at most Config.MaxInFlight run at
// once, and an engine that was unreachable (or kept missing deadlines)
// is skipped without a call for a backoff (health.go).
//
// Files: kvlookup.go (this file) Config, Index and Lookup; health.go the
// per-engine backoff.
package kvlookup

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"time"

	"github.com/pegaflow/pegaflow/engine"
	pb "github.com/pegaflow/pegaflow/engine/api/pegaflowv1"
	"github.com/pegaflow/pegaflow/engine/peer"
)

// Query is the router's KVQuery, field for field (convert with
// kvlookup.Query(q)): the namespace-selecting fields and the prompt's
// block hashes (all of one length).
type Query struct {
	Model           string
	BlockSize       int
	HashAlgo        string
	SeedFingerprint []byte
	Hashes          [][]byte
}

// Defaults of Config's bounds.
const (
	DefaultMaxInFlight = 64
	DefaultTimeout     = 50 * time.Millisecond
	DefaultBackoff     = time.Second
)

// Config of an Index.
type Config struct {
	// Local is the engine in this process; nil: none.
	Local *engine.Engine
	// LocalAddr is Local's advertised peer address (--peer-advertise),
	// "" when it serves no peers: a lookup naming it is answered in
	// process, not over the network to itself.
	LocalAddr string
	// Token is the peer token sent to remote engines (nil: insecure
	// loopback peers).
	Token []byte
	// MaxInFlight bounds the remote lookups running at once.
	MaxInFlight int
	// Timeout caps one remote lookup (the caller's ctx may end sooner).
	Timeout time.Duration
	// Backoff is how long an unreachable engine is first skipped; it
	// doubles while the engine stays unreachable, up to 8x.
	Backoff time.Duration
	// Log gets an engine's transitions between reachable and not.
	Log *slog.Logger
}

// Errors of Lookup besides the engine's and the peer client's kinds.
var (
	// ErrNoEngine: the in-process engine was asked for, and there is none.
	ErrNoEngine = errors.New("kvlookup: no engine in this process")
	// ErrEngineDown: the engine failed recently and is skipped.
	ErrEngineDown = errors.New("kvlookup: engine skipped after recent failures")
)

// Index implements the router's KVIndex. Safe for concurrent use; Close
// when done.
type Index struct {
	cfg    Config
	client *peer.Client
	slots  chan struct{}
	health health
}

// New applies cfg's defaults.
func New(cfg Config) *Index {
	if cfg.MaxInFlight <= 0 {
		cfg.MaxInFlight = DefaultMaxInFlight
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = DefaultTimeout
	}
	if cfg.Backoff <= 0 {
		cfg.Backoff = DefaultBackoff
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	return &Index{cfg: cfg, client: peer.NewClient(cfg.Token), slots: make(chan struct{}, cfg.MaxInFlight),
		health: health{base: cfg.Backoff, log: cfg.Log, down: map[string]*engineHealth{}}}
}

// Close closes the connections to remote engines.
func (x *Index) Close() error { return x.client.Close() }

// Lookup returns how many leading blocks of q.Hashes the engine at
// engineAddr (its peer host:port; "" or Config.LocalAddr: the engine in
// this process) holds sealed, in a namespace matching q (engine.Lookup).
// A prompt of more than engine.MaxLookupHashes blocks is asked about its
// first ones. ctx bounds the call; any error means the caller knows
// nothing (count it as no hit). The per-engine health state is keyed by
// engineAddr, so callers pass the few configured addresses, not
// arbitrary ones.
func (x *Index) Lookup(ctx context.Context, engineAddr string, q Query) (int, error) {
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	local := engineAddr == "" || (x.cfg.Local != nil && engineAddr == x.cfg.LocalAddr)
	if local && x.cfg.Local == nil {
		return 0, ErrNoEngine
	}
	if q.BlockSize <= 0 || q.BlockSize > math.MaxUint32 {
		return 0, fmt.Errorf("%w: block size %d", engine.ErrInvalid, q.BlockSize)
	}
	hashes := q.Hashes[:min(len(q.Hashes), engine.MaxLookupHashes)]
	if local {
		res, err := x.cfg.Local.Lookup(engine.LookupQuery{Model: q.Model, BlockSize: uint32(q.BlockSize),
			HashAlgo: q.HashAlgo, SeedFingerprint: q.SeedFingerprint, Hashes: hashes})
		return res.Blocks, err
	}
	req, err := lookupRequest(q, hashes)
	if err != nil {
		return 0, err
	}
	return x.remote(ctx, engineAddr, req)
}

func (x *Index) remote(ctx context.Context, addr string, req *pb.PeerLookupRequest) (int, error) {
	if err := x.health.check(addr); err != nil {
		return 0, err
	}
	select {
	case x.slots <- struct{}{}:
	case <-ctx.Done():
		return 0, fmt.Errorf("kvlookup: waiting for a lookup slot: %w", ctx.Err())
	}
	defer func() { <-x.slots }()
	cctx, cancel := context.WithTimeout(ctx, x.cfg.Timeout)
	defer cancel()
	resp, err := x.client.Lookup(cctx, addr, req)
	x.health.record(addr, err, ctx.Err())
	if err != nil {
		return 0, err
	}
	if n := int(resp.NumHit); n <= len(req.PackedHashes)/max(int(req.HashLen), 1) {
		return n, nil
	}
	return 0, fmt.Errorf("%w: engine %s claims %d blocks of a shorter prompt", engine.ErrPeerUnavailable, addr, resp.NumHit)
}

// lookupRequest packs the hashes, which must share one valid length.
func lookupRequest(q Query, hashes [][]byte) (*pb.PeerLookupRequest, error) {
	req := &pb.PeerLookupRequest{Model: q.Model, BlockSize: uint32(q.BlockSize), HashAlgo: q.HashAlgo,
		HashSeedFingerprint: q.SeedFingerprint}
	if len(hashes) == 0 {
		return req, nil
	}
	n := len(hashes[0])
	if n < engine.MinHashLen || n > engine.MaxHashLen {
		return nil, fmt.Errorf("%w: hash of %d bytes, want %d..%d", engine.ErrInvalid, n, engine.MinHashLen, engine.MaxHashLen)
	}
	packed := make([]byte, 0, n*len(hashes))
	for i, h := range hashes {
		if len(h) != n {
			return nil, fmt.Errorf("%w: hash %d has %d bytes, hash 0 has %d", engine.ErrInvalid, i, len(h), n)
		}
		packed = append(packed, h...)
	}
	req.PackedHashes, req.HashLen = packed, uint32(n)
	return req, nil
}
