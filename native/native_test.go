package native

import (
	"bytes"
	"context"
	"errors"
	"math"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/debug"
	"sync"
	"syscall"
	"testing"
	"time"

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

// newPool skips the test where the build has no usable device (CUDA build
// on a machine without a GPU).
func newPool(t *testing.T, size uint64, flags PoolFlags) *Pool {
	t.Helper()
	p, err := NewPool(size, -1, 0, flags)
	if err != nil && Backend() == "cuda" {
		t.Skipf("CUDA pool unavailable: %v", err)
	}
	require.NoError(t, err)
	return p
}

type fixture struct {
	r    *Region
	p    *Pool
	c    *Copier
	path string
}

func setup(t *testing.T, regionBytes []byte, poolSize uint64, threads int) fixture {
	t.Helper()
	path := shmFile(t, regionBytes)
	r, err := OpenShmRegion(path, uint64(len(regionBytes)))
	require.NoError(t, err)
	p := newPool(t, poolSize, PoolHugePages)
	c, err := NewCopier(threads)
	require.NoError(t, err)
	t.Cleanup(func() {
		require.NoError(t, c.Close())
		require.NoError(t, r.Close())
		require.NoError(t, p.Close())
	})
	return fixture{r, p, c, path}
}

func wait(t *testing.T, p *Pending) error {
	t.Helper()
	select {
	case <-p.Done():
		return p.Err()
	case <-time.After(30 * time.Second):
		t.Fatal("batch did not complete")
		return nil
	}
}

func TestRoundTrip(t *testing.T) {
	src := randomBytes(5<<20, 1)
	f := setup(t, src, 16<<20, 2)
	ctx := context.Background()
	// Small, chunk-crossing (> 1 MiB slices) and tiny ops, plus 64 adjacent
	// 4 KiB blocks that coalesce into one op and 64 scattered ones.
	ops := []CopyOp{{0, 8 << 20, 1000}, {1000, 100, 3<<20 + 5}, {5<<20 - 7, 15 << 20, 7}}
	for i := range uint64(64) {
		ops = append(ops, CopyOp{4<<20 + i*4096, 12<<20 + i*4096, 4096})
		ops = append(ops, CopyOp{4<<20 + (63-i)*4096, 13<<20 + i*8192, 4096})
	}
	require.NoError(t, f.c.Copy(ctx, f.r, f.p, RegionToPool, ops))
	pool := f.p.Bytes()
	for _, op := range ops {
		require.Equal(t, src[op.RegionOffset:op.RegionOffset+op.Len], pool[op.PoolOffset:op.PoolOffset+op.Len])
	}
	// Load back into a zeroed region at the same offsets.
	require.NoError(t, os.WriteFile(f.path, make([]byte, len(src)), 0o600))
	require.NoError(t, f.c.Copy(ctx, f.r, f.p, PoolToRegion, ops))
	got, err := os.ReadFile(f.path)
	require.NoError(t, err)
	want := make([]byte, len(src))
	for _, op := range ops {
		copy(want[op.RegionOffset:op.RegionOffset+op.Len], src[op.RegionOffset:op.RegionOffset+op.Len])
	}
	require.True(t, bytes.Equal(want, got), "region after load differs")
}

func TestBoundsViolationsCopyNothing(t *testing.T) {
	const regionSize, poolSize = 4096, 8192
	src := randomBytes(regionSize, 2)
	f := setup(t, src, poolSize, 2)
	cases := []struct {
		name string
		ops  []CopyOp
	}{
		{"region offset past end", []CopyOp{{regionSize + 1, 0, 0}}},
		{"region range past end", []CopyOp{{4000, 0, 97}}},
		{"pool offset past end", []CopyOp{{0, poolSize + 1, 1}}},
		{"pool range past end", []CopyOp{{0, 8100, 93}}},
		{"length past both", []CopyOp{{0, 0, regionSize + 1}}},
		{"length wraps", []CopyOp{{16, 16, math.MaxUint64 - 8}}},
		{"region offset wraps", []CopyOp{{math.MaxUint64, 0, 2}}},
		{"pool offset wraps", []CopyOp{{0, math.MaxUint64 - 1, 4}}},
		// Adjacent ops whose merged length would wrap to a small value.
		{"merged length wraps", []CopyOp{{0, 0, 1 << 63}, {1 << 63, 1 << 63, 1 << 63}}},
	}
	for _, tc := range cases {
		for _, dir := range []Direction{RegionToPool, PoolToRegion} {
			t.Run(tc.name, func(t *testing.T) {
				// A valid op first: it must not run either.
				ops := append([]CopyOp{{0, 0, 64}}, tc.ops...)
				_, err := f.c.Submit(f.r, f.p, dir, ops)
				require.ErrorIs(t, err, ErrRange)
				require.Equal(t, make([]byte, poolSize), f.p.Bytes(), "pool changed")
				got, err := os.ReadFile(f.path)
				require.NoError(t, err)
				require.Equal(t, src, got, "region changed")
			})
		}
	}
	_, err := f.c.Submit(f.r, f.p, Direction(7), nil)
	require.ErrorIs(t, err, ErrInvalid)
	_, err = f.c.Submit(nil, f.p, RegionToPool, nil)
	require.ErrorIs(t, err, ErrInvalid)
	_, err = f.c.Submit(f.r, nil, RegionToPool, nil)
	require.ErrorIs(t, err, ErrInvalid)
}

// openFile opens path and maps it with OpenShmRegionFile (closing both).
func openFile(t *testing.T, path string, size uint64) error {
	t.Helper()
	f, err := os.Open(path)
	require.NoError(t, err)
	defer f.Close()
	r, err := OpenShmRegionFile(f, size)
	if err == nil {
		require.NoError(t, r.Close())
	}
	return err
}

func TestOpenShmRegionFile(t *testing.T) {
	data := randomBytes(4096, 3)
	f, err := os.OpenFile(shmFile(t, data), os.O_RDWR, 0)
	require.NoError(t, err)
	r, err := OpenShmRegionFile(f, uint64(len(data)))
	require.NoError(t, err)
	require.NoError(t, f.Close(), "the fd stays the caller's")
	defer r.Close()
	p := newPool(t, 1<<20, 0)
	c, err := NewCopier(1)
	require.NoError(t, err)
	defer c.Close()
	require.NoError(t, c.Copy(context.Background(), r, p, RegionToPool, []CopyOp{{RegionOffset: 0, PoolOffset: 512, Len: 4096}}))
	require.Equal(t, data, p.Bytes()[512:512+4096], "the mapping outlives the closed fd")
}

func TestConstructorErrors(t *testing.T) {
	path := shmFile(t, make([]byte, 100))
	cases := []struct {
		name string
		fn   func() error
		want error
	}{
		{"region larger than file", func() error { _, err := OpenShmRegion(path, 101); return err }, ErrRange},
		{"missing file", func() error { _, err := OpenShmRegion(filepath.Join(t.TempDir(), "missing"), 10); return err }, ErrIO},
		{"directory", func() error { _, err := OpenShmRegion(t.TempDir(), 10); return err }, ErrIO},
		{"empty path", func() error { _, err := OpenShmRegion("", 10); return err }, ErrInvalid},
		{"zero-size region", func() error { _, err := OpenShmRegion(path, 0); return err }, ErrInvalid},
		{"file: region larger than file", func() error { return openFile(t, path, 101) }, ErrRange},
		{"file: directory", func() error { return openFile(t, t.TempDir(), 10) }, ErrIO},
		{"file: zero-size region", func() error { return openFile(t, path, 0) }, ErrInvalid},
		{"zero-size pool", func() error { _, err := NewPool(0, -1, -1, 0); return err }, ErrInvalid},
		{"unknown pool flag", func() error { _, err := NewPool(4096, -1, -1, 1<<7); return err }, ErrInvalid},
		{"no copy threads", func() error { _, err := NewCopier(0); return err }, ErrInvalid},
		{"too many copy threads", func() error { _, err := NewCopier(100000); return err }, ErrInvalid},
	}
	if Backend() == "cpu" {
		cases = append(cases, struct {
			name string
			fn   func() error
			want error
		}{"IPC on CPU", func() error { _, err := OpenCUDAIPCRegion(make([]byte, 64), 0, 100); return err }, ErrNotSupported})
	} else {
		cases = append(cases, struct {
			name string
			fn   func() error
			want error
		}{"IPC handle of wrong length", func() error { _, err := OpenCUDAIPCRegion(make([]byte, 7), 0, 100); return err }, ErrInvalid})
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			require.ErrorIs(t, tc.fn(), tc.want)
		})
	}
}

