package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "github.com/pegaflow/pegaflow/engine/api/pegaflowv1"
	"github.com/pegaflow/pegaflow/engine/client"
	"github.com/pegaflow/pegaflow/internal/kvtest"
)

// Hostile geometry: every one of 512 layers registers 16 segments over
// the same 16 bytes, so each block is 8,192 copy ops (a 1,000-ref Load of
// one block is 8 million ops; with 4096 x 16 it ran the engine out of
// memory).
const (
	hostileLayers   = 512
	hostileSegments = 16
	hostileBlocks   = 64
	hostileOps      = hostileLayers * hostileSegments
)

func hostileRegister(t *testing.T) *pb.RegisterRequest {
	t.Helper()
	f, err := os.CreateTemp(kvtest.ShmDir(), "pf-hostile-*")
	require.NoError(t, err)
	t.Cleanup(func() { os.Remove(f.Name()) })
	size := uint64(16 * hostileBlocks)
	require.NoError(t, f.Truncate(int64(size)))
	f.Close()
	spec := kvtest.Spec{Layout: kvtest.FlashAttn, Layers: hostileLayers, BlockSize: 1, Heads: 1, HeadSize: 8, ElemSize: 2}
	req := &pb.RegisterRequest{InstanceId: "hostile", Namespace: spec.Namespace("hostile", 1), NumBlocks: hostileBlocks,
		Regions: []*pb.MemoryRegion{{Source: &pb.MemoryRegion_ShmPath{ShmPath: f.Name()}, Size: size}}}
	for l := range hostileLayers {
		layer := &pb.LayerLayout{Name: fmt.Sprint("layer.", l)}
		for range hostileSegments {
			layer.Segments = append(layer.Segments, &pb.Segment{Offset: 0, Stride: 16, Length: 16})
		}
		req.Layers = append(req.Layers, layer)
	}
	return req
}

// vmHWM is the peak resident set of a process, from /proc.
func vmHWM(t *testing.T, pid int) uint64 {
	t.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	require.NoError(t, err)
	for _, line := range strings.Split(string(data), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			kb, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			require.NoError(t, err)
			return kb << 10
		}
	}
	t.Fatal("no VmHWM in /proc status")
	return 0
}

// TestHostileLoadKeepsEngineMemoryBounded runs the real binary and sends,
// through its socket, the Load that used to exhaust its memory (1,000
// refs of one sealed block) plus many concurrent Loads that each fit the
// copy budget: the first is refused, the others wait for each other, and
// the engine's peak RSS stays far below what the copy plans would take
// unbounded.
func TestHostileLoadKeepsEngineMemoryBounded(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	bin := testBinary(t)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := lis.Addr().String()
	lis.Close()
	sock := filepath.Join(t.TempDir(), "engine.sock")
	// Room for 32 blocks' ops in flight: one 32-ref Load at a time.
	cmd := exec.Command(bin, "serve", "--socket", sock, "--http-addr", addr, "--pool-size", "32MiB",
		"--mlock=false", "--hugepages=false", "--max-copy-ops", strconv.Itoa(32*hostileOps))
	cmd.Env = append(os.Environ(), "GOMEMLIMIT=256MiB")
	var logs bytes.Buffer
	cmd.Stderr = &logs
	require.NoError(t, cmd.Start())
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	require.Eventually(t, func() bool {
		resp, err := http.Get("http://" + addr + "/health")
		if err == nil {
			resp.Body.Close()
		}
		return err == nil && resp.StatusCode == http.StatusOK
	}, 10*time.Second, 20*time.Millisecond, "serve never became healthy: %s", &logs)
	base := vmHWM(t, cmd.Process.Pid)

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	c, err := client.Dial(ctx, sock, "hostile")
	require.NoError(t, err)
	defer c.Close()
	_, err = c.Register(ctx, hostileRegister(t))
	require.NoError(t, err)
	hashes := kvtest.Hashes("hostile", 32)
	blocks := make([]*pb.BlockRef, len(hashes))
	for i, h := range hashes {
		blocks[i] = &pb.BlockRef{BlockId: uint32(i), Hash: h}
	}
	saved, err := c.Save(ctx, &pb.SaveRequest{InstanceId: "hostile", Blocks: blocks})
	require.NoError(t, err)
	require.EqualValues(t, len(hashes), saved.Saved)

	same := make([]*pb.BlockRef, 1000)
	for i := range same {
		same[i] = &pb.BlockRef{BlockId: 0, Hash: hashes[0]}
	}
	_, err = c.Load(ctx, &pb.LoadRequest{InstanceId: "hostile", Blocks: same})
	require.Equal(t, codes.InvalidArgument, status.Code(err), "1,000 refs of one block: %v", err)

	// 32 concurrent Loads of 32 distinct blocks: 8M ops if unbounded.
	var wg sync.WaitGroup
	for i := range 32 {
		wg.Go(func() {
			refs := make([]*pb.BlockRef, len(hashes))
			for j, h := range hashes {
				refs[j] = &pb.BlockRef{BlockId: uint32(32 + (i+j)%32), Hash: h}
			}
			resp, err := c.Load(ctx, &pb.LoadRequest{InstanceId: "hostile", Blocks: refs})
			if !(err == nil && len(resp.Status) == len(refs) && resp.Status[0] == pb.BlockStatus_BLOCK_STATUS_OK) {
				t.Errorf("load %d: %v", i, err)
			}
		})
	}
	wg.Wait()

	h, err := c.Health(ctx)
	require.NoError(t, err, "engine still serving; logs: %s", &logs)
	require.Equal(t, "ok", h.Status)
	peak := vmHWM(t, cmd.Process.Pid)
	t.Logf("engine VmHWM: %d MiB at start, %d MiB after the hostile loads", base>>20, peak>>20)
	require.Less(t, peak, uint64(300<<20), "engine peak RSS must stay bounded by its configuration")
}

// The engine's callback allowlist defaults to the in-process router's
// own /kv_ready, else loopback.
func TestDefaultKVReadyAllow(t *testing.T) {
	cases := []struct {
		args []string
		want []string
	}{
		{nil, []string{"loopback"}},
		{[]string{"--prefill", "http://p:1", "--decode", "http://d:1", "--http-addr", "0.0.0.0:9000"}, []string{"127.0.0.1:9000"}},
		{[]string{"--prefill", "http://p:1", "--decode", "http://d:1", "--kv-ready-addr", "10.0.0.5:9001"}, []string{"10.0.0.5:9001"}},
		{[]string{"--prefill", "http://p:1", "--decode", "http://d:1", "--kv-ready-url", "http://r:80/kv_ready"}, []string{"http://r:80/kv_ready"}},
		{[]string{"--kv-ready-allow", "r:1", "--kv-ready-allow", "loopback"}, []string{"r:1", "loopback"}},
	}
	for _, tc := range cases {
		f, err := parseServeFlags(tc.args, io.Discard)
		require.NoError(t, err, "%q", tc.args)
		require.Equal(t, tc.want, []string(f.kvReadyAllow), "%q", tc.args)
	}
}
