package vllmhash

import (
	"encoding/hex"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"
)

// vectorCase is one hashing case; its tokens come from genTokens so that
// the committed vectors stay small.
type vectorCase struct {
	Name      string  `json:"name"`
	Algo      string  `json:"algo"`
	Seed      *string `json:"seed"` // nil: PYTHONHASHSEED unset
	BlockSize int     `json:"block_size"`
	NumTokens int     `json:"num_tokens"`
	Gen       string  `json:"gen"`
	Salt      string  `json:"salt"`
}

func str(s string) *string { return &s }

// edges are token ids at every pickle and CBOR integer width boundary.
var edges = []uint32{0, 1, 23, 24, 255, 256, 65535, 65536, 1<<31 - 1, 1 << 31, 1<<32 - 1, 7, 8}

// genTokens makes a case's tokens: "edges" cycles edges; "small" ids
// under 256 (2-byte pickle ints: frame boundaries fall at known
// positions); "mixed" a splitmix64 stream over every width.
func genTokens(gen string, n int) []uint32 {
	out := make([]uint32, n)
	x := uint64(0x9e3779b97f4a7c15)
	for i := range out {
		switch gen {
		case "edges":
			out[i] = edges[i%len(edges)]
		case "small":
			out[i] = uint32(i % 251)
		default:
			x += 0x9e3779b97f4a7c15
			z := x
			z = (z ^ z>>30) * 0xbf58476d1ce4e5b9
			z = (z ^ z>>27) * 0x94d049bb133111eb
			z ^= z >> 31
			out[i] = uint32(z) >> (uint(z>>32) % 32) // every width
		}
	}
	return out
}

func vectorCases() []vectorCase {
	var cs []vectorCase
	for _, algo := range []string{AlgoSHA256, AlgoSHA256CBOR} {
		cs = append(cs,
			vectorCase{Name: "default seed", Algo: algo, BlockSize: 4, NumTokens: 13, Gen: "edges"},
			vectorCase{Name: "seed 0", Algo: algo, Seed: str("0"), BlockSize: 4, NumTokens: 13, Gen: "edges"},
			vectorCase{Name: "seed text", Algo: algo, Seed: str("pegaflow"), BlockSize: 3, NumTokens: 13, Gen: "edges"},
			vectorCase{Name: "salt", Algo: algo, BlockSize: 4, NumTokens: 13, Gen: "edges", Salt: "tenant-a"},
			vectorCase{Name: "unicode salt", Algo: algo, BlockSize: 2, NumTokens: 5, Gen: "edges", Salt: "租户-ü"},
			vectorCase{Name: "long salt", Algo: algo, BlockSize: 1, NumTokens: 3, Gen: "edges", Salt: string(make([]byte, 300))},
			vectorCase{Name: "block size 1", Algo: algo, BlockSize: 1, NumTokens: 5, Gen: "edges"},
			vectorCase{Name: "no full block", Algo: algo, BlockSize: 16, NumTokens: 15, Gen: "edges"},
			vectorCase{Name: "mixed 16", Algo: algo, BlockSize: 16, NumTokens: 1000, Gen: "mixed", Salt: "s"},
			vectorCase{Name: "mixed 1024", Algo: algo, BlockSize: 1024, NumTokens: 2100, Gen: "mixed"},
		)
	}
	// Pickle frames: 36 bytes before the first token, 2 per small token;
	// these put the 64 KiB boundary before the last token, after it and
	// after the tuple's end; "mixed" crosses it with every width.
	for _, bs := range []int{32748, 32749, 32750, 32751} {
		cs = append(cs, vectorCase{Name: "frame small", Algo: AlgoSHA256, BlockSize: bs, NumTokens: bs + 1, Gen: "small"})
	}
	cs = append(cs,
		vectorCase{Name: "frame small salt", Algo: AlgoSHA256, BlockSize: 32750, NumTokens: 32750, Gen: "small", Salt: "x"},
		vectorCase{Name: "frames mixed", Algo: AlgoSHA256, BlockSize: 40000, NumTokens: 80000, Gen: "mixed", Salt: "t"},
		vectorCase{Name: "cbor big block", Algo: AlgoSHA256CBOR, BlockSize: 40000, NumTokens: 40000, Gen: "mixed"},
	)
	return cs
}

