package router

import (
	"fmt"

	"github.com/pegaflow/pegaflow/internal/vllmhash"
)

// kvHasher is the router's one seam to vLLM's block hashes: the
// backends' algorithm, block size and seed (--kv-hash-algo,
// --kv-block-size, --kv-hash-seed), hashed by internal/vllmhash, the
// hashes of recently seen prefixes remembered in a memo (kvmemo.go) so
// that a multi-turn follow-up or a shared system prompt skips SHA-256 for
// the part already hashed. Safe for concurrent use.
type kvHasher struct {
	p    vllmhash.Params
	none []byte    // NONE_HASH: the parent of every prompt's first block
	fp   []byte    // the seed fingerprint engine namespaces record
	memo *hashMemo // nil: off (--kv-hash-memo 0)
}

// newKVHasher checks the hashing flags; memoBytes bounds the memo.
func newKVHasher(algo, seed string, blockSize int, memoBytes uint64) (*kvHasher, error) {
	if _, ok := vllmhash.ResolveSeed(algo, seed); !ok {
		return nil, fmt.Errorf("%w: %s without PYTHONHASHSEED is seeded randomly per vLLM process, so nothing outside it matches", vllmhash.ErrUnsupported, algo)
	}
	none, err := vllmhash.NoneHash(algo, seed)
	if err != nil {
		return nil, err
	}
	p := vllmhash.Params{Algo: algo, BlockSize: blockSize, Seed: seed}
	if err := p.Check(); err != nil {
		return nil, err
	}
	return &kvHasher{p: p, none: none, fp: vllmhash.SeedFingerprint(algo, seed), memo: newHashMemo(blockSize, memoBytes)}, nil
}

// blockHashes are vLLM's chained hashes of the full blocks of tokens,
// salt in the first block's extra keys. The memo answers the leading
// blocks it holds; the rest are computed and remembered. A salted first
// block is always computed (the memo holds only blocks whose extra keys
// are None, so an entry's parent and tokens determine its hash); its
// successors are remembered as usual, their parent carrying the salt.
func (h *kvHasher) blockHashes(tokens []uint32, salt string) ([][]byte, error) {
	bs := h.p.BlockSize
	n := len(tokens) / bs
	if h.memo == nil || n == 0 {
		return vllmhash.BlockHashes(h.p, h.none, tokens[:n*bs], salt)
	}
	out := make([][]byte, n)
	sums := make([]byte, n*vllmhash.HashLen) // one allocation for every hash
	for i := range out {
		out[i] = sums[i*vllmhash.HashLen : (i+1)*vllmhash.HashLen : (i+1)*vllmhash.HashLen]
	}
	start, parent := 0, h.none
	if salt != "" {
		first, err := vllmhash.BlockHashes(h.p, h.none, tokens[:bs], salt)
		if err != nil {
			return nil, err
		}
		copy(out[0], first[0])
		start, parent = 1, out[0]
	}
	hit, stale := h.memo.walk(parent, tokens[start*bs:n*bs], out[start:])
	miss := start + hit
	if miss < n {
		from := parent
		if hit > 0 {
			from = out[miss-1]
		}
		tail, err := vllmhash.BlockHashes(h.p, from, tokens[miss*bs:n*bs], "")
		if err != nil {
			return nil, err
		}
		for i, t := range tail {
			copy(out[miss+i], t)
		}
	}
	// Remember the new blocks; an ageing prefix is remembered anew,
	// whole, so a hot one is never evicted by the FIFO and stays
	// contiguous with its continuation.
	switch {
	case stale:
		h.memo.insert(parent, tokens[start*bs:n*bs], out[start:])
	case miss < n:
		from := parent
		if hit > 0 {
			from = out[miss-1]
		}
		h.memo.insert(from, tokens[miss*bs:n*bs], out[miss:])
	}
	return out, nil
}
