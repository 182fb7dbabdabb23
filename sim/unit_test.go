package sim

import (
	"encoding/hex"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func hexes(hs [][]byte) []string {
	out := make([]string, len(hs))
	for i, h := range hs {
		out[i] = hex.EncodeToString(h)
	}
	return out
}

// The vectors were computed with Python's cbor2 and hashlib, as vLLM does:
//
//	h = lambda x: hashlib.sha256(cbor2.dumps(x, canonical=True)).digest()
//	none = h("pegaflow"); b0 = h((none, (0, 1, 23, 24), None)); ...
//
// The token ids cross every CBOR integer width (1, 2, 3, 5 and 9 bytes).
func TestBlockHashesMatchVLLM(t *testing.T) {
	none := NoneHash("pegaflow")
	require.Equal(t, "671bf93b6981f262662df8ea18ee32966f15fd48acc1e29d9a88541ebd6f21e7", hex.EncodeToString(none))
	require.Equal(t, "8d33f520a3c4cef80d2453aef81b612bfe1cb44c8b2025630ad38662763f13d3", hex.EncodeToString(NoneHash("")))
	require.Equal(t, "4e1195df020de59e0d65a33a4279f1183e7ae4e5d980e309f8b55adff2e61c3e", hex.EncodeToString(NoneHash("0")))

	toks := []uint32{0, 1, 23, 24, 255, 256, 65535, 65536, 4294967295, 7, 8, 9, 10} // 13: the last block is partial
	require.Equal(t, []string{
		"d6c481a4220f2ad13730a6bcbfe44beeeda5dfc13190499b9e99429c6a1b16af",
		"f2b48cc620538ef98532907ff8cd0d25e1f0e1751df8ed14eb80ab5ee6f42cb2",
		"fefe89b4a90d114741ac09713a06aed1b142641408a4a8a84f3da215365c1cef",
	}, hexes(BlockHashes(none, toks, 4, "")))

	// cache_salt goes into the first block's extra keys: ("tenant-a",).
	require.Equal(t, []string{
		"e787ace8bf4734f760ed65fb10a44f00c446abfe476b7ce42e53324bfd30f78e",
		"2fda5b82922827af7857a5e75d24eb48ce98b9cdf04bca60aec424614d5b3711",
	}, hexes(BlockHashes(none, toks[:8], 4, "tenant-a")))

	// vLLM's 4-token example from the reference (seed "0", tokens 1..4).
	require.Equal(t, "c9d58ba695280d69b243e1e0df813136ca9196b286fb1a021e0b2e028ef071cb",
		hex.EncodeToString(BlockHashes(NoneHash("0"), []uint32{1, 2, 3, 4}, 4, "")[0]))
	require.Empty(t, BlockHashes(none, toks[:3], 4, ""), "no full block, no hash")
}

func TestCBORHeads(t *testing.T) {
	for _, tc := range []struct {
		major byte
		v     uint64
		want  string
	}{
		{0, 0, "00"}, {0, 23, "17"}, {0, 24, "1818"}, {0, 255, "18ff"}, {0, 256, "190100"},
		{0, 65535, "19ffff"}, {0, 65536, "1a00010000"}, {0, 1<<32 - 1, "1affffffff"}, {0, 1 << 32, "1b0000000100000000"},
		{2, 32, "5820"}, {3, 1, "61"}, {4, 16, "90"},
	} {
		require.Equal(t, tc.want, hex.EncodeToString(cborHead(nil, tc.major, tc.v)), "%d/%d", tc.major, tc.v)
	}
}

func TestTokenizer(t *testing.T) {
	tok, err := NewTokenizer(32000)
	require.NoError(t, err)
	// FNV-1a 64 of "hello" is 0xa430d84680aabd0b; 8 + that mod 31992 = 24347.
	require.Equal(t, []uint32{24347, 19507, 11348}, tok.Encode("  hello\tworld\nthe "))
	small, err := NewTokenizer(64)
	require.NoError(t, err)
	require.Equal(t, []uint32{27, 35, 20}, small.Encode("hello world the"))
	_, err = NewTokenizer(63)
	require.Error(t, err)

	chat, err := tok.ApplyChatTemplate([]Message{{"system", "be brief"}, {"user", "hello"}}, true)
	require.NoError(t, err)
	require.Equal(t, []uint32{tokSystem, tok.Word("be"), tok.Word("brief"), tokUser, 24347, tokAssistant}, chat)
	_, err = tok.ApplyChatTemplate([]Message{{"wizard", "x"}}, true)
	require.ErrorContains(t, err, "unknown role")
}

func TestSamplerIsAFunctionOfPromptAndSeed(t *testing.T) {
	tok, _ := NewTokenizer(32000)
	s := Sampler{tok: tok}
	text := func(prompt []uint32, seed int64, n int) string {
		d := Digest(prompt, seed)
		out := ""
		for k := 0; k < n; k++ {
			w, id := s.Token(d, k)
			require.Equal(t, tok.Word(w[1:]), id, "a generated word re-tokenizes to its id")
			out += w
		}
		return out
	}
	p := tok.Encode("a b c d")
	a := text(p, 0, 20)
	require.Equal(t, a, text(p, 0, 20))
	require.Equal(t, a[:len(text(p, 0, 5))], text(p, 0, 5), "a shorter reply is a prefix of a longer one")
	require.NotEqual(t, a, text(p, 1, 20), "the seed changes the text")
	require.NotEqual(t, a, text(tok.Encode("a b c e"), 0, 20), "the prompt changes the text")
	require.Len(t, tok.Encode(a), 20, "one token per generated word")
}

func TestKVBytesAreAFunctionOfTheTokenPrefix(t *testing.T) {
	geo := Geometry{NumLayers: 2, NumBlocks: 8, BlockSize: 4, NumKVHeads: 2, HeadSize: 8}
	kv, err := newKVCache(t.TempDir(), "kv", geo)
	require.NoError(t, err)
	defer kv.Close()
	none := NoneHash("0")
	start := prefixStart(none)
	toks := []uint32{10, 11, 12, 13, 14, 15, 16, 17, 18}
	// Blocks 5 and 2 hold positions 0-3 and 4-7; written in two uneven
	// chunks, as chunked prefill does.
	blocks := []uint32{5, 2, 7}
	h := kv.writeTokens(blocks, 0, toks[:3], start)
	kv.writeTokens(blocks, 3, toks[3:], h)

	h, ok, _ := kv.verifyBlock(5, 0, toks, start)
	require.True(t, ok)
	_, ok, _ = kv.verifyBlock(2, 1, toks, h)
	require.True(t, ok)
	_, ok, _ = kv.verifyBlock(2, 0, toks, start)
	require.False(t, ok, "another block's bytes do not verify")

	other := append([]uint32{99}, toks[1:]...)
	h2, ok, _ := kv.verifyBlock(5, 0, other, start)
	require.False(t, ok, "a different first token changes the bytes")
	_, ok, _ = kv.verifyBlock(2, 1, other, h2)
	require.False(t, ok, "... and every later block's")
	_, ok, _ = kv.verifyBlock(5, 0, toks, prefixStart(NoneHash("1")))
	require.False(t, ok, "another hash seed, other bytes")

	kv.slot(1, 1, 2, 3)[5] ^= 1
	_, ok, where := kv.verifyBlock(2, 1, toks, h)
	require.False(t, ok)
	require.Equal(t, "layer 1 V token 7", where)

	// The engine sees block b's halves at the registered offsets.
	req := kv.RegisterRequest("i", 0, nil)
	seg := uint64(geo.spec().SegmentBytes())
	require.Len(t, req.Regions, 2)
	require.EqualValues(t, 2*8*seg, req.Regions[0].Size)
	require.Equal(t, seg, req.Layers[0].Segments[0].Stride)
	require.Equal(t, 8*seg, req.Layers[0].Segments[1].Offset)
	v := req.Layers[1].Segments[1]
	mem := kv.Layer(1)[v.Offset+2*v.Stride : v.Offset+2*v.Stride+v.Length]
	require.Equal(t, kv.slot(1, 1, 2, 0), mem[:geo.spec().TokenBytes()])
}

func TestCostModel(t *testing.T) {
	c := CostModel{StepBase: 5 * time.Millisecond, PrefillPerToken: 50 * time.Microsecond, DecodePerToken: 100 * time.Microsecond}
	require.Equal(t, 5*time.Millisecond, c.StepTime(0, 0))
	require.Equal(t, 5*time.Millisecond+100*time.Millisecond+2*time.Millisecond, c.StepTime(2000, 20))
}

func TestBlockPool(t *testing.T) {
	p := newBlockPool(4)
	a, ch := p.tryAlloc(3)
	require.Nil(t, ch)
	require.Len(t, a, 3)
	_, ch = p.tryAlloc(2)
	require.NotNil(t, ch)
	p.release(a[:1])
	<-ch // released blocks wake waiters
	b, ch := p.tryAlloc(2)
	require.Nil(t, ch)
	require.NotContains(t, a[1:], b[0])
	require.Equal(t, 4, p.used())
}