func TestErrorMapping(t *testing.T) {
	for code, want := range map[int64]error{
		-1: ErrInvalid, -2: ErrRange, -3: ErrNoMem, -4: ErrIO, -5: ErrNotSupported, -6: ErrClosed, -7: ErrCopy, -8: ErrNoDevice, -99: ErrCopy,
	} {
		require.ErrorIs(t, codeErr(code, "x"), want, "code %d", code)
	}
	require.NoError(t, codeErr(0, "x"))
}

func TestDeviceUUIDAndEventArgs(t *testing.T) {
	const zero = "GPU-00000000-0000-0000-0000-000000000000"
	for _, bad := range []string{"", "GPU-", "GPU-xyz", zero[:20], zero + "0", "GPU-0000000z-0000-0000-0000-000000000000"} {
		_, err := CUDADeviceByUUID(bad)
		require.ErrorIs(t, err, ErrInvalid, "uuid %q", bad)
	}
	_, err := OpenCUDAIPCEvent(make([]byte, 7), 0)
	require.ErrorIs(t, err, ErrInvalid)
	_, err = OpenCUDAIPCEvent(nil, 0)
	require.ErrorIs(t, err, ErrInvalid)
	dev, err := CUDADeviceByUUID(zero)
	require.Equal(t, -1, dev)
	if Backend() == "cpu" {
		require.ErrorIs(t, err, ErrNotSupported)
		_, err = OpenCUDAIPCEvent(make([]byte, 64), 0)
		require.ErrorIs(t, err, ErrNotSupported)
	} else {
		// ErrNoDevice with a GPU, ErrIO without one: never a match.
		require.True(t, errors.Is(err, ErrNoDevice) || errors.Is(err, ErrIO), "%v", err)
		_, err = OpenCUDAIPCEvent(make([]byte, 64), 0) // names no event
		require.ErrorIs(t, err, ErrIO)
	}
	// A closed (or never opened) event is refused before any copy.
	f := setup(t, randomBytes(4096, 1), 8192, 1)
	_, err = f.c.SubmitAfter(f.r, f.p, RegionToPool, []CopyOp{{0, 0, 64}}, &Event{})
	require.ErrorIs(t, err, ErrClosed)
	require.NoError(t, (&Event{}).Close())
	// No event: the same as Submit.
	pend, err := f.c.SubmitAfter(f.r, f.p, RegionToPool, []CopyOp{{0, 0, 64}}, nil)
	require.NoError(t, err)
	require.NoError(t, wait(t, pend))
}

