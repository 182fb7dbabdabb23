package main

import (
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/pegaflow/pegaflow/internal/kvtest"
)

// A sim's KV cache files never outlive it in the shared-memory directory,
// however it ends: SIGTERM and SIGINT (clean shutdown) and SIGKILL (no
// cleanup runs). Each sim gets a directory of its own under /dev/shm, so
// other processes' files there do not count; one is registered with a
// real engine (its files are named while the engine opens them), one runs
// alone.
func TestKilledSimLeavesNoShmFiles(t *testing.T) {
	cases := []struct {
		name   string
		sig    syscall.Signal
		engine bool
	}{
		{"SIGTERM", syscall.SIGTERM, true},
		{"SIGINT", syscall.SIGINT, true},
		{"SIGKILL", syscall.SIGKILL, true},
		{"SIGKILL without engine", syscall.SIGKILL, false},
	}
	if testing.Short() {
		t.Skip("builds the binary, runs an engine and sims")
	}
	bin := testBinary(t)
	eng := startPeerlessEngine(t, bin)
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := kvtest.TempShmDir(t)
			addr := freeAddr(t)
			args := []string{"sim", "--http-addr", addr, "--shm-dir", dir, "--num-layers", "2", "--num-blocks", "64",
				"--block-size", "4", "--num-kv-heads", "2", "--head-size", "8"}
			if tc.engine {
				args = append(args, "--engine-socket", eng)
			}
			cmd := exec.Command(bin, args...)
			logs := &lockedBuffer{}
			cmd.Stderr = logs
			require.NoError(t, cmd.Start())
			done := make(chan struct{})
			go func() { _ = cmd.Wait(); close(done) }()
			t.Cleanup(func() { _ = cmd.Process.Kill(); <-done })
			// /health is 200 once the sim holds its engine registration.
			require.Eventually(t, func() bool {
				resp, err := http.Get("http://" + addr + "/health")
				if err != nil {
					return false
				}
				resp.Body.Close()
				return resp.StatusCode == http.StatusOK
			}, 15*time.Second, 20*time.Millisecond, "sim never became healthy: %s", logs)

			requireEmpty(t, dir, "while serving (registered: %v)", tc.engine)

			require.NoError(t, cmd.Process.Signal(tc.sig))
			select {
			case <-done:
			case <-time.After(15 * time.Second):
				t.Fatalf("sim did not exit on %s: %s", tc.sig, logs)
			}
			requireEmpty(t, dir, "after %s; logs: %s", tc.sig, logs)
		})
	}
}

// requireEmpty fails unless dir holds no file.
func requireEmpty(t *testing.T, dir, format string, args ...any) {
	t.Helper()
	left, err := os.ReadDir(dir)
	require.NoError(t, err)
	require.Empty(t, left, append([]any{"files in " + dir + " " + format}, args...)...)
}

// startPeerlessEngine runs `pegaflow serve` (a small pool, no peers) until
// the test ends and returns its socket.
func startPeerlessEngine(t *testing.T, bin string) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "engine.sock")
	addr := freeAddr(t)
	cmd := exec.Command(bin, "serve", "--socket", sock, "--http-addr", addr, "--pool-size", "16MiB",
		"--mlock=false", "--hugepages=false")
	logs := &lockedBuffer{}
	cmd.Stderr = logs
	require.NoError(t, cmd.Start())
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	awaitHealthy(t, addr, logs)
	_, err := os.Stat(sock)
	require.NoError(t, err, "engine socket: %s", logs)
	return sock
}
