package engine

import (
	"bytes"
	"unicode/utf8"

	pb "github.com/pegaflow/pegaflow/engine/api/pegaflowv1"
)

// MaxLookupHashes bounds the hashes of one Lookup (1M tokens at block
// size 16), in process and over the peer API alike; a caller with a
// longer prompt asks about its first MaxLookupHashes blocks (a lower
// bound on the hit).
const MaxLookupHashes = MaxPeerOpenHashes

// LookupQuery asks how much of a prompt this engine holds, by what a
// router can compute without a vLLM instance: the model, the hash block
// size, vLLM's hash algorithm and seed fingerprint (the connector's
// hash_seed_fingerprint), and the prompt's block hashes.
type LookupQuery struct {
	// Model matches Namespace.Model; "" matches every model.
	Model           string
	BlockSize       uint32
	HashAlgo        string
	SeedFingerprint []byte
	Hashes          [][]byte
}

// LookupResult is a Lookup's answer: Blocks leading blocks of the query's
// hashes are held sealed in namespace NamespaceID ("" when Blocks is 0),
// by the engine started as Epoch.
type LookupResult struct {
	Blocks      int
	NamespaceID string
	Epoch       string
}

// Lookup answers, for the namespaces matching q (model, block size, hash
// algorithm and seed fingerprint), the largest count of leading blocks of
// q.Hashes one of them holds sealed: the sealed prefix, or in a hybrid
// namespace the hybrid boundary with first_block 0 (what a Query from
// the request's start would hit). It takes no session, lease or wait:
// the blocks may be evicted a moment later, so the answer is a
// prediction, not a promise. With an SSD tier, a non-hybrid namespace's
// prefix continues on SSD (a Query promotes those blocks).
//
// A lookup is not a use: it leaves the blocks' S3-FIFO reference bits
// alone (Query sets them), so a router that looks up every request on
// every host neither promotes cold blocks nor keeps them from eviction.
// Only loads (Query, Load, a peer's transfer) count.
//
// Cost: O(len(q.Hashes) x matching namespaces) map lookups under e.mu,
// bounded by MaxLookupHashes; a non-hybrid namespace stops at its first
// missing block.
func (e *Engine) Lookup(q LookupQuery) (LookupResult, error) {
	if err := validateLookup(&q); err != nil {
		return LookupResult{}, err
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if err := e.checkOpen(); err != nil {
		return LookupResult{}, err
	}
	res := LookupResult{Epoch: e.epoch}
	for _, ns := range e.namespaces {
		d := ns.desc
		if (q.Model != "" && d.Model != q.Model) || d.BlockSize != q.BlockSize || d.HashAlgo != q.HashAlgo ||
			!bytes.Equal(ns.fingerprint, q.SeedFingerprint) {
			continue
		}
		var hit int
		if ns.hybrid {
			hit, _ = e.boundaryLocked(ns, q.Hashes, 0)
		} else {
			hit = peekPrefix(ns.groups[0], q.Hashes)
			hit += e.ssdRunLocked(ns, ns.groups[0], q.Hashes[hit:])
		}
		// Ties go to the smaller id, so equal engines answer alike.
		if hit > res.Blocks || (hit == res.Blocks && hit > 0 && ns.id < res.NamespaceID) {
			res.Blocks, res.NamespaceID = hit, ns.id
		}
	}
	return res, nil
}

// peekPrefix counts g's sealed prefix of hashes without touching a block
// (a Lookup is not a use; prefixLocked touches what it counts).
func peekPrefix(g *nsGroup, hashes [][]byte) int {
	n := 0
	for n < len(hashes) {
		b := g.blocks[string(hashes[n])]
		if b == nil || !b.sealed {
			break
		}
		n++
	}
	return n
}

// validateLookup bounds a LookupQuery: every field that selects
// namespaces within the limits a namespace itself has, a non-empty
// fingerprint (a randomly seeded instance has no shareable hashes), and
// at most MaxLookupHashes hashes of a valid length.
func validateLookup(q *LookupQuery) error {
	switch {
	case len(q.Model) > MaxIDLen || !utf8.ValidString(q.Model):
		return invalid("model: at most %d bytes of UTF-8", MaxIDLen)
	case q.BlockSize == 0:
		return invalid("block_size is 0")
	case q.HashAlgo == "" || len(q.HashAlgo) > MaxIDLen:
		return invalid("hash_algo: want 1..%d bytes", MaxIDLen)
	case len(q.SeedFingerprint) == 0 || len(q.SeedFingerprint) > MaxHashLen:
		return invalid("hash_seed_fingerprint has %d bytes, want 1..%d", len(q.SeedFingerprint), MaxHashLen)
	case len(q.Hashes) > MaxLookupHashes:
		return invalid("%d hashes in one lookup, max %d", len(q.Hashes), MaxLookupHashes)
	}
	for i, h := range q.Hashes {
		if err := validateHash(i, h); err != nil {
			return err
		}
	}
	return nil
}

// PeerLookup is Lookup for the peer API: the request's packed hashes
// checked and sliced in place (no copy).
func (e *Engine) PeerLookup(req *pb.PeerLookupRequest) (*pb.PeerLookupResponse, error) {
	var hashes [][]byte
	if len(req.PackedHashes) > 0 {
		var err error
		if hashes, err = unpackHashes(req.PackedHashes, req.HashLen, MaxLookupHashes, "lookup"); err != nil {
			return nil, err
		}
	}
	res, err := e.Lookup(LookupQuery{Model: req.Model, BlockSize: req.BlockSize, HashAlgo: req.HashAlgo,
		SeedFingerprint: req.HashSeedFingerprint, Hashes: hashes})
	if err != nil {
		return nil, err
	}
	return &pb.PeerLookupResponse{NumHit: uint32(res.Blocks), NamespaceId: res.NamespaceID, Epoch: res.Epoch}, nil
}
