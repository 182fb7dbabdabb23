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
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	pb "github.com/pegaflow/pegaflow/engine/api/pegaflowv1"
	"github.com/pegaflow/pegaflow/engine/peer"
)

// An engine with --peer-addr listens on its HTTP address and its peer
// address and nowhere else: no UCX lane on an ephemeral port of every
// interface (over which any process could read or write the engine's
// memory by address before this was fixed).
func TestPeerEngineListensOnlyWhereConfigured(t *testing.T) {
	p := startLonePeerEngine(t)
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
			msg := serveRDMARefused(t)
			require.Contains(t, msg, "UCX_TLS")
			require.Contains(t, msg, "--peer-transport=tcp")
		})
	}
}

// startLonePeerEngine is one engine with a peer token, on loopback.
func startLonePeerEngine(t *testing.T) *engineProc {
	t.Helper()
	skipUnlessPeerProcs(t, "starts an engine process")
	dir := t.TempDir()
	tok := filepath.Join(dir, "token")
	require.NoError(t, os.WriteFile(tok, []byte(peerTestToken), 0o600))
	return startPeerEngine(t, testBinary(t), dir, freeAddr(t), tok, "loopback:1")
}

// With RDMA transports named but no UCX_NET_DEVICES, the engine binds UCX
// to the NIC of --peer-addr; a --peer-addr whose interface has no RDMA
// device (loopback here) is refused, naming the setting.
func TestRDMATransportNeedsTheKVNIC(t *testing.T) {
	t.Setenv("UCX_TLS", "rc,ud")
	t.Setenv("UCX_NET_DEVICES", "")
	msg := serveRDMARefused(t)
	require.Contains(t, msg, "has no RDMA device")
	require.Contains(t, msg, "UCX_NET_DEVICES")
}

// serveRDMARefused runs `serve --peer-transport rdma` on loopback, requires
// exit 2 and returns what it said.
func serveRDMARefused(t *testing.T) string {
	t.Helper()
	var stderr bytes.Buffer
	code := dispatch(context.Background(), []string{"serve", "--peer-addr", "127.0.0.1:7400", "--peer-insecure", "--peer-transport", "rdma"},
		&bytes.Buffer{}, &stderr)
	require.Equal(t, 2, code)
	return stderr.String()
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

// TestPeerPortFloodKeepsEngineMemoryBounded sends the peer port what took
// the engine from 93 MB to 5.7 GB when the token was checked after the
// request was read: 32 concurrent OpenTransfer calls of 60 MiB each with a
// wrong token. The token is now checked on the call's headers before its
// message is read, and a message over what a bounded OpenTransfer needs is
// refused from its length prefix: the engine's peak RSS stays within
// 64 MiB of where it started, and every call is refused.
func TestPeerPortFloodKeepsEngineMemoryBounded(t *testing.T) {
	p := startLonePeerEngine(t)
	base := vmHWM(t, p.cmd.Process.Pid)

	hashes := make([][]byte, 1<<20) // 1M hashes of 58 bytes: ~60 MiB on the wire
	for i := range hashes {
		hashes[i] = bytes.Repeat([]byte{byte(i)}, 58)
	}
	req := &pb.PeerOpenTransferRequest{Epoch: "ep-x", NamespaceId: "ns-x", Hashes: hashes}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	for _, tc := range []struct {
		name  string
		token string
		want  codes.Code
	}{
		{"wrong token", "not-the-token-not-the-token-not-the-token", codes.PermissionDenied},
		{"the token, a message over the bound", peerTestToken, codes.ResourceExhausted},
	} {
		conn, err := grpc.NewClient("passthrough:///"+p.peerAddr, grpc.WithTransportCredentials(insecure.NewCredentials()),
			grpc.WithDefaultCallOptions(grpc.MaxCallSendMsgSize(128<<20)))
		require.NoError(t, err)
		api := pb.NewPeerClient(conn)
		cctx := metadata.AppendToOutgoingContext(ctx, peer.TokenHeader, tc.token)
		var wg sync.WaitGroup
		codesSeen := make([]codes.Code, 32)
		for i := range codesSeen {
			wg.Go(func() {
				_, err := api.OpenTransfer(cctx, req)
				codesSeen[i] = status.Code(err)
			})
		}
		wg.Wait()
		conn.Close()
		for _, c := range codesSeen {
			require.Equal(t, tc.want, c, tc.name)
		}
		peak := vmHWM(t, p.cmd.Process.Pid)
		t.Logf("%s: engine VmHWM %d MiB at start, %d MiB after 32 x 60 MiB calls", tc.name, base>>20, peak>>20)
		require.Less(t, peak, base+64<<20, "%s: the engine buffered the flood", tc.name)
	}
}