// goHashes is NONE_HASH then the block hashes, in hex.
func goHashes(t *testing.T, c vectorCase) []string {
	t.Helper()
	seed := ""
	if c.Seed != nil {
		seed = *c.Seed
	}
	none, err := NoneHash(c.Algo, seed)
	require.NoError(t, err)
	hs, err := BlockHashes(Params{Algo: c.Algo, BlockSize: c.BlockSize, Seed: seed}, none, genTokens(c.Gen, c.NumTokens), c.Salt)
	require.NoError(t, err)
	out := []string{hex.EncodeToString(none)}
	for _, h := range hs {
		out = append(out, hex.EncodeToString(h))
	}
	return out
}

const vectorsFile = "testdata/vectors.json"

// The committed vectors were made by vLLM 0.32 itself (vllm_test.go
// rewrites them with PEGAFLOW_UPDATE_VECTORS=1); CI checks against them
// without vLLM.
func TestVectors(t *testing.T) {
	raw, err := os.ReadFile(vectorsFile)
	require.NoError(t, err)
	var want [][]string
	require.NoError(t, json.Unmarshal(raw, &want))
	cs := vectorCases()
	require.Len(t, want, len(cs))
	for i, c := range cs {
		require.Equal(t, want[i], goHashes(t, c), "case %d: %s %s", i, c.Algo, c.Name)
	}
}

func TestSeedFingerprint(t *testing.T) {
	for _, tc := range []struct {
		algo, seed, want string
	}{
		// hashlib.sha256(b"pegaflow-hash-seed/v1\0" + algo + b"\0" + seed).digest()[:16]
		{AlgoSHA256, "", "3fcf11931accc726b5c78b4864c417c3"},
		{AlgoSHA256CBOR, "0", "3f93d656bff143d4a97de6940803cfa7"},
		{"xxhash", "", ""},
		{"xxhash_cbor", "7", "4385c22b1ae6edbd7965f68bb6ff09a3"},
	} {
		got := hex.EncodeToString(SeedFingerprint(tc.algo, tc.seed))
		require.Equal(t, tc.want, got, "%s %q", tc.algo, tc.seed)
	}
}

func TestRefusals(t *testing.T) {
	none, err := NoneHash(AlgoSHA256, "")
	require.NoError(t, err)
	for _, tc := range []struct {
		name string
		p    Params
		none []byte
		salt string
	}{
		{"xxhash", Params{Algo: "xxhash", BlockSize: 16}, none, ""},
		{"unknown algo", Params{Algo: "md5", BlockSize: 16}, none, ""},
		{"block size 0", Params{Algo: AlgoSHA256, BlockSize: 0}, none, ""},
		{"block size huge", Params{Algo: AlgoSHA256, BlockSize: MaxBlockSize + 1}, none, ""},
		{"short none", Params{Algo: AlgoSHA256, BlockSize: 16}, none[:8], ""},
		{"salt too long", Params{Algo: AlgoSHA256CBOR, BlockSize: 16}, none, string(make([]byte, MaxSaltBytes+1))},
		{"salt not utf-8", Params{Algo: AlgoSHA256, BlockSize: 16}, none, "\xff"},
	} {
		_, err := BlockHashes(tc.p, tc.none, make([]uint32, 64), tc.salt)
		require.Error(t, err, tc.name)
	}
	_, err = NoneHash("xxhash", "")
	require.ErrorIs(t, err, ErrUnsupported)
	_, err = NoneHash("blake3", "1")
	require.ErrorIs(t, err, ErrUnsupported)
	_, err = NoneHash(AlgoSHA256, string(make([]byte, MaxSaltBytes+1)))
	require.ErrorIs(t, err, ErrUnsupported)
}

func writeVectors(t *testing.T, got [][]string) {
	t.Helper()
	raw, err := json.MarshalIndent(got, "", " ")
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Clean(vectorsFile), append(raw, '\n'), 0o644))
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
