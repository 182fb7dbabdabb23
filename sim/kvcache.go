package sim

import (
	"encoding/binary"
	"fmt"
	"sync"

	"github.com/pegaflow/pegaflow/internal/kvtest"
)

// Geometry is the shape of the sim's KV cache: vLLM's FlashAttention layout,
// one tensor (2, num_blocks, block_size, num_kv_heads, head_size) of 2-byte
// elements per layer. A block's K and V halves are two segments.
type Geometry struct {
	NumLayers  int
	NumBlocks  int
	BlockSize  int
	NumKVHeads int
	HeadSize   int
}

const elemBytes = 2 // bfloat16

func (g Geometry) spec() kvtest.Spec {
	return kvtest.Spec{
		Layout: kvtest.FlashAttn, Layers: g.NumLayers, NumBlocks: g.NumBlocks, BlockSize: g.BlockSize,
		Heads: g.NumKVHeads, HeadSize: g.HeadSize, ElemSize: elemBytes,
	}
}

// BlockBytes is one block's size over all layers and both halves.
func (g Geometry) BlockBytes() int { return g.spec().BlockBytes() }

func (g Geometry) validate() error {
	switch {
	case g.NumLayers < 1 || g.NumBlocks < 1 || g.BlockSize < 1 || g.NumKVHeads < 1 || g.HeadSize < 1:
		return fmt.Errorf("KV geometry %+v: every dimension must be at least 1", g)
	case g.HeadSize%4 != 0:
		return fmt.Errorf("head size %d: want a multiple of 4", g.HeadSize)
	case uint64(g.spec().LayerBytes()) > 1<<40:
		return fmt.Errorf("KV geometry %+v: a layer over 1TiB", g)
	}
	return nil
}

// kvCache is the sim's "GPU memory": one shared-memory file per layer that
// the engine maps to copy blocks in and out (a kvtest.Cache), written and
// checked a token at a time. The files are unnamed but while a
// registration opens them (kvtest.NewUnnamed), so a killed sim leaves
// nothing in the shared-memory directory.
type kvCache struct {
	*kvtest.Cache
	// renewing is held for reading by every write through the mapping
	// and for writing by named's Renew, which would lose a write made
	// while it copies a layer.
	renewing sync.RWMutex
}

func newKVCache(dir, prefix string, geo Geometry) (*kvCache, error) {
	c, err := kvtest.NewUnnamed(dir, prefix, geo.spec())
	if err != nil {
		return nil, err
	}
	return &kvCache{Cache: c}, nil
}

// named runs fn (a registration) while the engine can open the cache's
// files by name, renewing them first when an earlier registration named
// them (kvtest.Cache.Renew): writes wait for that copy.
func (c *kvCache) named(fn func() error) error {
	c.renewing.Lock()
	err := c.Renew()
	c.renewing.Unlock()
	if err != nil {
		return err
	}
	return c.Named(fn)
}

// write runs fn, which writes through the mapping, outside a Renew.
func (c *kvCache) write(fn func()) {
	c.renewing.RLock()
	defer c.renewing.RUnlock()
	fn()
}

// slot is the bytes of one token of block b in layer l, half h (0 K, 1 V).
func (c *kvCache) slot(l, h, b, j int) []byte {
	tb := c.Spec.TokenBytes()
	return c.Segment(l, b, h)[j*tb : (j+1)*tb]
}

// The KV of a token is a function of its position and a hash of the token
// prefix ending at it, as a model's would be: equal prefixes give equal
// bytes, any differing earlier token changes every later token's bytes.

// prefixStart is the prefix hash before the first token, derived from the
// hash seed so instances with different seeds disagree on bytes too.
func prefixStart(noneHash []byte) uint64 { return binary.LittleEndian.Uint64(noneHash) }

// prefixNext extends the prefix hash by the token at position pos.
func prefixNext(h uint64, tok uint32, pos int) uint64 {
	return mix64(h ^ (uint64(tok) | uint64(pos)<<32))
}

// fillToken writes the token's KV bytes (layer l, half h) into dst.
func fillToken(dst []byte, prefix uint64, pos, l, h int) {
	x := mix64(prefix ^ uint64(l)<<48 ^ uint64(h)<<56 ^ uint64(pos))
	for i := 0; i+8 <= len(dst); i += 8 {
		x += 0x9e3779b97f4a7c15
		binary.LittleEndian.PutUint64(dst[i:], mix64(x))
	}
}

// checkToken reports whether src holds the token's KV bytes.
func checkToken(src []byte, prefix uint64, pos, l, h int) bool {
	x := mix64(prefix ^ uint64(l)<<48 ^ uint64(h)<<56 ^ uint64(pos))
	for i := 0; i+8 <= len(src); i += 8 {
		x += 0x9e3779b97f4a7c15
		if binary.LittleEndian.Uint64(src[i:]) != mix64(x) {
			return false
		}
	}
	return true
}

// writeTokens computes ("runs the forward pass for") tokens at positions
// [from, from+len(toks)) into the given blocks, starting from prefix hash
// h, and returns the prefix hash after the last one.
func (c *kvCache) writeTokens(blocks []uint32, from int, toks []uint32, h uint64) uint64 {
	c.renewing.RLock()
	defer c.renewing.RUnlock()
	bs := c.Spec.BlockSize
	for i, t := range toks {
		pos := from + i
		h = prefixNext(h, t, pos)
		b, j := int(blocks[pos/bs]), pos%bs
		for l := 0; l < c.Spec.Layers; l++ {
			fillToken(c.slot(l, 0, b, j), h, pos, l, 0)
			fillToken(c.slot(l, 1, b, j), h, pos, l, 1)
		}
	}
	return h
}

// verifyBlock checks that local block b holds the KV of the i-th block of
// tokens (prefix hash h before its first token) and returns the prefix hash
// after it, or ok=false with the first bad (layer, half, token slot).
func (c *kvCache) verifyBlock(b uint32, i int, toks []uint32, h uint64) (next uint64, ok bool, where string) {
	bs := c.Spec.BlockSize
	for j := 0; j < bs; j++ {
		pos := i*bs + j
		h = prefixNext(h, toks[pos], pos)
		for l := 0; l < c.Spec.Layers; l++ {
			for half := 0; half < 2; half++ {
				if !checkToken(c.slot(l, half, int(b), j), h, pos, l, half) {
					return h, false, fmt.Sprintf("layer %d %s token %d", l, [2]string{"K", "V"}[half], pos)
				}
			}
		}
	}
	return h, true, ""
}
