package vllmhash

import (
	"fmt"
	"testing"
)

// BenchmarkBlockHashes: what hashing a prompt costs the router, per
// algorithm, at 8K and 32K tokens and vLLM's default block size.
func BenchmarkBlockHashes(b *testing.B) {
	for _, algo := range []string{AlgoSHA256, AlgoSHA256CBOR} {
		none, err := NoneHash(algo, "")
		if err != nil {
			b.Fatal(err)
		}
		for _, n := range []int{8 << 10, 32 << 10} {
			toks := genTokens("mixed", n)
			for i := range toks {
				toks[i] %= 151_936 // a real vocabulary's ids
			}
			p := Params{Algo: algo, BlockSize: 16}
			b.Run(fmt.Sprintf("%s/%dK", algo, n>>10), func(b *testing.B) {
				b.SetBytes(int64(4 * n))
				b.ReportAllocs()
				for b.Loop() {
					if _, err := BlockHashes(p, none, toks, "tenant"); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}
