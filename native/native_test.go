package native

import (
	"bytes"
	"context"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"
)

func shmFile(t *testing.T, data []byte) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "region")
	require.NoError(t, os.WriteFile(path, data, 0o600))
	return path
}

func randomBytes(n int, seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, 1))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

func setup(t *testing.T, regionBytes []byte, poolSize uint64) (*Region, *Pool, *Copier, string) {
	t.Helper()
	path := shmFile(t, regionBytes)
	r, err := OpenShmRegion(path, uint64(len(regionBytes)))
	require.NoError(t, err)
	p, err := NewPool(poolSize, -1, -1, PoolHugePages)
	require.NoError(t, err)
	c, err := NewCopier(2)
	require.NoError(t, err)
	t.Cleanup(func() {
		require.NoError(t, c.Close())
		require.NoError(t, r.Close())
		require.NoError(t, p.Close())
	})
	return r, p, c, path
}

func TestRoundTrip(t *testing.T) {
	src := randomBytes(3<<20, 1)
	r, p, c, path := setup(t, src, 8<<20)
	ctx := context.Background()
	// Scatter three ranges (one over the 1 MiB chunk size) into the pool.
	ops := []CopyOp{{0, 4 << 20, 1000}, {1000, 100, 2 << 20}, {3<<20 - 7, 7 << 20, 7}}
	require.NoError(t, c.Copy(ctx, r, p, RegionToPool, ops))
	pool := p.Bytes()
	for _, op := range ops {
		require.True(t, bytes.Equal(src[op.RegionOffset:op.RegionOffset+op.Len], pool[op.PoolOffset:op.PoolOffset+op.Len]))
	}
	// Load back into a zeroed region at the same offsets.
	require.NoError(t, os.WriteFile(path, make([]byte, len(src)), 0o600))
	require.NoError(t, c.Copy(ctx, r, p, PoolToRegion, ops))
	got, err := os.ReadFile(path)
	require.NoError(t, err)
	for _, op := range ops {
		require.True(t, bytes.Equal(src[op.RegionOffset:op.RegionOffset+op.Len], got[op.RegionOffset:op.RegionOffset+op.Len]))
	}
}

func TestOutOfBoundsCopiesNothing(t *testing.T) {
	r, p, c, _ := setup(t, randomBytes(4096, 2), 8192)
	cases := []struct {
		name string
		op   CopyOp
	}{
		{"region offset past end", CopyOp{4097, 0, 1}},
		{"region range past end", CopyOp{4000, 0, 100}},
		{"pool range past end", CopyOp{0, 8100, 100}},
		{"length wraps", CopyOp{16, 16, ^uint64(0) - 8}},
		{"offset wraps", CopyOp{^uint64(0), 0, 2}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			// A valid op first: it must not run either.
			ops := []CopyOp{{0, 0, 64}, tc.op}
			_, err := c.Submit(r, p, RegionToPool, ops)
			require.ErrorIs(t, err, ErrRange)
			require.Equal(t, make([]byte, 64), p.Bytes()[:64])
		})
	}
	_, err := c.Submit(r, p, Direction(7), nil)
	require.ErrorIs(t, err, ErrInvalid)
	_, err = c.Submit(nil, p, RegionToPool, nil)
	require.ErrorIs(t, err, ErrInvalid)
}

func TestRegionErrors(t *testing.T) {
	path := shmFile(t, make([]byte, 100))
	_, err := OpenShmRegion(path, 101)
	require.ErrorIs(t, err, ErrRange)
	_, err = OpenShmRegion(filepath.Join(t.TempDir(), "missing"), 10)
	require.ErrorIs(t, err, ErrIO)
	_, err = OpenShmRegion(t.TempDir(), 10)
	require.ErrorIs(t, err, ErrIO, "a directory is not a region")
	_, err = OpenShmRegion(path, 0)
	require.ErrorIs(t, err, ErrInvalid)
	if Backend() == "cpu" {
		_, err = OpenCUDAIPCRegion(make([]byte, 64), 0, 100)
		require.ErrorIs(t, err, ErrNotSupported)
	}
	_, err = NewPool(0, -1, -1, 0)
	require.ErrorIs(t, err, ErrInvalid)
}

func TestCloseRegionDuringCopyIsSafe(t *testing.T) {
	src := randomBytes(32<<20, 3)
	path := shmFile(t, src)
	r, err := OpenShmRegion(path, uint64(len(src)))
	require.NoError(t, err)
	p, err := NewPool(64<<20, -1, -1, 0)
	require.NoError(t, err)
	defer p.Close()
	c, err := NewCopier(2)
	require.NoError(t, err)
	defer c.Close()
	pend, err := c.Submit(r, p, RegionToPool, []CopyOp{{0, 0, uint64(len(src))}})
	require.NoError(t, err)
	require.NoError(t, r.Close()) // while the 32 MiB copy runs
	<-pend.Done()
	require.NoError(t, pend.Err())
	require.True(t, bytes.Equal(src, p.Bytes()[:len(src)]))
	_, err = c.Submit(r, p, RegionToPool, []CopyOp{{0, 0, 1}})
	require.ErrorIs(t, err, ErrClosed)
}

func TestConcurrentSubmitsAndEmptyBatch(t *testing.T) {
	src := randomBytes(1<<20, 4)
	r, p, c, _ := setup(t, src, 64<<20)
	pend, err := c.Submit(r, p, RegionToPool, nil)
	require.NoError(t, err)
	<-pend.Done()
	require.NoError(t, pend.Err())

	var wg sync.WaitGroup
	for g := 0; g < 16; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 20; i++ {
				off := uint64(g*20+i) * 4096 * 40
				if err := c.Copy(context.Background(), r, p, RegionToPool, []CopyOp{{uint64(i) * 4096, off, 4096 * 40}}); err != nil {
					t.Error(err)
				}
			}
		}()
	}
	wg.Wait()
	pool := p.Bytes()
	for g := 0; g < 16; g++ {
		for i := 0; i < 20; i++ {
			off := (g*20 + i) * 4096 * 40
			require.True(t, bytes.Equal(src[i*4096:i*4096+4096*40], pool[off:off+4096*40]))
		}
	}
}

func TestPoolCloseRefusedWhileCopying(t *testing.T) {
	src := randomBytes(16<<20, 5)
	path := shmFile(t, src)
	r, err := OpenShmRegion(path, uint64(len(src)))
	require.NoError(t, err)
	defer r.Close()
	p, err := NewPool(16<<20, -1, -1, 0)
	require.NoError(t, err)
	c, err := NewCopier(1)
	require.NoError(t, err)
	var pends []*Pending
	for i := 0; i < 8; i++ {
		pend, err := c.Submit(r, p, RegionToPool, []CopyOp{{0, 0, 16 << 20}})
		require.NoError(t, err)
		pends = append(pends, pend)
	}
	require.ErrorIs(t, p.Close(), ErrClosed, "the pool is in use by 128 MiB of queued copies")
	// Copier.Close waits for every batch.
	require.NoError(t, c.Close())
	for _, pend := range pends {
		select {
		case <-pend.Done():
		default:
			t.Fatal("Close returned with a batch in flight")
		}
	}
	require.NoError(t, p.Close())
}

func TestCoalesce(t *testing.T) {
	got := coalesce([]CopyOp{{0, 100, 10}, {10, 110, 10}, {20, 200, 5}, {25, 205, 5}, {40, 210, 1}})
	require.Equal(t, []CopyOp{{0, 100, 20}, {20, 200, 10}, {40, 210, 1}}, got)
}
