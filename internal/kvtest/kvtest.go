// Package kvtest builds vLLM-shaped KV caches in shared memory: what a CPU
// vLLM worker would hand the connector, in files the engine can map from
// another process. Tests and benchmarks fill and compare whole blocks; the
// simulator (sim) is a model server whose "GPU memory" is such a cache.
package kvtest

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	pb "github.com/pegaflow/pegaflow/engine/api/pegaflowv1"
)

// Layout names a KV tensor layout.
type Layout string

const (
	// FlashAttn is (2, num_blocks, block_size, heads, head_size): K and V
	// halves are separate, so a block is two segments.
	FlashAttn Layout = "flash_attn"
	// FlashInfer is (num_blocks, 2, block_size, heads, head_size): one
	// contiguous segment per block.
	FlashInfer Layout = "flashinfer"
	// MLA is (num_blocks, block_size, head_size): one latent per block.
	MLA Layout = "mla"
)

// Spec is the geometry of one rank's cache.
type Spec struct {
	Layout    Layout
	Layers    int
	NumBlocks int
	BlockSize int
	Heads     int
	HeadSize  int
	ElemSize  int // bytes per element (2 for bf16)
}

// TokenBytes is one token's share of a segment: its K or V (or latent) in
// one layer.
func (s Spec) TokenBytes() int {
	if s.Layout == MLA {
		return s.HeadSize * s.ElemSize
	}
	return s.Heads * s.HeadSize * s.ElemSize
}

// SegmentBytes is the size of one block segment (K or V, or the latent).
func (s Spec) SegmentBytes() int { return s.BlockSize * s.TokenBytes() }

// BlockBytes is one rank's share of a block over all layers.
func (s Spec) BlockBytes() int {
	if s.Layout == MLA {
		return s.Layers * s.SegmentBytes()
	}
	return s.Layers * 2 * s.SegmentBytes()
}

// LayerBytes is the size of one layer's tensor: the region registered for
// it.
func (s Spec) LayerBytes() int {
	if s.Layout == MLA {
		return s.NumBlocks * s.SegmentBytes()
	}
	return 2 * s.NumBlocks * s.SegmentBytes()
}

// Cache is one rank's KV cache: one shared-memory file per layer, as vLLM
// allocates one tensor per layer.
type Cache struct {
	Spec  Spec
	Paths []string
	data  [][]byte
	// files are the open layer files of a cache from NewUnnamed (nil for
	// New): they have no name but while Named runs.
	files []*os.File
	// named: Named has linked files, which the kernel links only once
	// (an unnamed file loses its linkability with its first name): the
	// next Named needs Renew first.
	named bool
}

// ShmDir is where caches live: /dev/shm when present.
func ShmDir() string {
	if fi, err := os.Stat("/dev/shm"); err == nil && fi.IsDir() {
		return "/dev/shm"
	}
	return os.TempDir()
}

// New creates zeroed cache files named prefix-L<n> under dir. A file that
// exists already is an error, never truncated: another process may have it
// mapped, and shrinking it under that mapping would make it fault.
func New(dir, prefix string, spec Spec) (*Cache, error) {
	return create(dir, prefix, spec, false)
}

// NewUnnamed is New for a long-lived process: the files are created
// without a name (O_TMPFILE) and get their Paths only while Named runs
// (a registration: the engine opens them by path, then holds its own
// mapping). A process killed at any other moment, even by SIGKILL, leaves
// nothing in dir. Where dir cannot hold unnamed files (hugetlbfs, old
// kernels) it is New: named files that Close removes.
func NewUnnamed(dir, prefix string, spec Spec) (*Cache, error) {
	c, err := create(dir, prefix, spec, true)
	if errors.Is(err, errNoTmpfile) {
		return create(dir, prefix, spec, false)
	}
	return c, err
}

var errNoTmpfile = errors.New("directory holds no unnamed files")

func create(dir, prefix string, spec Spec, unnamed bool) (*Cache, error) {
	if spec.ElemSize == 0 {
		spec.ElemSize = 2
	}
	c := &Cache{Spec: spec}
	size := spec.LayerBytes()
	for l := 0; l < spec.Layers; l++ {
		path := filepath.Join(dir, fmt.Sprintf("%s-L%d", prefix, l))
		f, err := createFile(dir, path, unnamed)
		if err != nil {
			c.Close()
			return nil, err
		}
		if !unnamed {
			c.Paths = append(c.Paths, path) // ours now: Close removes it
		}
		err = f.Truncate(int64(size))
		var mem []byte
		if err == nil {
			mem, err = syscall.Mmap(int(f.Fd()), 0, size, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_SHARED)
		}
		if err != nil {
			f.Close()
			c.Close()
			return nil, fmt.Errorf("KV cache %s: %w", path, err)
		}
		c.data = append(c.data, mem)
		if unnamed {
			c.Paths = append(c.Paths, path)
			c.files = append(c.files, f)
		} else {
			f.Close()
		}
	}
	return c, nil
}

