package router

import (
	"crypto/sha256"
	"errors"
	"fmt"
)

// The router's one seam to vLLM's block hashes. Everything else in the
// router calls these three functions; when internal/vllmhash lands they
// forward to it (NoneHash, BlockHashes, SeedFingerprint) and the interim
// sha256_cbor code below goes away.

// vLLM's NONE_HASH seed when PYTHONHASHSEED is unset and the algorithm is
// cryptographic (vllm/v1/core/kv_cache_utils.py, DEFAULT_NONE_HASH_SEED).
const vllmDefaultNoneHashSeed = "vllm-none-hash"

// errHashAlgo: an algorithm this build cannot compute.
var errHashAlgo = errors.New("hash algorithm not supported by this build")

// kvResolvedSeed is the seed vLLM roots the chain in: seed, or vLLM's
// fixed default when seed is "" (PYTHONHASHSEED unset). xxhash without a
// seed is random per vLLM process: nothing the router could match.
func kvResolvedSeed(algo, seed string) (string, error) {
	if seed != "" {
		return seed, nil
	}
	switch algo {
	case "sha256", "sha256_cbor":
		return vllmDefaultNoneHashSeed, nil
	}
	return "", fmt.Errorf("%s without a seed is random per vLLM process: set --kv-hash-seed to the backends' PYTHONHASHSEED", algo)
}

// kvNoneHash is NONE_HASH, the parent of every prompt's first block.
func kvNoneHash(algo, seed string) ([]byte, error) {
	s, err := kvResolvedSeed(algo, seed)
	if err != nil {
		return nil, err
	}
	if algo != "sha256_cbor" {
		return nil, fmt.Errorf("--kv-hash-algo %s: %w", algo, errHashAlgo)
	}
	var b []byte
	b = cborHead(b, 3, uint64(len(s)))
	sum := sha256.Sum256(append(b, s...))
	return sum[:], nil
}

// kvBlockHashes are vLLM's chained hashes of tokens' full blocks, salt in
// the first block's extra keys.
func kvBlockHashes(algo string, blockSize int, none []byte, tokens []uint32, salt string) ([][]byte, error) {
	if algo != "sha256_cbor" {
		return nil, fmt.Errorf("--kv-hash-algo %s: %w", algo, errHashAlgo)
	}
	n := len(tokens) / blockSize
	out := make([][]byte, n)
	sums := make([]byte, n*sha256.Size) // one allocation for every digest
	parent := none
	buf := make([]byte, 0, 64+9*blockSize+len(salt))
	for i := range n {
		buf = append(buf[:0], 0x83) // (parent, tokens, extra_keys)
		buf = cborHead(buf, 2, uint64(len(parent)))
		buf = append(buf, parent...)
		buf = cborHead(buf, 4, uint64(blockSize))
		for _, t := range tokens[i*blockSize : (i+1)*blockSize] {
			buf = cborHead(buf, 0, uint64(t))
		}
		if i == 0 && salt != "" {
			buf = append(buf, 0x81)
			buf = cborHead(buf, 3, uint64(len(salt)))
			buf = append(buf, salt...)
		} else {
			buf = append(buf, 0xf6) // None
		}
		sum := sha256.Sum256(buf)
		out[i] = sums[i*sha256.Size : (i+1)*sha256.Size : (i+1)*sha256.Size]
		copy(out[i], sum[:])
		parent = out[i]
	}
	return out, nil
}

// kvSeedFingerprint equals the connector's hash_seed_fingerprint: which
// engine namespaces the router's hashes can match.
func kvSeedFingerprint(algo, seed string) ([]byte, error) {
	s, err := kvResolvedSeed(algo, seed)
	if err != nil {
		return nil, err
	}
	sum := sha256.Sum256([]byte("pegaflow-hash-seed/v1\x00" + algo + "\x00" + s))
	return sum[:16], nil
}

// cborHead appends a canonical (shortest) CBOR head.
func cborHead(b []byte, major byte, v uint64) []byte {
	m := major << 5
	switch {
	case v < 24:
		return append(b, m|byte(v))
	case v <= 0xff:
		return append(b, m|24, byte(v))
	case v <= 0xffff:
		return append(b, m|25, byte(v>>8), byte(v))
	case v <= 0xffffffff:
		return append(b, m|26, byte(v>>24), byte(v>>16), byte(v>>8), byte(v))
	}
	return append(b, m|27, byte(v>>56), byte(v>>48), byte(v>>40), byte(v>>32), byte(v>>24), byte(v>>16), byte(v>>8), byte(v))
}
