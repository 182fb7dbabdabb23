// Package vllmhash computes vLLM's prefix-caching block hashes in Go, so
// that a component which is not vLLM (the router, the sim) names a
// prompt's blocks exactly as a vLLM instance does, and can tell which
// engine namespaces those names are valid in (SeedFingerprint).
//
// What it reproduces (vLLM 0.32, vllm/v1/core/kv_cache_utils.py and
// vllm/utils/hashing.py): NONE_HASH = H(seed), the seed being
// PYTHONHASHSEED or, unset, vLLM's fixed "vllm-none-hash" for the
// cryptographic algorithms; then per full block
// H((parent or NONE_HASH, tuple(block tokens), extra_keys)), extra_keys
// being None or, on the first block of a salted request,
// (("cache_salt", salt),). H is sha256 over the canonical CBOR
// ("sha256_cbor") or over the pickle protocol 5 bytes ("sha256") of that
// tuple. LoRA, multimodal and prompt-embeds extra keys are out of scope:
// such a request cannot be hashed here (the caller falls back). The
// xxhash algorithms are not supported: without PYTHONHASHSEED vLLM seeds
// them randomly per process, so nothing outside the process can match.
//
// Files: hash.go (this file) the API; cbor.go and pickle.go the two
// serialisations of a block's tuple.
package vllmhash

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"unicode/utf8"
)

// The algorithms, by vLLM's --prefix-caching-hash-algo names.
const (
	AlgoSHA256     = "sha256"
	AlgoSHA256CBOR = "sha256_cbor"
)

// DefaultSeed is vLLM's DEFAULT_NONE_HASH_SEED: the seed of NONE_HASH for
// the cryptographic algorithms when PYTHONHASHSEED is unset.
const DefaultSeed = "vllm-none-hash"

// HashLen is the length of every hash here (SHA-256).
const HashLen = sha256.Size

// Bounds on the input: they keep one call's memory proportional to its
// tokens. vLLM's block sizes are far below MaxBlockSize; a salt of
// MaxSaltBytes or more would be pickled outside its frame, which is not
// reproduced.
const (
	MaxBlockSize = 1 << 20
	MaxSaltBytes = 1<<16 - 1
)

// ErrUnsupported is returned for input vLLM hashes but this package does
// not reproduce (an algorithm, an oversized salt): the caller falls back.
var ErrUnsupported = errors.New("vllmhash: unsupported")

// Params are what two vLLM instances must agree on to name blocks alike.
type Params struct {
	// Algo is vLLM's prefix-caching hash algorithm (AlgoSHA256 or
	// AlgoSHA256CBOR).
	Algo string
	// BlockSize is the hash block size in tokens.
	BlockSize int
	// Seed is PYTHONHASHSEED; "" means unset (vLLM's default, DefaultSeed).
	// A PYTHONHASHSEED set to the empty string cannot be expressed.
	Seed string
}

// nonCrypto are the algorithms vLLM seeds randomly when PYTHONHASHSEED is
// unset (_NON_CRYPTO_HASH_FUNCTIONS).
func nonCrypto(algo string) bool { return algo == "xxhash" || algo == "xxhash_cbor" }

// ResolveSeed is the seed vLLM derives NONE_HASH from (resolve_none_hash_seed):
// seed when set, else DefaultSeed; ok is false when vLLM would draw a
// random one (a non-cryptographic algorithm without PYTHONHASHSEED).
func ResolveSeed(algo, seed string) (resolved string, ok bool) {
	if seed != "" {
		return seed, true
	}
	if nonCrypto(algo) {
		return "", false
	}
	return DefaultSeed, true
}

