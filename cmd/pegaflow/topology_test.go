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
	"testing"
	"time"

	"github.com/labstack/echo/v4"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"

	"github.com/pegaflow/pegaflow/engine"
	"github.com/pegaflow/pegaflow/engine/topology"
	"github.com/pegaflow/pegaflow/engine/topology/nvmlshim/nvmlfake"
	"github.com/pegaflow/pegaflow/native"
)

// topologyJSON is the documented /topology shape, decoded independently of
// the types that produce it.
type topologyJSON struct {
	Mode          string `json:"mode"`
	Reason        string `json:"reason"`
	Backend       string `json:"backend"`
	DriverVersion string `json:"driver_version"`
	Pool          struct {
		NUMANode int    `json:"numa_node"`
		Reason   string `json:"reason"`
		Spread   bool   `json:"spread"`
		Pools    []struct {
			NUMANode  int    `json:"numa_node"`
			GPUs      int    `json:"gpus"`
			SizeBytes uint64 `json:"size_bytes"`
		} `json:"pools"`
	} `json:"pool"`
	Devices []struct {
		Index       int      `json:"index"`
		UUID        string   `json:"uuid"`
		Name        string   `json:"name"`
		PCIBusID    string   `json:"pci_bus_id"`
		NUMANode    int      `json:"numa_node"`
		MemoryBytes uint64   `json:"memory_bytes"`
		NVLinkLinks int      `json:"nvlink_links"`
		NVLinkPeers []int    `json:"nvlink_peers"`
		P2PPeers    []int    `json:"p2p_peers"`
		MIGDevices  []string `json:"mig_devices"`
	} `json:"devices"`
}

func TestTopologyHandler(t *testing.T) {
	twoGPUs := func(nodeB int) *topology.Topology {
		return &topology.Topology{Mode: topology.ModeCUDA, DriverVersion: "550.54.15", Devices: []topology.Device{
			{Index: 0, UUID: "GPU-a", Name: "NVIDIA H100 80GB HBM3", PCIBusID: "0000:18:00.0", NUMANode: 0, MemoryBytes: 80 << 30,
				NVLinkLinks: 18, NVLinkPeers: []int{1}, P2PPeers: []int{1}},
			{Index: 1, UUID: "GPU-b", Name: "NVIDIA H100 80GB HBM3", PCIBusID: "0000:2a:00.0", NUMANode: nodeB, MemoryBytes: 80 << 30,
				NVLinkLinks: 18, NVLinkPeers: []int{0}, P2PPeers: []int{0}},
		}}
	}
	type pool struct{ node, gpus, mib int }
	tests := []struct {
		name  string
		topo  *topology.Topology
		mode  string
		node  int
		gpus  int
		pools []pool
	}{
		{"cpu", topology.CPU("nvml init: ERROR_LIBRARY_NOT_FOUND"), "cpu", -1, 0, []pool{{-1, 0, 2}}},
		{"cuda", twoGPUs(0), "cuda", 0, 2, []pool{{0, 2, 2}}},
		{"cuda, GPUs on two nodes", twoGPUs(1), "cuda", 0, 2, []pool{{0, 1, 1}, {1, 1, 1}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			eng, err := engine.New(engine.Config{PoolSize: 2 << 20, NUMANode: -1, Device: -1, Topology: tc.topo}, nil, prometheus.NewRegistry())
			require.NoError(t, err)
			defer eng.Close()
			e := echo.New()
			e.GET("/topology", topologyHandler(eng))
			rec := httptest.NewRecorder()
			e.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/topology", nil))
			require.Equal(t, http.StatusOK, rec.Code)
			var got topologyJSON
			require.NoError(t, json.Unmarshal(rec.Body.Bytes(), &got))
			require.Equal(t, tc.mode, got.Mode)
			require.Equal(t, native.Backend(), got.Backend)
			require.Equal(t, tc.node, got.Pool.NUMANode)
			require.NotEmpty(t, got.Pool.Reason)
			require.Equal(t, len(tc.pools) > 1, got.Pool.Spread)
			require.Len(t, got.Pool.Pools, len(tc.pools))
			for i, p := range tc.pools {
				require.Equal(t, p.node, got.Pool.Pools[i].NUMANode)
				require.Equal(t, p.gpus, got.Pool.Pools[i].GPUs)
				require.EqualValues(t, p.mib<<20, got.Pool.Pools[i].SizeBytes)
			}
			require.Len(t, got.Devices, tc.gpus)
			require.Contains(t, rec.Body.String(), `"devices":[`, "an empty list, never null")
			if tc.gpus > 0 {
				require.Equal(t, "550.54.15", got.DriverVersion)
				require.Equal(t, "0000:2a:00.0", got.Devices[1].PCIBusID)
				require.Equal(t, []int{0}, got.Devices[1].NVLinkPeers)
			} else {
				require.Contains(t, got.Reason, "ERROR_LIBRARY_NOT_FOUND")
			}
		})
	}
}