func createFile(dir, path string, unnamed bool) (*os.File, error) {
	if !unnamed {
		f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			return nil, fmt.Errorf("KV cache: %w", err)
		}
		return f, nil
	}
	// Without O_EXCL, so that Named can link it into dir.
	fd, err := unix.Open(dir, unix.O_TMPFILE|unix.O_RDWR|unix.O_CLOEXEC, 0o600)
	switch {
	case errors.Is(err, unix.EOPNOTSUPP), errors.Is(err, unix.EISDIR), errors.Is(err, unix.EINVAL):
		return nil, fmt.Errorf("KV cache in %s: %w (%w)", dir, errNoTmpfile, err)
	case err != nil:
		return nil, fmt.Errorf("KV cache in %s: %w", dir, err)
	}
	return os.NewFile(uintptr(fd), path), nil
}

// Named runs fn (a registration) with the files of a cache from
// NewUnnamed linked at Paths, and unlinks them when fn returns. With a
// cache from New, whose files keep their names, it only runs fn. A cache
// named before must be Renewed first. Not concurrent with itself, Renew
// or Close.
func (c *Cache) Named(fn func() error) error {
	if c.files != nil && c.named {
		return errors.New("KV cache: named before: Renew it first")
	}
	var linked []string
	defer func() {
		for _, p := range linked {
			_ = os.Remove(p)
		}
	}()
	for i, f := range c.files {
		if err := link(f, c.Paths[i]); err != nil {
			return fmt.Errorf("KV cache: name %s: %w", c.Paths[i], err)
		}
		c.named = true
		linked = append(linked, c.Paths[i])
	}
	return fn()
}

// Renew gives a cache from NewUnnamed that was named before fresh unnamed
// files holding the same bytes, mapped at the same addresses (slices of
// Layer stay valid), so that Named can name them again: a re-registration
// with a restarted engine. A no-op otherwise. The caller keeps every
// writer of the cache out while it runs: a write between a layer's copy
// and its remap would be lost.
func (c *Cache) Renew() error {
	if c.files == nil || !c.named {
		return nil
	}
	for i, old := range c.files {
		mem := c.data[i]
		f, err := createFile(filepath.Dir(c.Paths[i]), c.Paths[i], true)
		if err != nil {
			return err
		}
		err = f.Truncate(int64(len(mem)))
		if err == nil {
			_, err = f.WriteAt(mem, 0)
		}
		if err == nil {
			_, err = unix.MmapPtr(int(f.Fd()), 0, unsafe.Pointer(&mem[0]), uintptr(len(mem)),
				unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_FIXED)
		}
		if err != nil {
			f.Close()
			return fmt.Errorf("KV cache: renew %s: %w", c.Paths[i], err)
		}
		old.Close()
		c.files[i] = f
	}
	c.named = false
	return nil
}

// link gives an unnamed (O_TMPFILE) file the name path. Through
// /proc/self/fd, as an unprivileged process may; AT_EMPTY_PATH, the
// direct way, needs CAP_DAC_READ_SEARCH on older kernels.
func link(f *os.File, path string) error {
	err := unix.Linkat(unix.AT_FDCWD, fmt.Sprintf("/proc/self/fd/%d", f.Fd()), unix.AT_FDCWD, path, unix.AT_SYMLINK_FOLLOW)
	if err != nil && !errors.Is(err, unix.EEXIST) {
		if err2 := unix.Linkat(int(f.Fd()), "", unix.AT_FDCWD, path, unix.AT_EMPTY_PATH); err2 == nil {
			return nil
		}
	}
	return err
}

// Close unmaps the files and removes them (a cache from NewUnnamed has
// no names to remove: closing its files frees them once the engine, too,
// has let go).
func (c *Cache) Close() {
	for _, m := range c.data {
		_ = syscall.Munmap(m)
	}
	if c.files == nil {
		for _, p := range c.Paths {
			_ = os.Remove(p)
		}
	}
	for _, f := range c.files {
		_ = f.Close()
	}
	c.data, c.Paths, c.files = nil, nil, nil
}

// Layer is the mapping of layer l: the bytes of region l as registered.
func (c *Cache) Layer(l int) []byte { return c.data[l] }

// NumSegments is how many segments a block has per layer: 2 (K and V) for
// FlashAttn, else 1.
func (s Spec) NumSegments() int {
	if s.Layout == FlashAttn {
		return 2
	}
	return 1
}

