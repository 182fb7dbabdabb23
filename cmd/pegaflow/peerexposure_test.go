package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// An engine with --peer-addr listens on its HTTP address and its peer
// address and nowhere else: no UCX lane on an ephemeral port of every
// interface (over which any process could read or write the engine's
// memory by address before this was fixed).
func TestPeerEngineListensOnlyWhereConfigured(t *testing.T) {
	skipUnlessPeerProcs(t, "starts an engine process")
	dir := t.TempDir()
	tok := filepath.Join(dir, "token")
	require.NoError(t, os.WriteFile(tok, []byte(peerTestToken), 0o600))
	p := startPeerEngine(t, testBinary(t), dir, freeAddr(t), tok)
	got := listeningPorts(t, p.cmd.Process.Pid)
	want := []int{portOf(t, p.http), portOf(t, p.peerAddr)}
	sort.Ints(want)
	require.Equal(t, want, got, "the engine's listening TCP ports; logs:\n%s", p.logs)
}

// --peer-transport=rdma would expose UCX's software RMA wherever UCX_TLS
// lets it use TCP or shared memory: the engine refuses to start, naming
// the safe settings.
func TestRDMATransportRefusesNonRDMATransports(t *testing.T) {
	for _, tls := range []string{"", "tcp", "rc,tcp", "all", "sm,rc", "^ud"} {
		t.Run("UCX_TLS="+tls, func(t *testing.T) {
			t.Setenv("UCX_TLS", tls)
			var stderr bytes.Buffer
			code := dispatch(context.Background(), []string{"serve", "--peer-addr", "127.0.0.1:7400", "--peer-insecure", "--peer-transport", "rdma"},
				&bytes.Buffer{}, &stderr)
			require.Equal(t, 2, code)
			require.Contains(t, stderr.String(), "UCX_TLS")
			require.Contains(t, stderr.String(), "--peer-transport=tcp")
		})
	}
}

func portOf(t *testing.T, addr string) int {
	t.Helper()
	i := strings.LastIndexByte(addr, ':')
	port, err := strconv.Atoi(addr[i+1:])
	require.NoError(t, err)
	return port
}

// listeningPorts are the local ports of pid's listening TCP sockets (v4
// and v6), from its fds and /proc/net/tcp{,6}.
func listeningPorts(t *testing.T, pid int) []int {
	t.Helper()
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	require.NoError(t, err)
	inodes := map[string]bool{}
	for _, fd := range fds {
		target, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, fd.Name()))
		if err == nil && strings.HasPrefix(target, "socket:[") {
			inodes[strings.TrimSuffix(strings.TrimPrefix(target, "socket:["), "]")] = true
		}
	}
	var ports []int
	for _, table := range []string{"tcp", "tcp6"} {
		f, err := os.Open(fmt.Sprintf("/proc/%d/net/%s", pid, table))
		require.NoError(t, err)
		sc := bufio.NewScanner(f)
		sc.Scan() // header
		for sc.Scan() {
			fields := strings.Fields(sc.Text())
			if len(fields) < 10 || fields[3] != "0A" || !inodes[fields[9]] { // 0A: LISTEN
				continue
			}
			local := fields[1]
			port, err := strconv.ParseInt(local[strings.LastIndexByte(local, ':')+1:], 16, 32)
			require.NoError(t, err)
			ports = append(ports, int(port))
		}
		f.Close()
	}
	sort.Ints(ports)
	return ports
}
