package demo

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestWaitHealthyReportsEarlyExit(t *testing.T) {
	g := newGroup(t.TempDir())
	defer g.stop(time.Second)
	p, err := g.start("crasher", "/bin/sh", "-c", "echo boom >&2; exit 3")
	require.NoError(t, err)
	err = waitHealthy(context.Background(), p, "http://127.0.0.1:1/health", 10*time.Second)
	require.ErrorContains(t, err, "crasher exited")
	require.ErrorContains(t, err, "crasher.log")
	logged, rerr := os.ReadFile(filepath.Join(g.logDir, "crasher.log"))
	require.NoError(t, rerr)
	require.Equal(t, "boom\n", string(logged))
}

func TestWaitHealthyTimesOut(t *testing.T) {
	g := newGroup(t.TempDir())
	defer g.stop(time.Second)
	p, err := g.start("sleeper", "/bin/sleep", "30")
	require.NoError(t, err)
	err = waitHealthy(context.Background(), p, "http://127.0.0.1:1/health", 200*time.Millisecond)
	require.ErrorContains(t, err, "not ready")
}

// A child that ignores SIGTERM, and its own child, are killed after the
// grace period: nothing the demo started outlives stop.
func TestStopKillsStubbornProcessGroups(t *testing.T) {
	dir := t.TempDir()
	pidFile := filepath.Join(dir, "grandchild.pid")
	g := newGroup(dir)
	p, err := g.start("stubborn", "/bin/sh", "-c", `trap "" TERM; sleep 30 & echo $! > `+pidFile+`; wait`)
	require.NoError(t, err)
	require.Eventually(t, func() bool {
		b, err := os.ReadFile(pidFile)
		return err == nil && len(b) > 1
	}, 5*time.Second, 10*time.Millisecond)
	start := time.Now()
	g.stop(300 * time.Millisecond)
	require.Less(t, time.Since(start), 5*time.Second)
	done, _ := p.exited()
	require.True(t, done)
	var grandchild int
	b, _ := os.ReadFile(pidFile)
	_, err = fmt.Sscan(string(b), &grandchild)
	require.NoError(t, err)
	require.Eventually(t, func() bool {
		return syscall.Kill(grandchild, 0) == syscall.ESRCH
	}, 5*time.Second, 10*time.Millisecond, "the grandchild survived")
	g.stop(time.Second) // idempotent
}

// A process that is not reaped after SIGKILL (stuck in the kernel) does
// not hang stop: it is named in the error after the grace period.
func TestStopGivesUpOnUnreapedProcess(t *testing.T) {
	dir := t.TempDir()
	cmd := exec.Command("/bin/sleep", "30")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	require.NoError(t, cmd.Start())
	reaped := make(chan struct{})
	go func() { _ = cmd.Wait(); close(reaped) }()
	// done is never closed: as if Wait never returned.
	g := newGroup(dir)
	g.procs = []*process{{name: "stuck", cmd: cmd, logPath: filepath.Join(dir, "stuck.log"), done: make(chan struct{})}}
	errc := make(chan error, 1)
	go func() { errc <- g.stop(100 * time.Millisecond) }()
	select {
	case err := <-errc:
		require.ErrorContains(t, err, "stuck (pid")
		require.ErrorContains(t, err, "after SIGKILL")
	case <-time.After(10 * time.Second):
		t.Fatal("stop waited on a process that was never reaped")
	}
	<-reaped // the SIGKILL did land
}

func TestAllHealthy(t *testing.T) {
	cases := []struct {
		name  string
		pools map[string]map[string]bool
		want  bool
	}{
		{"no router section", nil, false},
		{"empty pool", map[string]map[string]bool{"decode": {}}, false},
		{"one down", map[string]map[string]bool{"prefill": {"p": true}, "decode": {"d": false}}, false},
		{"all up", map[string]map[string]bool{"prefill": {"p": true}, "decode": {"d": true}}, true},
		{"aggregated", map[string]map[string]bool{"aggregated": {"a1": true, "a2": true}}, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			require.Equal(t, tc.want, allHealthy(tc.pools))
		})
	}
}

// The router reports a backend down until its next poll; the wait ends
// when every backend is up, and times out naming what it last saw.
func TestWaitRouterReady(t *testing.T) {
	var polls atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		up := polls.Add(1) > 3
		fmt.Fprintf(w, `{"status":"ok","router":{"prefill":{"p":true},"decode":{"d":%t}}}`, up)
	}))
	defer srv.Close()
	g := newGroup(t.TempDir())
	defer g.stop(time.Second)
	p, err := g.start("router", "/bin/sleep", "30")
	require.NoError(t, err)
	require.NoError(t, waitRouterReady(context.Background(), p, srv.URL, 10*time.Second))
	require.Greater(t, polls.Load(), int32(3))

	down := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.WriteHeader(http.StatusServiceUnavailable)
		fmt.Fprint(w, `{"status":"unavailable","router":{"decode":{"d":false}}}`)
	}))
	defer down.Close()
	err = waitRouterReady(context.Background(), p, down.URL, 300*time.Millisecond)
	require.ErrorContains(t, err, "not ready")
	require.ErrorContains(t, err, "status 503")
}
