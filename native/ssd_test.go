package native

import (
	"bytes"
	"context"
	"math/rand/v2"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/stretchr/testify/require"
)

// ssdBackends are the backends this build and kernel can run.
func ssdBackends(t testing.TB) []SSDBackend {
	out := []SSDBackend{SSDThreads}
	if SSDURingBuilt() {
		out = append(out, SSDURing)
	} else {
		t.Log("liburing not built: io_uring backend not tested")
	}
	return out
}

func newSSDEngine(t testing.TB, pool *Pool, b SSDBackend) *SSDEngine {
	e, err := NewSSDEngine(pool, b, 8)
	if b == SSDURing && err != nil {
		t.Skipf("io_uring refused here: %v", err)
	}
	require.NoError(t, err)
	require.Equal(t, b, e.Backend())
	t.Cleanup(func() { require.NoError(t, e.Close()) })
	return e
}

// newSSDPool skips the test where the build has no usable device (CUDA
// build on a machine without a GPU), as newPool does.
func newSSDPool(t testing.TB, size uint64) *Pool {
	p, err := NewPool(size, -1, -1, 0)
	if err != nil && Backend() == "cuda" {
		t.Skipf("CUDA pool unavailable: %v", err)
	}
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, p.Close()) })
	return p
}

func openSSDFile(t testing.TB, path string, capacity uint64) *SSDFile {
	f, err := OpenSSDFile(path, capacity, true, false)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, f.Close()) })
	return f
}

func TestSSDRoundTrip(t *testing.T) {
	const poolSize, fileCap = 16 << 20, 32 << 20
	for _, b := range ssdBackends(t) {
		t.Run(b.String(), func(t *testing.T) {
			pool := newSSDPool(t, poolSize)
			e := newSSDEngine(t, pool, b)
			f := openSSDFile(t, filepath.Join(t.TempDir(), "tier"), fileCap)
			t.Logf("O_DIRECT: %v, registered buffers: %v", f.Direct(), e.Registered())
			rng := rand.New(rand.NewPCG(1, uint64(b)))
			mem := pool.Bytes()
			// Random blocks of 16 KiB..2 MiB, at scattered file offsets, all in one batch.
			var ops []SSDOp
			var fileOff uint64
			for poolOff := uint64(0); ; {
				n := uint64(4+rng.IntN(509)) * SSDAlign // 16 KiB .. 2 MiB
				if poolOff+n > poolSize/2 || fileOff+n > fileCap {
					break
				}
				ops = append(ops, SSDOp{FileOffset: fileOff, PoolOffset: poolOff, Len: n})
				poolOff += n
				fileOff += n + uint64(rng.IntN(4))*SSDAlign
			}
			require.Greater(t, len(ops), 3)
			for i := range mem[:poolSize/2] {
				mem[i] = byte(rng.Uint32())
			}
			want := append([]byte(nil), mem[:poolSize/2]...)
			ctx := context.Background()
			require.NoError(t, e.Do(ctx, f, true, ops))
			// Read each block back into the pool's other half, in reverse order.
			back := make([]SSDOp, len(ops))
			for i, op := range ops {
				back[len(ops)-1-i] = SSDOp{FileOffset: op.FileOffset, PoolOffset: op.PoolOffset + poolSize/2, Len: op.Len}
			}
			require.NoError(t, e.Do(ctx, f, false, back))
			for _, op := range ops {
				require.True(t, bytes.Equal(want[op.PoolOffset:op.PoolOffset+op.Len],
					mem[poolSize/2+op.PoolOffset:poolSize/2+op.PoolOffset+op.Len]), "block at file offset %d", op.FileOffset)
			}
		})
	}
}