// SeedFingerprint is the connector's hash_seed_fingerprint
// (connector/src/pegaflow_connector/config.py), which an engine
// namespace records: the first 16 bytes of
// sha256("pegaflow-hash-seed/v1\0" + algo + "\0" + resolved seed). Nil when
// vLLM seeds randomly (nothing outside the instance matches its hashes).
func SeedFingerprint(algo, seed string) []byte {
	s, ok := ResolveSeed(algo, seed)
	if !ok {
		return nil
	}
	h := sha256.New()
	h.Write([]byte("pegaflow-hash-seed/v1\x00"))
	h.Write([]byte(algo))
	h.Write([]byte{0})
	h.Write([]byte(s))
	return h.Sum(nil)[:16]
}

// NoneHash is vLLM's NONE_HASH for algo and seed (Params.Seed): the
// parent hash of every request's first block.
func NoneHash(algo, seed string) ([]byte, error) {
	s, ok := ResolveSeed(algo, seed)
	if !ok {
		return nil, fmt.Errorf("%w: %s without a seed is seeded randomly per vLLM process", ErrUnsupported, algo)
	}
	if !utf8.ValidString(s) {
		return nil, fmt.Errorf("%w: seed is not UTF-8", ErrUnsupported)
	}
	var b []byte
	switch algo {
	case AlgoSHA256CBOR:
		b = cborText(nil, s)
	case AlgoSHA256:
		if len(s) > MaxSaltBytes {
			return nil, fmt.Errorf("%w: seed of %d bytes", ErrUnsupported, len(s))
		}
		p := newPickler(nil)
		p.boundary()
		p.text(s)
		b = p.finish()
	default:
		return nil, unsupportedAlgo(algo)
	}
	sum := sha256.Sum256(b)
	return sum[:], nil
}

func unsupportedAlgo(algo string) error {
	return fmt.Errorf("%w: hash algorithm %q (want %s or %s)", ErrUnsupported, algo, AlgoSHA256, AlgoSHA256CBOR)
}

// Check validates p: a supported algorithm and a block size in
// 1..MaxBlockSize.
func (p Params) Check() error {
	if p.Algo != AlgoSHA256 && p.Algo != AlgoSHA256CBOR {
		return unsupportedAlgo(p.Algo)
	}
	if p.BlockSize < 1 || p.BlockSize > MaxBlockSize {
		return fmt.Errorf("vllmhash: block size %d, want 1..%d", p.BlockSize, MaxBlockSize)
	}
	return nil
}

// BlockHashes returns the hashes of the full blocks of tokens (the partial
// last block has none), chained from none (NoneHash(p.Algo, p.Seed)).
// A non-empty salt is the request's cache_salt. The hashes share one
// backing array.
func BlockHashes(p Params, none []byte, tokens []uint32, salt string) ([][]byte, error) {
	if err := p.Check(); err != nil {
		return nil, err
	}
	if len(none) != HashLen {
		return nil, fmt.Errorf("vllmhash: NONE_HASH of %d bytes, want %d", len(none), HashLen)
	}
	if len(salt) > MaxSaltBytes {
		return nil, fmt.Errorf("%w: cache_salt of %d bytes, max %d", ErrUnsupported, len(salt), MaxSaltBytes)
	}
	if !utf8.ValidString(salt) {
		return nil, fmt.Errorf("%w: cache_salt is not UTF-8", ErrUnsupported)
	}
	bs := p.BlockSize
	n := len(tokens) / bs
	out := make([][]byte, n)
	sums := make([]byte, n*HashLen)
	parent := none
	var buf []byte
	for i := range n {
		blockSalt := ""
		if i == 0 {
			blockSalt = salt
		}
		block := tokens[i*bs : (i+1)*bs]
		if p.Algo == AlgoSHA256CBOR {
			buf = cborBlock(buf[:0], parent, block, blockSalt)
		} else {
			buf = pickleBlock(buf[:0], parent, block, blockSalt)
		}
		sum := sha256.Sum256(buf)
		h := sums[i*HashLen : (i+1)*HashLen : (i+1)*HashLen]
		copy(h, sum[:])
		out[i] = h
		parent = h
	}
	return out, nil
}

// saltKey is the tag vLLM 0.32 gives a cache_salt extra key.
const saltKey = "cache_salt"