// Segment returns segment i (0 K, 1 V for FlashAttn) of block b in layer l,
// without allocating: for per-token loops.
func (c *Cache) Segment(l, b, i int) []byte {
	seg := c.Spec.SegmentBytes()
	mem := c.data[l]
	switch c.Spec.Layout {
	case FlashAttn:
		off := i*c.Spec.NumBlocks*seg + b*seg
		return mem[off : off+seg]
	case FlashInfer:
		return mem[b*2*seg : (b+1)*2*seg]
	default:
		return mem[b*seg : (b+1)*seg]
	}
}

// Segments returns the byte slices of block b in layer l (K then V).
func (c *Cache) Segments(l, b int) [][]byte {
	out := make([][]byte, c.Spec.NumSegments())
	for i := range out {
		out[i] = c.Segment(l, b, i)
	}
	return out
}

// BlockBytes concatenates block b over all layers and segments.
func (c *Cache) BlockBytes(b int) []byte {
	out := make([]byte, 0, c.Spec.BlockBytes())
	for l := range c.data {
		for _, s := range c.Segments(l, b) {
			out = append(out, s...)
		}
	}
	return out
}

// Fill writes seeded random bytes into block b.
func (c *Cache) Fill(b int, seed uint64) {
	r := rand.New(rand.NewPCG(seed, uint64(b)))
	for l := range c.data {
		for _, s := range c.Segments(l, b) {
			for i := range s {
				s[i] = byte(r.Uint32())
			}
		}
	}
}

// Equal reports whether block b of c equals block ob of o.
func (c *Cache) Equal(b int, o *Cache, ob int) bool {
	return bytes.Equal(c.BlockBytes(b), o.BlockBytes(ob))
}

// Namespace is a namespace descriptor matching the spec.
func (s Spec) Namespace(model string, tp int) *pb.Namespace {
	return &pb.Namespace{
		Model: model, Dtype: "bfloat16", KvLayout: string(s.Layout), BlockSize: uint32(s.BlockSize),
		TpSize: uint32(tp), NumLayers: uint32(s.Layers), NumKvHeads: uint32(s.Heads), HeadSize: uint32(s.HeadSize),
		HashAlgo: "sha256_cbor", HashSeedFingerprint: []byte("seed-0"),
	}
}

// RegisterRequest describes the cache for the engine.
func (c *Cache) RegisterRequest(instanceID string, rank int, ns *pb.Namespace) *pb.RegisterRequest {
	req := &pb.RegisterRequest{InstanceId: instanceID, Rank: uint32(rank), Namespace: ns, NumBlocks: uint32(c.Spec.NumBlocks)}
	seg := uint64(c.Spec.SegmentBytes())
	for l, p := range c.Paths {
		req.Regions = append(req.Regions, &pb.MemoryRegion{Source: &pb.MemoryRegion_ShmPath{ShmPath: p}, Size: uint64(c.Spec.LayerBytes())})
		// vLLM's name for the layer's attention module.
		layer := &pb.LayerLayout{Name: fmt.Sprintf("model.layers.%d.self_attn.attn", l), RegionIndex: uint32(l)}
		switch c.Spec.Layout {
		case FlashAttn:
			layer.Segments = []*pb.Segment{
				{Offset: 0, Stride: seg, Length: seg},
				{Offset: uint64(c.Spec.NumBlocks) * seg, Stride: seg, Length: seg},
			}
		case FlashInfer:
			layer.Segments = []*pb.Segment{{Offset: 0, Stride: 2 * seg, Length: 2 * seg}}
		default:
			layer.Segments = []*pb.Segment{{Offset: 0, Stride: seg, Length: seg}}
		}
		req.Layers = append(req.Layers, layer)
	}
	return req
}

// Hashes returns n distinct deterministic 32-byte block hashes for a
// "prompt" named by seed.
func Hashes(seed string, n int) [][]byte {
	out := make([][]byte, n)
	for i := range out {
		h := make([]byte, 32)
		copy(h, fmt.Sprintf("%s/%d", seed, i))
		out[i] = h
	}
	return out
}

// TempShmDir is a fresh directory under ShmDir for one test's caches,
// removed when the test ends. The engine accepts only shared-memory files
// beneath its shm directory (/dev/shm by default), so caches a test
// registers live here, not in t.TempDir().
func TempShmDir(tb testing.TB) string {
	tb.Helper()
	dir, err := os.MkdirTemp(ShmDir(), "pegaflow-test-")
	if err != nil {
		tb.Fatalf("shm temp dir: %v", err)
	}
	tb.Cleanup(func() { _ = os.RemoveAll(dir) })
	return dir
}