// syncBuffer is a log sink safe for the serve goroutines.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// awaitTopology polls serve's /topology for up to 10 s.
func awaitTopology(t *testing.T, addr string, logs fmt.Stringer) topologyJSON {
	t.Helper()
	var got topologyJSON
	require.Eventually(t, func() bool {
		resp, err := http.Get("http://" + addr + "/topology")
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		return resp.StatusCode == http.StatusOK && json.NewDecoder(resp.Body).Decode(&got) == nil
	}, 10*time.Second, 20*time.Millisecond, "no /topology: %s", logs)
	return got
}

// TestServeTopology runs serve with the host's real NVML: CPU mode, said
// once, where there is no driver; the GPUs where there is one.
func TestServeTopology(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := lis.Addr().String()
	require.NoError(t, lis.Close())
	f, err := parseServeFlags([]string{"--socket", filepath.Join(t.TempDir(), "engine.sock"), "--http-addr", addr, "--pool-size", "4MiB"}, io.Discard)
	require.NoError(t, err)
	var logs syncBuffer
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- serve(ctx, f, slog.New(slog.NewTextHandler(&logs, nil))) }()
	defer func() {
		cancel()
		require.NoError(t, <-done)
	}()

	got := awaitTopology(t, addr, &logs)
	require.Equal(t, native.Backend(), got.Backend)
	if got.Mode == topology.ModeCPU {
		require.Empty(t, got.Devices)
		require.NotEmpty(t, got.Reason)
		require.Equal(t, -1, got.Pool.NUMANode)
		require.Len(t, got.Pool.Pools, 1)
		require.EqualValues(t, 4<<20, got.Pool.Pools[0].SizeBytes)
		require.Equal(t, 1, strings.Count(logs.String(), "no NVML: CPU mode"), logs.String())
	} else {
		require.Equal(t, topology.ModeCUDA, got.Mode)
		require.NotEmpty(t, got.Devices)
	}

	resp, err := http.Get("http://" + addr + "/metrics")
	require.NoError(t, err)
	body, err := io.ReadAll(resp.Body)
	require.NoError(t, resp.Body.Close())
	require.NoError(t, err)
	require.Contains(t, string(body), "pegaflow_engine_gpus ")
	require.Contains(t, string(body), "pegaflow_engine_pool_numa_node ")
	require.Contains(t, string(body), "pegaflow_engine_numa_pool_capacity_bytes{numa_node=")
}

// TestServeProcessNVML runs the hardened binary (BIND_NOW) as a process with
// a fake libnvidia-ml.so.1 first on LD_LIBRARY_PATH, and with the host's
// own libraries: it starts either way, lists the fake's GPUs through go-nvml
// and the nvmlshim forwarders, and without NVML serves in CPU mode. Without
// the forwarders it does not start at all (undefined symbol: nvml...).
func TestServeProcessNVML(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	bin := testBinary(t)
	fake := nvmlfake.Build(t)
	tests := []struct {
		name    string
		libPath string // prepended to LD_LIBRARY_PATH; "" = the host's
		fake    bool
	}{
		{"fake NVML", fake, true},
		{"host NVML or none", "", false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			lis, err := net.Listen("tcp", "127.0.0.1:0")
			require.NoError(t, err)
			addr := lis.Addr().String()
			require.NoError(t, lis.Close())
			cmd := exec.Command(bin, "serve", "--socket", filepath.Join(t.TempDir(), "engine.sock"), "--http-addr", addr, "--pool-size", "4MiB")
			cmd.Env = os.Environ()
			if tc.libPath != "" {
				cmd.Env = append(cmd.Env, "LD_LIBRARY_PATH="+tc.libPath+":"+os.Getenv("LD_LIBRARY_PATH"))
			}
			var logs syncBuffer
			cmd.Stderr = &logs
			require.NoError(t, cmd.Start())
			defer cmd.Process.Kill()

			got := awaitTopology(t, addr, &logs)
			switch {
			case tc.fake:
				require.Equal(t, topology.ModeCUDA, got.Mode, logs.String())
				require.Equal(t, nvmlfake.Driver, got.DriverVersion)
				require.Len(t, got.Devices, nvmlfake.GPUs)
				require.Equal(t, "GPU-fake-1", got.Devices[1].UUID)
				require.Equal(t, "0000:f1:00.0", got.Devices[1].PCIBusID)
				require.Equal(t, 1, got.Devices[1].NVLinkLinks)
			case got.Mode == topology.ModeCPU:
				require.Contains(t, got.Reason, "ERROR_LIBRARY_NOT_FOUND")
				require.Contains(t, logs.String(), "no NVML: CPU mode")
			default: // a GPU host: its real GPUs
				require.NotEmpty(t, got.Devices)
				require.NotContains(t, got.Devices[0].UUID, "fake")
			}
			stopServe(t, cmd, &logs)
		})
	}
}
