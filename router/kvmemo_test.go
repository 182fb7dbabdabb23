package router

import (
	"encoding/hex"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/pegaflow/pegaflow/internal/vllmhash"
)

// The router's hashes are vLLM's: the committed vectors vLLM 0.32 made
// (internal/vllmhash/testdata), for both algorithms, unsalted and
// salted, with the memo cold and then warm.
func TestKVHasherMatchesVLLMVectors(t *testing.T) {
	raw, err := os.ReadFile("../internal/vllmhash/testdata/vectors.json")
	require.NoError(t, err)
	var want [][]string
	require.NoError(t, json.Unmarshal(raw, &want))
	edges := []uint32{0, 1, 23, 24, 255, 256, 65535, 65536, 1<<31 - 1, 1 << 31, 1<<32 - 1, 7, 8}
	tokens := make([]uint32, 13)
	for i := range tokens {
		tokens[i] = edges[i%len(edges)]
	}
	// vectors.json's cases 0 and 3 (sha256: default seed, salt
	// "tenant-a"), 10 and 13 (the same for sha256_cbor); block size 4.
	for _, tc := range []struct {
		algo, salt string
		vector     int
	}{
		{"sha256", "", 0}, {"sha256", "tenant-a", 3}, {"sha256_cbor", "", 10}, {"sha256_cbor", "tenant-a", 13},
	} {
		t.Run(fmt.Sprintf("%s/%q", tc.algo, tc.salt), func(t *testing.T) {
			for _, memo := range []uint64{0, 1 << 20} {
				h, err := newKVHasher(tc.algo, "", 4, memo)
				require.NoError(t, err)
				require.Equal(t, want[tc.vector][0], hex.EncodeToString(h.none))
				for pass := range 2 {
					got, err := h.blockHashes(tokens, tc.salt)
					require.NoError(t, err)
					hexes := make([]string, len(got))
					for i, g := range got {
						hexes[i] = hex.EncodeToString(g)
					}
					require.Equal(t, want[tc.vector][1:], hexes, "memo %d, pass %d", memo, pass)
				}
			}
		})
	}
}

// memoPrompts are prompts sharing prefixes as chats do: a few system
// prompts, conversations growing turn by turn, salts on some.
func memoPrompts(rng *rand.Rand, n, bs int) (prompts [][]uint32, salts []string) {
	system := make([][]uint32, 3)
	for i := range system {
		system[i] = randTokens(rng, bs*(1+rng.IntN(8))+rng.IntN(bs))
	}
	var convs [][]uint32
	for range n {
		var p []uint32
		if len(convs) > 0 && rng.IntN(3) > 0 { // a follow-up turn
			c := rng.IntN(len(convs))
			p = append(append([]uint32{}, convs[c]...), randTokens(rng, rng.IntN(4*bs))...)
			convs[c] = p
		} else {
			p = append(append([]uint32{}, system[rng.IntN(len(system))]...), randTokens(rng, rng.IntN(4*bs))...)
			convs = append(convs, p)
		}
		salt := ""
		if rng.IntN(4) == 0 {
			salt = fmt.Sprint("tenant-", rng.IntN(2))
		}
		prompts, salts = append(prompts, p), append(salts, salt)
	}
	return prompts, salts
}

func randTokens(rng *rand.Rand, n int) []uint32 {
	out := make([]uint32, n)
	for i := range out {
		out[i] = uint32(rng.IntN(5)) // a tiny vocabulary: many blocks alike, under different parents
	}
	return out
}

// Never a wrong hash: prompts sharing prefixes, hashed concurrently
// through memos small enough to wrap many times, and through one whose
// index is corrupted to point every key at the wrong slot (as maphash
// collisions would), always equal the hashes computed without a memo.
func TestHashMemoNeverWrong(t *testing.T) {
	const bs = 4
	rng := rand.New(rand.NewPCG(1, 2))
	prompts, salts := memoPrompts(rng, 400, bs)
	for _, algo := range []string{"sha256", "sha256_cbor"} {
		plain, err := newKVHasher(algo, "7", bs, 0)
		require.NoError(t, err)
		want := make([][][]byte, len(prompts))
		for i, p := range prompts {
			want[i], err = plain.blockHashes(p, salts[i])
			require.NoError(t, err)
		}
		slot := uint64(2*vllmhash.HashLen + 4*bs + memoSlotOverhead)
		for _, slots := range []uint64{64, 200, 100000} {
			t.Run(fmt.Sprintf("%s/%d slots", algo, slots), func(t *testing.T) {
				h, err := newKVHasher(algo, "7", bs, slots*slot)
				require.NoError(t, err)
				require.Equal(t, int(slots), h.memo.size)
				var wg sync.WaitGroup
				for w := range 4 {
					wg.Go(func() {
						for i := w; i < len(prompts); i += 4 {
							got, err := h.blockHashes(prompts[i], salts[i])
							if !(err == nil && equalHashes(got, want[i])) {
								t.Errorf("prompt %d: wrong hashes (err %v)", i, err)
								return
							}
						}
					})
				}
				wg.Wait()
				require.LessOrEqual(t, len(h.memo.index), h.memo.size, "the index is bounded by the slots")
				h.memo.mu.Lock()
				for k, s := range h.memo.index {
					h.memo.index[k] = (s + 1) % h.memo.size
				}
				h.memo.mu.Unlock()
				for i, p := range prompts {
					got, err := h.blockHashes(p, salts[i])
					require.NoError(t, err)
					require.True(t, equalHashes(got, want[i]), "prompt %d after the index was corrupted", i)
				}
			})
		}
	}
}

func equalHashes(a, b [][]byte) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if string(a[i]) != string(b[i]) {
			return false
		}
	}
	return true
}

// A shared prefix is answered from the memo (no SHA-256) even after many
// other prompts went through: hits keep it from ageing out of the FIFO.
func TestHashMemoKeepsAHotPrefix(t *testing.T) {
	const bs = 4
	h, err := newKVHasher("sha256_cbor", "", bs, 64*uint64(2*vllmhash.HashLen+4*bs+memoSlotOverhead))
	require.NoError(t, err)
	rng := rand.New(rand.NewPCG(3, 4))
	system := randTokens(rng, 8*bs)
	for i := range 200 {
		prompt := append(append([]uint32{}, system...), uint32(1000+i), 1, 2, 3) // a new last block each time
		_, err := h.blockHashes(prompt, "")
		require.NoError(t, err)
		out := make([][]byte, 9)
		for j := range out {
			out[j] = make([]byte, vllmhash.HashLen)
		}
		hits, _ := h.memo.walk(h.none, prompt, out)
		require.Equal(t, 9, hits, "request %d: the system prompt and its own new block", i)
	}
}
