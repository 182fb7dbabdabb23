package sim

import (
	"encoding/hex"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"

	"github.com/pegaflow/pegaflow/internal/kvtest"
	"github.com/pegaflow/pegaflow/internal/vllmhash"
)

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
	none, err := noneHash("0")
	require.NoError(t, err)
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
	none1, err := noneHash("1")
	require.NoError(t, err)
	_, ok, _ = kv.verifyBlock(5, 0, toks, prefixStart(none1))
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

// The sim names blocks and its namespace as a vLLM instance with the
// connector does: the connector's seed fingerprint (so a router's
// lookup, and a vLLM instance with the same seed, match it), vLLM 0.32's
// tagged cache_salt key, and vLLM's default seed for an empty one.
func TestHashesAndNamespaceAreVLLMs(t *testing.T) {
	cfg := DefaultConfig()
	cfg.ShmDir = kvtest.TempShmDir(t)
	s, err := New(cfg, testLogger(t), prometheus.NewRegistry())
	require.NoError(t, err)
	defer s.kv.Close()
	require.Equal(t, vllmhash.SeedFingerprint(vllmhash.AlgoSHA256CBOR, "0"), s.Namespace().HashSeedFingerprint)

	toks := []uint32{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16}
	got := s.blockHashes(toks, "tenant-a")
	require.Len(t, got, 1)
	// vLLM 0.32 (vllmhash's vectors): sha256(cbor((NONE_HASH("0"), toks, (("cache_salt", "tenant-a"),))))
	none, err := noneHash("0")
	require.NoError(t, err)
	want, err := vllmhash.BlockHashes(vllmhash.Params{Algo: vllmhash.AlgoSHA256CBOR, BlockSize: 16}, none, toks, "tenant-a")
	require.NoError(t, err)
	require.Equal(t, want, got)
	require.Equal(t, "c71ed03162c14200", hex.EncodeToString(got[0][:8]))

	def, err := noneHash("")
	require.NoError(t, err)
	vdef, err := vllmhash.NoneHash(vllmhash.AlgoSHA256CBOR, vllmhash.DefaultSeed)
	require.NoError(t, err)
	require.Equal(t, vdef, def, "an empty seed is vLLM's default, not the empty string")

	_, err = New(Config{}, testLogger(t), prometheus.NewRegistry())
	require.Error(t, err)
}
