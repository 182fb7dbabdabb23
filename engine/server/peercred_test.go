package server

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/status"

	"github.com/pegaflow/pegaflow/engine"
	pb "github.com/pegaflow/pegaflow/engine/api/pegaflowv1"
	"github.com/pegaflow/pegaflow/engine/client"
	"github.com/pegaflow/pegaflow/internal/kvtest"
)

// runIntruder, as another user, registers each path in PEGAFLOW_TEST_PATHS
// (files it does not own) and then its own cache, printing the status code
// of each registration.
func runIntruder() int {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := client.Dial(ctx, os.Getenv("PEGAFLOW_TEST_SOCKET"), "intruder")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer c.Close()
	own, err := kvtest.New(kvtest.ShmDir(), fmt.Sprintf("pf-test-intruder-%d", os.Getpid()), spec)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer own.Close()
	for _, path := range append(strings.Split(os.Getenv("PEGAFLOW_TEST_PATHS"), ","), "own") {
		req := own.RegisterRequest("intruder", 0, spec.Namespace("m", 1))
		if path != "own" {
			req.Regions[0].Source = &pb.MemoryRegion_ShmPath{ShmPath: path}
		}
		_, err := c.Register(ctx, req)
		fmt.Printf("%s: %s\n", filepath.Base(path), status.Code(err))
	}
	return 0
}

// An unprivileged client of an engine running as root cannot register a
// root-only file, in the shm directory or elsewhere, while its own cache
// registers fine: the engine authorises by the socket's peer credentials.
func TestRegisterAsAnotherUserOnlyOwnMemory(t *testing.T) {
	requireRoot(t)
	eng, err := engine.New(engine.Config{PoolSize: 16 << 20, NUMANode: -1, Device: -1}, nil, prometheus.NewRegistry())
	require.NoError(t, err)
	defer eng.Close()
	// Where nobody can reach the socket and run the test binary.
	pub, err := os.MkdirTemp("", "pf-peercred-")
	require.NoError(t, err)
	defer os.RemoveAll(pub)
	require.NoError(t, os.Chmod(pub, 0o755))
	sock := filepath.Join(pub, "engine.sock")
	srv, err := New(Config{SocketPath: sock, SocketMode: 0o666}, eng, nil, prometheus.NewRegistry())
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx) }()
	defer func() { cancel(); <-done }()
	bin := filepath.Join(pub, "server.test")
	copyExecutable(t, os.Args[0], bin)

	// Root's secrets: a 0600 file in the shm directory and one elsewhere.
	shmDir, err := os.MkdirTemp(kvtest.ShmDir(), "pf-peercred-")
	require.NoError(t, err)
	defer os.RemoveAll(shmDir)
	size := spec.LayerBytes()
	inShm := filepath.Join(shmDir, "root-kv")
	elsewhere := filepath.Join(pub, "root-secret")
	for _, p := range []string{inShm, elsewhere} {
		require.NoError(t, os.WriteFile(p, make([]byte, size), 0o600))
	}

	cmd := exec.Command(bin, "-test.run=^$")
	cmd.Env = append(os.Environ(), "PEGAFLOW_TEST_ROLE=intruder", "PEGAFLOW_TEST_SOCKET="+sock,
		"PEGAFLOW_TEST_PATHS="+inShm+","+elsewhere)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: nobody, Gid: nobody}}
	cmd.Stderr = os.Stderr
	out, err := cmd.Output()
	require.NoError(t, err)
	require.Equal(t, "root-kv: PermissionDenied\nroot-secret: PermissionDenied\nown: OK\n", string(out))
}

func copyExecutable(t *testing.T, from, to string) {
	t.Helper()
	src, err := os.Open(from)
	require.NoError(t, err)
	defer src.Close()
	dst, err := os.OpenFile(to, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o755)
	require.NoError(t, err)
	_, err = io.Copy(dst, src)
	require.NoError(t, err)
	require.NoError(t, dst.Close())
}
