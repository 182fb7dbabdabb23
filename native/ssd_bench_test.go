package native

import (
	"context"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"unsafe"

	"github.com/stretchr/testify/require"
)

// 256 KiB reads of a 256 MiB file through the engine (one batch of 64
// blocks per iteration) against a plain O_DIRECT pread loop of the same
// blocks into the same pool. PEGAFLOW_BENCH_SSD_DIR puts the file on the
// device to measure (default: the test's temp dir).
const benchBlock, benchFile, benchBatch = 256 << 10, 256 << 20, 64

func benchSSDFile(b *testing.B) (*Pool, string) {
	dir := os.Getenv("PEGAFLOW_BENCH_SSD_DIR")
	if dir == "" {
		dir = b.TempDir()
	}
	pool := newSSDPool(b, benchBlock*benchBatch)
	path := filepath.Join(dir, "pegaflow-ssd-bench")
	b.Cleanup(func() { os.Remove(path) })
	f := openSSDFile(b, path, benchFile)
	e := newSSDEngine(b, pool, SSDThreads)
	for off := uint64(0); off < benchFile; off += benchBlock * benchBatch {
		ops := make([]SSDOp, benchBatch)
		for i := range ops {
			ops[i] = SSDOp{FileOffset: off + uint64(i)*benchBlock, PoolOffset: uint64(i) * benchBlock, Len: benchBlock}
		}
		require.NoError(b, e.Do(context.Background(), f, true, ops))
	}
	return pool, path
}

func benchOps(i int) []SSDOp {
	ops := make([]SSDOp, benchBatch)
	base := uint64(i*benchBatch) * benchBlock % benchFile
	for j := range ops {
		ops[j] = SSDOp{FileOffset: base + uint64(j)*benchBlock, PoolOffset: uint64(j) * benchBlock, Len: benchBlock}
	}
	return ops
}

func BenchmarkSSDRead256K(b *testing.B) {
	pool, path := benchSSDFile(b)
	for _, be := range ssdBackends(b) {
		b.Run(be.String(), func(b *testing.B) {
			e, err := NewSSDEngine(pool, be, 32)
			require.NoError(b, err)
			defer e.Close()
			f, err := OpenSSDFile(path, benchFile, false, false)
			require.NoError(b, err)
			defer f.Close()
			b.SetBytes(benchBlock * benchBatch)
			for i := 0; b.Loop(); i++ {
				require.NoError(b, e.Do(context.Background(), f, false, benchOps(i)))
			}
		})
	}
	b.Run("pread-loop", func(b *testing.B) {
		fd, err := syscall.Open(path, syscall.O_RDONLY|syscall.O_DIRECT|syscall.O_CLOEXEC, 0)
		require.NoError(b, err)
		defer syscall.Close(fd)
		mem := unsafe.Slice((*byte)(pool.base), pool.size)
		b.SetBytes(benchBlock * benchBatch)
		for i := 0; b.Loop(); i++ {
			for _, op := range benchOps(i) {
				n, err := syscall.Pread(fd, mem[op.PoolOffset:op.PoolOffset+op.Len], int64(op.FileOffset))
				if err != nil || n != benchBlock {
					b.Fatalf("pread: %d, %v", n, err)
				}
			}
		}
	})
}
