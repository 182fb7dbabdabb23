package sim

import (
	"crypto/sha256"
)

// HashAlgo is the vLLM prefix-caching hash the sim implements.
const HashAlgo = "sha256_cbor"

// NoneHash is vLLM's NONE_HASH for sha256_cbor: sha256 over the canonical
// CBOR of the hash seed string (vLLM uses PYTHONHASHSEED). It is the
// parent hash of every request's first block, so instances agree on block
// hashes only with the same seed.
func NoneHash(seed string) []byte {
	var b []byte
	b = cborHead(b, 3, uint64(len(seed)))
	b = append(b, seed...)
	sum := sha256.Sum256(b)
	return sum[:]
}

// BlockHashes returns vLLM's chained hashes of the full blocks of tokens:
// hash_i = sha256(cbor((hash_{i-1} or NONE_HASH, tuple(block_i tokens),
// extra_keys))), extra_keys being None, or (cache_salt,) on the first block
// when a salt is given. The partial last block has no hash.
func BlockHashes(noneHash []byte, tokens []uint32, blockSize int, cacheSalt string) [][]byte {
	n := len(tokens) / blockSize
	out := make([][]byte, n)
	parent := noneHash
	buf := make([]byte, 0, 64+9*blockSize)
	for i := 0; i < n; i++ {
		buf = buf[:0]
		buf = append(buf, 0x83) // array(3)
		buf = cborHead(buf, 2, uint64(len(parent)))
		buf = append(buf, parent...)
		buf = cborHead(buf, 4, uint64(blockSize))
		for _, t := range tokens[i*blockSize : (i+1)*blockSize] {
			buf = cborHead(buf, 0, uint64(t))
		}
		if i == 0 && cacheSalt != "" {
			buf = append(buf, 0x81) // (salt,)
			buf = cborHead(buf, 3, uint64(len(cacheSalt)))
			buf = append(buf, cacheSalt...)
		} else {
			buf = append(buf, 0xf6) // None
		}
		sum := sha256.Sum256(buf)
		out[i] = sum[:]
		parent = out[i]
	}
	return out
}

// cborHead appends a canonical (shortest) CBOR head of major type major.
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
	default:
		return append(b, m|27, byte(v>>56), byte(v>>48), byte(v>>40), byte(v>>32), byte(v>>24), byte(v>>16), byte(v>>8), byte(v))
	}
}