func TestSSDRefusesBadRequests(t *testing.T) {
	const poolSize, fileCap = 1 << 20, 1 << 20
	pool := newSSDPool(t, poolSize)
	e := newSSDEngine(t, pool, SSDThreads)
	f := openSSDFile(t, filepath.Join(t.TempDir(), "tier"), fileCap)
	many := make([]SSDOp, MaxSSDOps+1)
	for i := range many {
		many[i] = SSDOp{Len: SSDAlign}
	}
	for _, tc := range []struct {
		name string
		ops  []SSDOp
		want error
	}{
		{"empty", nil, ErrInvalid},
		{"zero length", []SSDOp{{Len: 0}}, ErrInvalid},
		{"misaligned file offset", []SSDOp{{FileOffset: 512, Len: SSDAlign}}, ErrInvalid},
		{"misaligned pool offset", []SSDOp{{PoolOffset: 100, Len: SSDAlign}}, ErrInvalid},
		{"misaligned length", []SSDOp{{Len: SSDAlign + 1}}, ErrInvalid},
		{"op too long", []SSDOp{{Len: MaxSSDOpLen + SSDAlign}}, ErrInvalid},
		{"too many ops", many, ErrInvalid},
		{"past the file", []SSDOp{{FileOffset: fileCap, Len: SSDAlign}}, ErrRange},
		{"past the pool", []SSDOp{{PoolOffset: poolSize - SSDAlign, Len: 2 * SSDAlign}}, ErrRange},
		{"wraps around", []SSDOp{{FileOffset: ^uint64(0) - SSDAlign + 1, Len: 2 * SSDAlign}}, ErrRange},
		{"one bad op fails the batch", []SSDOp{{Len: SSDAlign}, {FileOffset: fileCap, Len: SSDAlign}}, ErrRange},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, write := range []bool{false, true} {
				_, err := e.Submit(f, write, tc.ops)
				require.ErrorIs(t, err, tc.want)
			}
		})
	}
	_, err := OpenSSDFile(filepath.Join(t.TempDir(), "x"), SSDAlign+1, true, false)
	require.ErrorIs(t, err, ErrInvalid, "capacity not a multiple of 4096")
	_, err = OpenSSDFile(filepath.Join(t.TempDir(), "missing"), SSDAlign, false, false)
	require.ErrorIs(t, err, ErrIO)
	require.ErrorIs(t, err, os.ErrNotExist)
	_, err = OpenSSDFile(t.TempDir(), SSDAlign, false, false)
	require.Error(t, err, "a directory")
	_, err = NewSSDEngine(pool, SSDThreads, 0)
	require.ErrorIs(t, err, ErrInvalid)
	// A closed file and a closed engine are refused, not crashed on.
	require.NoError(t, f.Close())
	_, err = e.Submit(f, false, []SSDOp{{Len: SSDAlign}})
	require.ErrorIs(t, err, ErrClosed)
}

func TestSSDShortRead(t *testing.T) {
	for _, b := range ssdBackends(t) {
		t.Run(b.String(), func(t *testing.T) {
			pool := newSSDPool(t, 1<<20)
			e := newSSDEngine(t, pool, b)
			path := filepath.Join(t.TempDir(), "tier")
			f := openSSDFile(t, path, 1<<20)
			ctx := context.Background()
			require.NoError(t, e.Do(ctx, f, true, []SSDOp{{Len: 256 << 10}}))
			for _, size := range []int64{64 << 10, 64<<10 + 100, 0} { // aligned, unaligned, empty
				require.NoError(t, os.Truncate(path, size))
				err := e.Do(ctx, f, false, []SSDOp{{Len: 256 << 10}})
				require.ErrorIs(t, err, ErrShortRead, "file truncated to %d", size)
				require.Contains(t, err.Error(), path)
			}
		})
	}
}

// TestSSDNoSpace writes more than a tiny tmpfs holds (needs root to mount).
func TestSSDNoSpace(t *testing.T) {
	dir := t.TempDir()
	if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, "size=256k"); err != nil {
		t.Skipf("cannot mount a tmpfs (not root?): %v", err)
	}
	t.Cleanup(func() { require.NoError(t, syscall.Unmount(dir, 0)) })
	for _, b := range ssdBackends(t) {
		t.Run(b.String(), func(t *testing.T) {
			pool := newSSDPool(t, 1<<20)
			e := newSSDEngine(t, pool, b)
			path := filepath.Join(dir, "tier-"+b.String())
			f := openSSDFile(t, path, 1<<20)
			err := e.Do(context.Background(), f, true, []SSDOp{{Len: 1 << 20}})
			require.ErrorIs(t, err, ErrNoSpace)
			require.NoError(t, os.Remove(path))
		})
	}
}

func TestSSDPoolHeldByEngine(t *testing.T) {
	pool, err := NewPool(1<<20, -1, -1, 0)
	if err != nil && Backend() == "cuda" {
		t.Skipf("CUDA pool unavailable: %v", err)
	}
	require.NoError(t, err)
	e, err := NewSSDEngine(pool, SSDAuto, 4)
	require.NoError(t, err)
	require.ErrorIs(t, pool.Close(), ErrClosed, "the engine holds the pool")
	require.NoError(t, e.Close())
	require.NoError(t, e.Close())
	require.NoError(t, pool.Close())
	_, err = NewSSDEngine(pool, SSDThreads, 1)
	require.ErrorIs(t, err, ErrClosed)
}
