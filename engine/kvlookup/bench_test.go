package kvlookup

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/pegaflow/pegaflow/internal/kvtest"
)

// BenchmarkLookup: one lookup of a prompt's hashes (8K and 32K tokens at
// block size 16) in process and over the peer API on loopback, every
// block held (the longest scan).
func BenchmarkLookup(b *testing.B) {
	for _, n := range []int{512, 2048} {
		hashes := kvtest.Hashes("bench", n)
		for _, where := range []string{"local", "remote"} {
			b.Run(fmt.Sprintf("%s/%dK", where, n*16>>10), func(b *testing.B) {
				sp := spec
				sp.BlockSize, sp.NumBlocks, sp.Layers = 16, n, 1
				eng := engineOf(b, sp, hashes, n)
				cfg := Config{Local: eng, Token: token}
				addr := "" // the engine in process
				if where == "remote" {
					addr, _ = serve(b, eng, "127.0.0.1:0")
					cfg = Config{Token: token, Timeout: time.Minute}
				}
				x := New(cfg)
				defer x.Close()
				q := query(hashes)
				q.BlockSize = 16
				ctx := context.Background()
				b.ReportAllocs()
				for b.Loop() {
					if got, err := x.Lookup(ctx, addr, q); err != nil || got != n {
						b.Fatal(got, err)
					}
				}
			})
		}
	}
}
