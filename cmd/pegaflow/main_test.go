package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/pegaflow/pegaflow/engine/client"
)

// testBinDir holds the binary testBinary builds; TestMain removes it.
var testBinDir string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "pegaflow-test-bin")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	testBinDir = dir
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// testBinary builds the pegaflow binary once per test run (tests that run
// it as separate processes share it), hardened as `make build` links it:
// PIE with full RELRO, so every symbol is bound at start, as in production.
var testBinary = func() func(t *testing.T) string {
	var once sync.Once
	var err error
	return func(t *testing.T) string {
		t.Helper()
		bin := filepath.Join(testBinDir, "pegaflow")
		once.Do(func() {
			build := exec.Command("go", "build", "-buildmode=pie",
				"-ldflags=-linkmode=external -extldflags=-Wl,-z,relro,-z,now", "-o", bin, ".")
			var out bytes.Buffer
			build.Stdout, build.Stderr = &out, &out
			if berr := build.Run(); berr != nil {
				err = fmt.Errorf("go build: %w\n%s", berr, out.String())
			}
		})
		require.NoError(t, err)
		return bin
	}
}()

func TestBadInvocationsExit2(t *testing.T) {
	cases := []struct {
		name string
		args []string
		want string
	}{
		{"no command", nil, "usage"},
		{"unknown command", []string{"frobnicate"}, "unknown command"},
		{"unknown flag", []string{"serve", "--nope"}, "flag provided but not defined"},
		{"bad pool size", []string{"serve", "--pool-size", "lots"}, "invalid size"},
		{"tiny pool", []string{"serve", "--pool-size", "4KiB"}, "below 1MiB"},
		{"ssd size without a dir", []string{"serve", "--ssd-size", "1GiB"}, "--ssd-size needs --ssd-dir"},
		{"relative ssd dir", []string{"serve", "--ssd-dir", "ssd", "--ssd-size", "1GiB"}, "must be an absolute path"},
		{"ssd dir without size", []string{"serve", "--ssd-dir", "/var/lib/pegaflow"}, "at least 64MiB"},
		{"ssd dir twice", []string{"serve", "--ssd-dir", "/a", "--ssd-dir", "/a/", "--ssd-size", "1GiB"}, "given twice"},
		{"bad ssd io", []string{"serve", "--ssd-dir", "/a", "--ssd-size", "1GiB", "--ssd-io", "aio"}, "want auto, io_uring or threads"},
		{"bad ssd depth", []string{"serve", "--ssd-dir", "/a", "--ssd-size", "1GiB", "--ssd-io-depth", "0"}, "--ssd-io-depth"},
		{"bad log level", []string{"serve", "--log-level", "loud"}, "--log-level"},
		{"bad http addr", []string{"serve", "--http-addr", "nonsense"}, "--http-addr"},
		{"bad socket mode", []string{"serve", "--socket-mode", "rw"}, "--socket-mode"},
		{"stray argument", []string{"serve", "extra"}, "unexpected arguments"},
		{"bad kv-ready-allow", []string{"serve", "--kv-ready-allow", "nonsense"}, "--kv-ready-allow"},
		{"no transfers", []string{"serve", "--max-transfers", "0"}, "--max-transfers"},
		{"peer: every address, no advertise", []string{"serve", "--peer-addr", "0.0.0.0:7400", "--peer-insecure"}, "--peer-advertise"},
		{"peer: unspecified advertise", []string{"serve", "--peer-addr", "127.0.0.1:7400", "--peer-insecure", "--peer-advertise", "[::]:7400"}, "--peer-advertise"},
		{"peer: bad allow", []string{"serve", "--peer-addr", "127.0.0.1:7400", "--peer-insecure", "--peer-allow", "10.0.0.7"}, "--peer-allow"},
		{"peer: bare subnet", []string{"serve", "--peer-addr", "127.0.0.1:7400", "--peer-insecure", "--peer-allow", "10.0.1.0/24"}, "needs a port, e.g. 10.0.1.0/24:7400"},
		{"peer: bare loopback", []string{"serve", "--peer-addr", "127.0.0.1:7400", "--peer-insecure", "--peer-allow", "loopback"}, "needs a port, e.g. loopback:7400"},
		{"peer: allow without addr", []string{"serve", "--peer-allow", "loopback:7400"}, "need --peer-addr"},
		{"peer: unknown transport", []string{"serve", "--peer-addr", "127.0.0.1:7400", "--peer-insecure", "--peer-transport", "udp"}, "--peer-transport"},
		{"kv: router alone, no engine mapped", []string{"serve", "--engine=false", "--prefill", "http://p:1", "--decode", "http://d:1", "--lb", "kv"}, "--kv-engine"},
		{"kv: remote engines, no token", []string{"serve", "--engine=false", "--prefill", "http://p:1", "--decode", "http://d:1", "--lb", "kv",
			"--kv-engine-port", "7400"}, "--peer-token-file"},
		{"kv: bad engine mapping", []string{"serve", "--prefill", "http://p:1", "--decode", "http://d:1", "--lb", "kv", "--kv-engine", "p=nohost"}, "--kv-engine"},
		{"kv: bad token file", []string{"serve", "--engine=false", "--prefill", "http://p:1", "--decode", "http://d:1", "--lb", "kv",
			"--kv-engine-port", "7400", "--peer-token-file", "/nonexistent"}, "peer token file"},
		{"kv: bypass without kv", []string{"serve", "--prefill", "http://p:1", "--decode", "http://d:1", "--pd-bypass-ratio", "0.5"}, "need --lb kv"},
		{"kv: xxhash without a seed", []string{"serve", "--prefill", "http://p:1", "--decode", "http://d:1", "--lb", "kv", "--kv-hash-algo", "xxhash"}, "PYTHONHASHSEED"},
		{"demo: no prompts", []string{"demo", "--num-prompts", "0"}, "num-prompts"},
		{"demo: bad rate", []string{"demo", "--request-rate", "-2"}, "rate"},
		{"demo: stray argument", []string{"demo", "now"}, "unexpected arguments"},
		{"demo: bad hosts", []string{"demo", "--hosts", "3"}, "hosts 3: want 1 or 2"},
		{"demo --kv: no users", []string{"demo", "--kv", "--users", "0"}, "want at least 1 user and 2 turns"},
		{"demo --kv: one turn", []string{"demo", "--kv", "--turns", "1"}, "want at least 1 user and 2 turns"},
		{"demo --kv: too many turns", []string{"demo", "--kv", "--turns", "5000"}, "1..1000 turns"},
		{"demo --ssd: one turn", []string{"demo", "--ssd", "--turns", "1"}, "want at least 1 user and 2 turns"},
		{"demo --ssd with --kv", []string{"demo", "--ssd", "--kv"}, "separate demos"},
		{"demo --ssd: two hosts", []string{"demo", "--ssd", "--hosts", "2"}, "--ssd runs on one host"},
		{"demo --kill-after without --ssd", []string{"demo", "--kill-after", "3s"}, "--kill-after applies to --ssd only"},
		{"demo --ssd: bad kill time", []string{"demo", "--ssd", "--kill-after", "0s"}, "must be positive"},
		{"demo: --users without --kv", []string{"demo", "--users", "3"}, "--users applies to --kv and --ssd only"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			code := dispatch(context.Background(), tc.args, &stdout, &stderr)
			require.Equal(t, 2, code)
			require.Contains(t, stderr.String(), tc.want)
		})
	}
}

