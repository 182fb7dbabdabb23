package router

import (
	"testing"

	"github.com/pegaflow/pegaflow/internal/vllmhash"
)

// BenchmarkHashMemoWalk: a 32K-token prompt's 2048 blocks answered by
// the memo (the warm path's floor).
func BenchmarkHashMemoWalk(b *testing.B) {
	h, err := newKVHasher("sha256", "", 16, 64<<20)
	if err != nil {
		b.Fatal(err)
	}
	ids := make([]uint32, 32<<10)
	for i := range ids {
		ids[i] = uint32(i*7919) % 151936
	}
	if _, err := h.blockHashes(ids, ""); err != nil {
		b.Fatal(err)
	}
	out := make([][]byte, len(ids)/16)
	for i := range out {
		out[i] = make([]byte, vllmhash.HashLen)
	}
	for b.Loop() {
		if n, _ := h.memo.walk(h.none, ids, out); n != len(out) {
			b.Fatal(n)
		}
	}
}