func TestCloseRegionDuringCopyIsSafe(t *testing.T) {
	src := randomBytes(32<<20, 3)
	path := shmFile(t, src)
	r, err := OpenShmRegion(path, uint64(len(src)))
	require.NoError(t, err)
	p := newPool(t, 64<<20, 0)
	defer p.Close()
	c, err := NewCopier(2)
	require.NoError(t, err)
	defer c.Close()
	pend, err := c.Submit(r, p, RegionToPool, []CopyOp{{0, 0, uint64(len(src))}})
	require.NoError(t, err)
	require.NoError(t, r.Close()) // while the 32 MiB copy runs
	require.NoError(t, os.Remove(path))
	require.NoError(t, wait(t, pend))
	require.True(t, bytes.Equal(src, p.Bytes()[:len(src)]))
	_, err = c.Submit(r, p, RegionToPool, []CopyOp{{0, 0, 1}})
	require.ErrorIs(t, err, ErrClosed)
	require.Equal(t, uint64(len(src)), r.Size())
	require.NoError(t, r.Close(), "second close is a no-op")
}

func TestConcurrentSubmits(t *testing.T) {
	const goroutines, perG, blk = 16, 20, 40 * 4096
	src := randomBytes(1<<20, 4)
	f := setup(t, src, goroutines*perG*blk, 2)
	var wg sync.WaitGroup
	for g := range goroutines {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range perG {
				op := CopyOp{uint64(i) * 4096, uint64(g*perG+i) * blk, blk}
				var err error
				if i%2 == 0 {
					err = f.c.Copy(context.Background(), f.r, f.p, RegionToPool, []CopyOp{op})
				} else {
					var pend *Pending
					if pend, err = f.c.Submit(f.r, f.p, RegionToPool, []CopyOp{op}); err == nil {
						<-pend.Done()
						err = pend.Err()
					}
				}
				if err != nil {
					t.Error(err)
				}
			}
		}()
	}
	wg.Wait()
	pool := f.p.Bytes()
	for g := range goroutines {
		for i := range perG {
			off := (g*perG + i) * blk
			require.True(t, bytes.Equal(src[i*4096:i*4096+blk], pool[off:off+blk]), "goroutine %d copy %d", g, i)
		}
	}
}

