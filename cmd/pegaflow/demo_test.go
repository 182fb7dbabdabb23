package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/pegaflow/pegaflow/demo"
	"github.com/pegaflow/pegaflow/internal/netlab"
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
	out := runDemoProcess(t, bin, "demo", "--work-dir", dir, "--json", reportPath, "--num-prompts", "8",
		"--random-input-len", "200", "--random-output-len", "12", "--request-rate", "20", "--progress=false")
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

// TestDemoTwoHosts runs `pegaflow demo --hosts 2` as `make
// demo-multihost` does, on 6 prompts: P/D on one host and across two
// network namespaces serve every request, D's engine fetches every prompt
// block from P's engine and D verifies it, and neither a process nor a
// namespace outlives the demo.
func TestDemoTwoHosts(t *testing.T) {
	skipUnlessLab(t, "demo --hosts 2", "builds the binary, runs two hosts in network namespaces")
	out, raw := runLabDemo(t, "--hosts", "2", "--num-prompts", "6")
	require.Contains(t, out, "| P/D 1P+1D ")
	require.Contains(t, out, "| P/D 2 hosts       |")
	require.Contains(t, out, "| 2 hosts / 1 host ")
	require.Regexp(t, `D: [1-9][0-9]* blocks fetched from the peer engine`, out)

	var rep demo.Report
	require.NoError(t, json.Unmarshal(raw, &rep))
	for _, s := range []demo.Setup{rep.PD, rep.TwoHosts} {
		require.NotNil(t, s.Result, s.Name)
		require.Equal(t, 6, s.Result.Completed, s.Name)
		require.Zero(t, s.Result.Failed+s.Result.NotSent, s.Name)
	}
	x := rep.TwoHostsEngine
	require.Positive(t, x.PeerFetchedBlocks, "D's engine fetched from P's")
	require.Positive(t, x.PeerFetchedBytes)
	require.Equal(t, x.PeerFetchedBlocks, x.DBlocksLoaded, "every fetched block loaded by D")
	require.Zero(t, x.DVerifyFailures, "nothing corrupt across hosts")
	require.Zero(t, rep.Engine.DVerifyFailures, "nothing corrupt on one host")
	require.Positive(t, rep.Engine.DBlocksLoaded)
}

// TestDemoKV runs `pegaflow demo --kv` as `make demo-kv` does, on 4
// conversations of 2 turns: every policy serves every request with no KV
// save, load or verification failing (engine B's saves reach the router's
// /kv_ready on A), the KV policy keeps each conversation on one host (no
// cross-host fetch), the bypass skips P, and neither a process nor a
// namespace outlives the demo.
func TestDemoKV(t *testing.T) {
	skipUnlessLab(t, "demo --kv", "builds the binary, runs two hosts in network namespaces, four times")
	out, raw := runLabDemo(t, "--kv", "--users", "4", "--turns", "2")
	var rep demo.KVReport
	require.NoError(t, json.Unmarshal(raw, &rep))
	require.Len(t, rep.Rows, len(demo.KVPolicies()))
	for _, row := range rep.Rows {
		require.Contains(t, out, fmt.Sprintf("| %-16s |", row.Policy))
		require.Empty(t, row.Err, row.Policy)
		require.NotNil(t, row.Result, row.Policy)
		require.Equal(t, 8, row.Result.Completed, row.Policy)
		require.Zero(t, row.Result.Failed+row.Result.NotSent, row.Policy)
		require.Zero(t, row.KVFailures, row.Policy)
		require.Positive(t, row.HitTokens, "%s: the shared system prompt is loaded", row.Policy)
		require.Positive(t, row.OracleRatio, row.Policy)
		if strings.HasPrefix(row.Policy, "kv") {
			require.Zero(t, row.CrossHostBytes, "%s: each conversation stays on one host", row.Policy)
		}
	}
	require.Zero(t, rep.Rows[2].Bypasses, rep.Rows[2].Policy)
	require.GreaterOrEqual(t, rep.Rows[3].Bypasses, 4.0, "%s: every follow-up skips P", rep.Rows[3].Policy)
}

// skipUnlessLab skips what (a demo needing the two-host lab) unless this
// machine can build one now: root, `ip`, and the kernel's namespaces.
func skipUnlessLab(t *testing.T, what, why string) {
	t.Helper()
	skipUnlessPeerProcs(t, why)
	if err := netlab.Check(); err != nil {
		t.Skipf("%s: %v; run as root to include it", what, err)
	}
	probe, err := netlab.New(context.Background(), "pft")
	if err != nil {
		t.Skipf("%s: network namespaces unavailable: %v", what, err)
	}
	require.NoError(t, probe.Close())
}