func TestEnvSetsFlags(t *testing.T) {
	t.Setenv("PEGAFLOW_POOL_SIZE", "64MiB")
	t.Setenv("PEGAFLOW_LOG_LEVEL", "debug")
	f, err := parseServeFlags([]string{"--log-level", "warn"}, io.Discard)
	require.NoError(t, err)
	require.EqualValues(t, 64<<20, f.poolSize)
	require.Equal(t, "warn", f.logLevel, "command line wins")
}

// --peer-advertise defaults to --peer-addr; a bind to every address needs it.
func TestPeerAdvertise(t *testing.T) {
	tok := filepath.Join(t.TempDir(), "token")
	require.NoError(t, os.WriteFile(tok, []byte(peerTestToken), 0o600))
	f, err := parseServeFlags([]string{"--peer-addr", "127.0.0.1:7400", "--peer-insecure"}, io.Discard)
	require.NoError(t, err)
	require.Equal(t, "127.0.0.1:7400", f.peer.advertise)
	f, err = parseServeFlags([]string{"--peer-addr", "0.0.0.0:7400", "--peer-token-file", tok, "--peer-advertise", "10.0.0.5:7400",
		"--peer-allow", "10.0.0.6:7400,10.0.1.0/24:7400"}, io.Discard)
	require.NoError(t, err)
	require.Equal(t, "10.0.0.5:7400", f.peer.advertise)
	require.Equal(t, []string{"10.0.0.6:7400,10.0.1.0/24:7400"}, []string(f.peer.allow))
}

func TestVersion(t *testing.T) {
	var stdout bytes.Buffer
	require.Zero(t, dispatch(context.Background(), []string{"version"}, &stdout, io.Discard))
	require.True(t, strings.HasPrefix(stdout.String(), "pegaflow "))
}

