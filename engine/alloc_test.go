package engine

import (
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestAllocatorReusesAndCoalesces(t *testing.T) {
	a := newAllocator(4096)
	var exts []extent
	for i := 0; i < 16; i++ {
		e, ok := a.alloc(256)
		require.True(t, ok)
		exts = append(exts, e)
	}
	_, ok := a.alloc(1)
	require.False(t, ok, "pool is full")
	// Free two neighbours in the middle: a 512-byte block fits only after
	// coalescing.
	a.release(exts[4])
	a.release(exts[5])
	e, ok := a.alloc(512)
	require.True(t, ok)
	require.Equal(t, exts[4].off, e.off)
	require.Equal(t, uint64(4096), a.used)
	// Freeing everything returns the whole pool.
	a.release(e)
	for i, x := range exts {
		if i != 4 && i != 5 {
			a.release(x)
		}
	}
	require.Zero(t, a.used)
	big, ok := a.alloc(4096)
	require.True(t, ok)
	require.Zero(t, big.off)
}

func TestAllocatorRandomNoOverlap(t *testing.T) {
	const capacity = 1 << 20
	a := newAllocator(capacity)
	r := rand.New(rand.NewPCG(1, 2))
	live := map[uint64]extent{}
	for i := 0; i < 5000; i++ {
		if r.IntN(3) > 0 || len(live) == 0 {
			size := uint64(256 * (1 + r.IntN(16)))
			if e, ok := a.alloc(size); ok {
				require.LessOrEqual(t, e.off+e.size, uint64(capacity))
				for _, o := range live {
					require.False(t, e.off < o.off+o.size && o.off < e.off+e.size, "overlap %v %v", e, o)
				}
				live[e.off] = e
			}
			continue
		}
		for off, e := range live {
			a.release(e)
			delete(live, off)
			break
		}
	}
	var used uint64
	for _, e := range live {
		used += e.size
	}
	require.Equal(t, used, a.used)
}