// runLabDemo runs `pegaflow demo args...` on the two-host lab, quietly,
// in a work directory of its own, requires that it succeeded and left
// neither a process nor a namespace behind, and returns its stdout and
// JSON report.
func runLabDemo(t *testing.T, args ...string) (stdout string, report []byte) {
	t.Helper()
	bin := testBinary(t)
	dir := t.TempDir()
	reportPath := filepath.Join(dir, "report.json")
	nsBefore := demoNamespaces(t)
	out := runDemoProcess(t, bin, append(append([]string{"demo"}, args...),
		"--work-dir", dir, "--json", reportPath, "--progress=false")...)
	require.Equal(t, nsBefore, demoNamespaces(t), "the demo's namespaces are deleted")
	ps, _ := exec.Command("pgrep", "-f", dir).Output()
	require.Empty(t, strings.TrimSpace(string(ps)), "processes of the demo are still running")
	raw, err := os.ReadFile(reportPath)
	require.NoError(t, err)
	return out, raw
}

// runDemoProcess runs bin with args, requires exit status 0 within 2
// minutes and returns its stdout. A demo past the limit is interrupted
// (so it stops its processes and deletes its namespaces), killed if it
// does not exit within 30 s more.
func runDemoProcess(t *testing.T, bin string, args ...string) string {
	t.Helper()
	cmd := exec.Command(bin, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	done := make(chan error, 1)
	require.NoError(t, cmd.Start())
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		require.NoError(t, err, "stdout:\n%s\nstderr:\n%s", &stdout, &stderr)
	case <-time.After(2 * time.Minute):
		_ = cmd.Process.Signal(os.Interrupt)
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
		t.Fatalf("%s did not finish in 2 minutes: %s", strings.Join(args, " "), &stderr)
	}
	return stdout.String()
}

// demoNamespaces lists the namespaces named like the demo's.
func demoNamespaces(t *testing.T) []string {
	t.Helper()
	entries, err := os.ReadDir("/var/run/netns")
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	require.NoError(t, err)
	var names []string
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), demo.NetlabPrefix) {
			names = append(names, e.Name())
		}
	}
	return names
}

// TestDemoSSD runs `pegaflow demo --ssd` as `make demo-ssd` does (~40 s
// on an idle 2-core box): the SSD tier raises the hit ratio of a pool
// smaller than the workload's KV, and after a kill -9 the restarted
// engine recovers blocks from its directory and serves them as SSD hits;
// every loaded block is verified by the sims. Orderings and "> 0" only:
// the figures move with the machine's load.
func TestDemoSSD(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary and runs the workload three times (~40 s)")
	}
	dir := t.TempDir()
	skipWithoutODirect(t, dir)
	bin := testBinary(t)
	reportPath := filepath.Join(dir, "report.json")
	out := runDemoProcess(t, bin, "demo", "--ssd", "--work-dir", dir, "--json", reportPath, "--progress=false")
	require.Contains(t, out, "| SSD, kill -9  |")
	raw, err := os.ReadFile(reportPath)
	require.NoError(t, err)
	var rep demo.SSDReport
	require.NoError(t, json.Unmarshal(raw, &rep))
	require.Len(t, rep.Runs, 3)
	for _, run := range rep.Runs {
		require.Empty(t, run.Err, run.Name)
		require.NotNil(t, run.Result, run.Name)
		require.Zero(t, run.Result.Failed+run.Result.NotSent, run.Name)
		require.Zero(t, run.VerifyFailures, run.Name)
	}
	noSSD, ssd, kill := rep.Runs[0], rep.Runs[1], rep.Runs[2]
	require.Zero(t, noSSD.Tiers["ssd"])
	require.Positive(t, ssd.Spilled)
	require.Positive(t, ssd.Tiers["ssd"])
	require.Greater(t, ssd.EngineHitRatio(), noSSD.EngineHitRatio(), "the SSD tier keeps what the pool evicts")

	k := kill.Kill
	require.NotNil(t, k)
	require.Empty(t, k.Err)
	require.Positive(t, k.SimsBack)
	require.Positive(t, k.RecoveredBlocks, "the restarted engine finds the spilled blocks")
	var ssdAfter float64
	for _, w := range k.Windows {
		if w.End > k.KilledAt {
			ssdAfter += w.Tiers["ssd"]
		}
	}
	require.Positive(t, ssdAfter, "the restarted engine (empty DRAM) serves hits from the SSD")
	ps, _ := exec.Command("pgrep", "-f", dir).Output()
	require.Empty(t, strings.TrimSpace(string(ps)), "processes of the demo are still running")
}

// skipWithoutODirect skips where dir's file system refuses O_DIRECT
// (tmpfs): the SSD tier would leave the directory out.
func skipWithoutODirect(t *testing.T, dir string) {
	t.Helper()
	f, err := os.OpenFile(filepath.Join(dir, "odirect-probe"), os.O_CREATE|os.O_RDWR|syscall.O_DIRECT, 0o600)
	if err != nil {
		t.Skipf("O_DIRECT unavailable in %s: %v", dir, err)
	}
	require.NoError(t, f.Close())
	require.NoError(t, os.Remove(f.Name()))
}