func TestEmptyBatchAndCanceledContext(t *testing.T) {
	f := setup(t, randomBytes(4096, 5), 4096, 1)
	for _, ops := range [][]CopyOp{nil, {}, {{0, 0, 0}, {10, 10, 0}}} {
		pend, err := f.c.Submit(f.r, f.p, RegionToPool, ops)
		require.NoError(t, err)
		require.NoError(t, wait(t, pend))
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	require.ErrorIs(t, f.c.Copy(ctx, f.r, f.p, RegionToPool, []CopyOp{{0, 0, 4096}}), context.Canceled)
	require.Equal(t, make([]byte, 4096), f.p.Bytes(), "a canceled Copy must not start")
}

func TestCopierCloseWaits(t *testing.T) {
	src := randomBytes(16<<20, 6)
	path := shmFile(t, src)
	r, err := OpenShmRegion(path, uint64(len(src)))
	require.NoError(t, err)
	defer r.Close()
	p := newPool(t, 16<<20, 0)
	c, err := NewCopier(1)
	require.NoError(t, err)
	var pends []*Pending
	for range 8 {
		pend, err := c.Submit(r, p, RegionToPool, []CopyOp{{0, 0, 16 << 20}})
		require.NoError(t, err)
		pends = append(pends, pend)
	}
	// 128 MiB of queued copies on one thread: the pool is in use. (If the
	// machine was fast enough to finish them already, Close succeeds, which
	// is equally correct; the C test covers the refusal deterministically.)
	if err := p.Close(); err != nil {
		require.ErrorIs(t, err, ErrClosed)
		require.NotNil(t, p.Bytes(), "a refused Close keeps the pool")
	}
	// Concurrent Closes all wait for every batch.
	var wg sync.WaitGroup
	for range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := c.Close(); err != nil {
				t.Error(err)
			}
			for _, pend := range pends {
				select {
				case <-pend.Done():
				default:
					t.Error("Close returned with a batch in flight")
				}
			}
		}()
	}
	wg.Wait()
	for _, pend := range pends {
		require.NoError(t, pend.Err())
	}
	_, err = c.Submit(r, p, RegionToPool, nil)
	require.ErrorIs(t, err, ErrClosed)
	require.NoError(t, p.Close())
	require.Nil(t, p.Bytes())
	require.NoError(t, p.Close(), "second close is a no-op")
	_, err = c.Submit(r, p, RegionToPool, nil)
	require.ErrorIs(t, err, ErrClosed)
}

