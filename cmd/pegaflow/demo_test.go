package main

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/pegaflow/pegaflow/internal/demo"
)

// TestDemoProcess runs `pegaflow demo` as `make demo` does, on a small
// workload: both setups serve every request, D loads every full prompt
// block from the engine, and no process outlives the demo.
func TestDemoProcess(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary and runs six processes")
	}
	bin := testBinary(t)
	dir := t.TempDir()
	reportPath := filepath.Join(dir, "report.json")
	cmd := exec.Command(bin, "demo", "--work-dir", dir, "--json", reportPath, "--num-prompts", "8",
		"--random-input-len", "200", "--random-output-len", "12", "--request-rate", "20", "--progress=false")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	done := make(chan error, 1)
	require.NoError(t, cmd.Start())
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		require.NoError(t, err, "stdout:\n%s\nstderr:\n%s", &stdout, &stderr)
	case <-time.After(2 * time.Minute):
		_ = cmd.Process.Kill()
		t.Fatalf("demo did not finish in 2 minutes: %s", &stderr)
	}
	out := stdout.String()
	require.Contains(t, out, "| P/D 1P+1D ")
	require.Contains(t, out, "| DP2 2x aggregated ")
	require.Contains(t, out, "hit ratio 100.0%")

	raw, err := os.ReadFile(reportPath)
	require.NoError(t, err)
	var rep demo.Report
	require.NoError(t, json.Unmarshal(raw, &rep))
	require.Equal(t, 8, rep.PD.Result.Completed)
	require.Equal(t, 8, rep.DP2.Result.Completed)
	require.Zero(t, rep.PD.Result.Failed+rep.DP2.Result.Failed)
	// 200 tokens = 12 full blocks of 16 per prompt, all loaded by D.
	require.EqualValues(t, 8*12, rep.Engine.DBlocksLoaded)
	require.EqualValues(t, 8*12, rep.Engine.HitBlocks)
	require.EqualValues(t, 8, rep.Engine.TransfersReady)
	require.EqualValues(t, 8*8, rep.Engine.DPrefillTokens, "D computes only the partial last block")
	require.Zero(t, rep.Engine.DVerifyFailures)
	require.Positive(t, rep.Engine.LoadedBytes)

	ps, _ := exec.Command("pgrep", "-f", dir).Output()
	require.Empty(t, strings.TrimSpace(string(ps)), "processes of the demo are still running")
}
