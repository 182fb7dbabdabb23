package sim

import "github.com/pegaflow/pegaflow/internal/vllmhash"

// HashAlgo is the vLLM prefix-caching hash the sim implements.
const HashAlgo = vllmhash.AlgoSHA256CBOR

// noneHash is vLLM's NONE_HASH for the sim's algorithm and seed (vLLM's
// PYTHONHASHSEED; "" = unset, vLLM's fixed default): the parent hash of
// every request's first block, so instances agree on block hashes only
// with the same seed.
func noneHash(seed string) ([]byte, error) { return vllmhash.NoneHash(HashAlgo, seed) }

// blockHashes are vLLM's chained hashes of the prompt's full blocks
// (internal/vllmhash); salt (cache_salt) goes into the first block's
// extra keys. parse refused a salt that cannot be hashed, so an error
// here is a bug: it is logged and the prompt has no blocks (nothing is
// saved or loaded; the request recomputes).
func (s *Sim) blockHashes(tokens []uint32, salt string) [][]byte {
	hs, err := vllmhash.BlockHashes(vllmhash.Params{Algo: HashAlgo, BlockSize: s.cfg.Geometry.BlockSize}, s.noneHash, tokens, salt)
	if err != nil {
		s.log.Error("block hashes", "err", err)
		return nil
	}
	return hs
}