func TestSubmitOnClosedPool(t *testing.T) {
	path := shmFile(t, make([]byte, 4096))
	r, err := OpenShmRegion(path, 4096)
	require.NoError(t, err)
	defer r.Close()
	p := newPool(t, 4096, 0)
	c, err := NewCopier(1)
	require.NoError(t, err)
	defer c.Close()
	require.NoError(t, p.Close())
	_, err = c.Submit(r, p, RegionToPool, []CopyOp{{0, 0, 1}})
	require.ErrorIs(t, err, ErrClosed)
}

// A producer that shrinks its shared-memory file under the engine must
// fail the copy, not kill the process, and Go's own fault handling must
// keep working next to the native SIGBUS guard.
func TestTruncatedRegionFailsCopy(t *testing.T) {
	const size = 1 << 20
	f := setup(t, randomBytes(size, 7), size, 2)
	require.NoError(t, os.Truncate(f.path, 0))
	for _, dir := range []Direction{RegionToPool, PoolToRegion, RegionToPool} {
		err := f.c.Copy(context.Background(), f.r, f.p, dir, []CopyOp{{0, 0, size}})
		require.ErrorIs(t, err, ErrCopy)
	}
	// Go code touching a truncated mapping still gets Go's fault panic.
	fd, err := os.OpenFile(f.path, os.O_RDWR, 0)
	require.NoError(t, err)
	defer fd.Close()
	require.NoError(t, fd.Truncate(4096))
	m, err := syscall.Mmap(int(fd.Fd()), 0, 8192, syscall.PROT_READ, syscall.MAP_SHARED)
	require.NoError(t, err)
	defer syscall.Munmap(m)
	require.Panics(t, func() {
		old := debug.SetPanicOnFault(true)
		defer debug.SetPanicOnFault(old)
		_ = bytes.IndexByte(m[4096:], 1) // a real load; `_ = m[i]` is elided
	})
}

func TestCoalesce(t *testing.T) {
	cases := []struct {
		name     string
		in, want []CopyOp
	}{
		{"empty", nil, nil},
		{"one", []CopyOp{{1, 2, 3}}, []CopyOp{{1, 2, 3}}},
		{"mixed", []CopyOp{{0, 100, 10}, {10, 110, 10}, {20, 200, 5}, {25, 205, 5}, {40, 210, 1}},
			[]CopyOp{{0, 100, 20}, {20, 200, 10}, {40, 210, 1}}},
		{"adjacent in region only", []CopyOp{{0, 0, 8}, {8, 16, 8}}, []CopyOp{{0, 0, 8}, {8, 16, 8}}},
		{"length would wrap", []CopyOp{{0, 0, 1 << 63}, {1 << 63, 1 << 63, 1 << 63}},
			[]CopyOp{{0, 0, 1 << 63}, {1 << 63, 1 << 63, 1 << 63}}},
		{"end wraps to next offset", []CopyOp{{math.MaxUint64 - 4, 0, 10}, {5, 10, 1}},
			[]CopyOp{{math.MaxUint64 - 4, 0, 10}, {5, 10, 1}}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			require.Equal(t, tc.want, coalesce(tc.in))
		})
	}
}

// The C boundary test: NULL and invalid arguments to every entry point,
// which Go cannot express. Built by CMake next to the library.
func TestCBoundary(t *testing.T) {
	bin := filepath.Join("..", "build", nativeBuildDir, "pf_c_api_test")
	if _, err := os.Stat(bin); err != nil {
		t.Fatalf("%s missing (run `make native`): %v", bin, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin)
	cmd.Env = append(os.Environ(), "TMPDIR="+t.TempDir())
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "%s", out)
	require.Contains(t, string(out), " 0 failed")
}