// TestServeProcess runs the real binary: it serves the socket and HTTP,
// and exits cleanly on SIGTERM, removing its socket.
func TestServeProcess(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	dir := t.TempDir()
	bin := testBinary(t)

	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := lis.Addr().String()
	lis.Close()
	sock := filepath.Join(dir, "engine.sock")
	cmd := exec.Command(bin, "serve", "--socket", sock, "--http-addr", addr, "--pool-size", "16MiB")
	var logs bytes.Buffer
	cmd.Stderr = &logs
	require.NoError(t, cmd.Start())
	defer cmd.Process.Kill()

	health := awaitHealthy(t, addr, &logs)
	require.Equal(t, "ok", health["status"])

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := client.Dial(ctx, sock, "cmd-test")
	require.NoError(t, err)
	st, err := c.Stats(ctx)
	require.NoError(t, err)
	require.EqualValues(t, 16<<20, st.PoolCapacityBytes)
	c.Close()

	resp, err := http.Get("http://" + addr + "/metrics")
	require.NoError(t, err)
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	require.Contains(t, string(body), "pegaflow_engine_pool_capacity_bytes 1.6777216e+07")

	stopServe(t, cmd, &logs)
	_, err = os.Stat(sock)
	require.True(t, os.IsNotExist(err), "socket removed on exit")
}

// stopServe sends serve SIGTERM and requires a clean exit within 10 s.
func stopServe(t *testing.T, cmd *exec.Cmd, logs fmt.Stringer) {
	t.Helper()
	require.NoError(t, cmd.Process.Signal(syscall.SIGTERM))
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		require.NoError(t, err, "logs: %s", logs)
	case <-time.After(10 * time.Second):
		t.Fatalf("serve did not stop on SIGTERM: %s", logs)
	}
}

func TestRouterFlagsValidated(t *testing.T) {
	var stderr bytes.Buffer
	code := dispatch(context.Background(), []string{"serve", "--prefill", "http://p:1"}, io.Discard, &stderr)
	require.Equal(t, 2, code)
	require.Contains(t, stderr.String(), "--decode")
	stderr.Reset()
	code = dispatch(context.Background(), []string{"serve", "--prefill", "http://p:1", "--decode", "http://d:1", "--lb", "random"}, io.Discard, &stderr)
	require.Equal(t, 2, code)
	require.Contains(t, stderr.String(), "--lb")
}

// A router alone (--engine=false) starts no engine: no socket, no pool
// (no engine metrics), /health says engine "off" and reports the router,
// and it needs backends.
func TestServeRouterWithoutEngine(t *testing.T) {
	var stderr bytes.Buffer
	require.Equal(t, 2, dispatch(context.Background(), []string{"serve", "--engine=false"}, io.Discard, &stderr))
	require.Contains(t, stderr.String(), "give it backends")

	backend := httptest.NewServer(http.HandlerFunc(func(http.ResponseWriter, *http.Request) {}))
	defer backend.Close()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := lis.Addr().String()
	require.NoError(t, lis.Close())
	sock := filepath.Join(t.TempDir(), "engine.sock")
	f, err := parseServeFlags([]string{"--engine=false", "--socket", sock, "--http-addr", addr,
		"--prefill", backend.URL, "--decode", backend.URL, "--health-interval", "0"}, io.Discard)
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- serve(ctx, f, slog.New(slog.DiscardHandler)) }()
	defer func() {
		cancel()
		require.NoError(t, <-done)
	}()

	health := awaitHealthy(t, addr, &bytes.Buffer{})
	require.Equal(t, "off", health["engine"])
	require.Contains(t, health, "router")
	_, err = os.Stat(sock)
	require.True(t, os.IsNotExist(err), "no engine socket")

	resp, err := http.Get("http://" + addr + "/metrics")
	require.NoError(t, err)
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	require.NotContains(t, string(body), "pegaflow_engine_pool_capacity_bytes", "no pool")
	require.Contains(t, string(body), "pegaflow_router_requests_total")
	resp, err = http.Get("http://" + addr + "/topology")
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, http.StatusNotFound, resp.StatusCode)
}

// awaitHealthy waits until addr's /health answers 200 and returns it.
func awaitHealthy(t *testing.T, addr string, logs fmt.Stringer) map[string]any {
	t.Helper()
	var health map[string]any
	require.Eventually(t, func() bool {
		resp, err := http.Get("http://" + addr + "/health")
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		return resp.StatusCode == http.StatusOK && json.NewDecoder(resp.Body).Decode(&health) == nil
	}, 10*time.Second, 20*time.Millisecond, "serve never became healthy: %s", logs)
	return health
}
