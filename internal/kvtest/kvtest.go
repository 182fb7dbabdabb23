// Package kvtest builds vLLM-shaped KV caches in shared memory: what a CPU
// vLLM worker would hand the connector, in files the engine can map from
// another process. Tests and benchmarks fill and compare whole blocks; the
// simulator (sim) is a model server whose "GPU memory" is such a cache.
package kvtest

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"syscall"
	"testing"

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
	if spec.ElemSize == 0 {
		spec.ElemSize = 2
	}
	c := &Cache{Spec: spec}
	size := spec.LayerBytes()
	for l := 0; l < spec.Layers; l++ {
		path := filepath.Join(dir, fmt.Sprintf("%s-L%d", prefix, l))
		f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			c.Close()
			return nil, fmt.Errorf("KV cache: %w", err)
		}
		c.Paths = append(c.Paths, path) // ours now: Close removes it
		err = f.Truncate(int64(size))
		var mem []byte
		if err == nil {
			mem, err = syscall.Mmap(int(f.Fd()), 0, size, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_SHARED)
		}
		f.Close()
		if err != nil {
			c.Close()
			return nil, fmt.Errorf("KV cache %s: %w", path, err)
		}
		c.data = append(c.data, mem)
	}
	return c, nil
}

// Close unmaps and removes the files.
func (c *Cache) Close() {
	for _, m := range c.data {
		_ = syscall.Munmap(m)
	}
	for _, p := range c.Paths {
		_ = os.Remove(p)
	}
	c.data, c.Paths = nil, nil
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
