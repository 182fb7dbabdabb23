package topology

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"path/filepath"
	"strings"
	"testing"
	"testing/fstest"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock"
	"github.com/stretchr/testify/require"

	"github.com/pegaflow/pegaflow/engine/topology/nvmlshim/nvmlfake"
)

// gpuSpec describes one GPU of a fake host. The fake is NVIDIA's generated
// mock of the go-nvml interfaces, so List runs the same calls and sees the
// same Return codes as against libnvidia-ml.
type gpuSpec struct {
	uuid, bus  string // bus in NVML's form: "00000000:3B:00.0"
	sysNode    string // content of sysfs numa_node; "" = no file
	nvmlNode   int    // GetNumaNodeId; < 0 = NOT_SUPPORTED
	memory     uint64
	links      []int // NVLink link i ends at GPU links[i] (-1: an NVSwitch)
	noP2PQuery bool  // GetP2PStatus answers NOT_SUPPORTED
	p2pRead    []int
	mig        []string
	lost       bool // GetUUID fails with GPU_IS_LOST
}

func cstr32(s string) [32]int8 {
	var out [32]int8
	for i := 0; i < len(s) && i < 31; i++ {
		out[i] = int8(s[i])
	}
	return out
}

func fakeHost(specs []gpuSpec) (*mock.Interface, fstest.MapFS) {
	sys := fstest.MapFS{}
	devs := make([]*mock.Device, len(specs))
	for i := range specs {
		devs[i] = &mock.Device{}
	}
	for i, s := range specs {
		d := devs[i]
		if s.sysNode != "" {
			norm, _ := parseBusID(s.bus)
			sys["bus/pci/devices/"+norm+"/numa_node"] = &fstest.MapFile{Data: []byte(s.sysNode + "\n")}
		}
		d.GetUUIDFunc = func() (string, nvml.Return) {
			if s.lost {
				return "", nvml.ERROR_GPU_IS_LOST
			}
			return s.uuid, nvml.SUCCESS
		}
		d.GetIndexFunc = func() (int, nvml.Return) { return i, nvml.SUCCESS }
		d.GetNameFunc = func() (string, nvml.Return) { return "NVIDIA H100 80GB HBM3", nvml.SUCCESS }
		d.GetPciInfoFunc = func() (nvml.PciInfo, nvml.Return) { return nvml.PciInfo{BusId: cstr32(s.bus)}, nvml.SUCCESS }
		d.GetMemoryInfoFunc = func() (nvml.Memory, nvml.Return) { return nvml.Memory{Total: s.memory}, nvml.SUCCESS }
		d.GetNumaNodeIdFunc = func() (int, nvml.Return) {
			if s.nvmlNode < 0 {
				return 0, nvml.ERROR_NOT_SUPPORTED
			}
			return s.nvmlNode, nvml.SUCCESS
		}
		d.GetMigModeFunc = func() (int, int, nvml.Return) {
			if len(s.mig) == 0 {
				return nvml.DEVICE_MIG_DISABLE, nvml.DEVICE_MIG_DISABLE, nvml.SUCCESS
			}
			return nvml.DEVICE_MIG_ENABLE, nvml.DEVICE_MIG_ENABLE, nvml.SUCCESS
		}
		d.GetMaxMigDeviceCountFunc = func() (int, nvml.Return) { return 7, nvml.SUCCESS }
		d.GetMigDeviceHandleByIndexFunc = func(n int) (nvml.Device, nvml.Return) {
			if n >= len(s.mig) {
				return nil, nvml.ERROR_NOT_FOUND
			}
			u := s.mig[n]
			return &mock.Device{GetUUIDFunc: func() (string, nvml.Return) { return u, nvml.SUCCESS }}, nvml.SUCCESS
		}
		d.GetNvLinkStateFunc = func(link int) (nvml.EnableState, nvml.Return) {
			if len(s.links) == 0 {
				return 0, nvml.ERROR_NOT_SUPPORTED
			}
			if link >= len(s.links) {
				return 0, nvml.ERROR_INVALID_ARGUMENT
			}
			return nvml.FEATURE_ENABLED, nvml.SUCCESS
		}
		d.GetNvLinkRemotePciInfoFunc = func(link int) (nvml.PciInfo, nvml.Return) {
			if to := s.links[link]; to >= 0 {
				return nvml.PciInfo{BusId: cstr32(specs[to].bus)}, nvml.SUCCESS
			}
			return nvml.PciInfo{BusId: cstr32(fmt.Sprintf("00000000:%02X:00.0", 0xE0+link))}, nvml.SUCCESS
		}
		d.GetP2PStatusFunc = func(other nvml.Device, idx nvml.GpuP2PCapsIndex) (nvml.GpuP2PStatus, nvml.Return) {
			if s.noP2PQuery {
				return 0, nvml.ERROR_NOT_SUPPORTED
			}
			j := -1
			for k, od := range devs {
				if nvml.Device(od) == other {
					j = k
				}
			}
			var peers []int
			switch idx {
			case nvml.P2P_CAPS_INDEX_NVLINK:
				// NVSwitch: every GPU with a switch link reaches every other one.
				for _, to := range s.links {
					if to == j || (to < 0 && hasSwitch(specs[j])) {
						peers = append(peers, j)
					}
				}
			case nvml.P2P_CAPS_INDEX_READ:
				peers = s.p2pRead
			}
			for _, p := range peers {
				if p == j {
					return nvml.P2P_STATUS_OK, nvml.SUCCESS
				}
			}
			return nvml.P2P_STATUS_NOT_SUPPORTED, nvml.SUCCESS
		}
	}
	lib := &mock.Interface{
		InitFunc:                   func() nvml.Return { return nvml.SUCCESS },
		ShutdownFunc:               func() nvml.Return { return nvml.SUCCESS },
		SystemGetDriverVersionFunc: func() (string, nvml.Return) { return "550.54.15", nvml.SUCCESS },
		DeviceGetCountFunc:         func() (int, nvml.Return) { return len(devs), nvml.SUCCESS },
		DeviceGetHandleByIndexFunc: func(i int) (nvml.Device, nvml.Return) {
			if i < 0 || i >= len(devs) {
				return nil, nvml.ERROR_INVALID_ARGUMENT
			}
			return devs[i], nvml.SUCCESS
		},
	}
	return lib, sys
}

func hasSwitch(s gpuSpec) bool {
	for _, to := range s.links {
		if to < 0 {
			return true
		}
	}
	return false
}

func TestNVMLList(t *testing.T) {
	const gib = 1 << 30
	tests := []struct {
		name  string
		specs []gpuSpec
		want  []Device
	}{
		{
			name: "two PCIe GPUs, sysfs NUMA, P2P read only",
			specs: []gpuSpec{
				{uuid: "GPU-aaaa", bus: "00000000:3B:00.0", sysNode: "0", nvmlNode: -1, memory: 80 * gib, p2pRead: []int{1}},
				{uuid: "GPU-bbbb", bus: "00000000:D8:00.0", sysNode: "1", nvmlNode: -1, memory: 80 * gib, p2pRead: []int{0}},
			},
			want: []Device{
				{Index: 0, UUID: "GPU-aaaa", PCIBusID: "0000:3b:00.0", NUMANode: 0, MemoryBytes: 80 * gib, NVLinkPeers: []int{}, P2PPeers: []int{1}},
				{Index: 1, UUID: "GPU-bbbb", PCIBusID: "0000:d8:00.0", NUMANode: 1, MemoryBytes: 80 * gib, NVLinkPeers: []int{}, P2PPeers: []int{0}},
			},
		},
		{
			name: "NVSwitch: links end at switches, P2P status names the peers",
			specs: []gpuSpec{
				{uuid: "GPU-0", bus: "0000:18:00.0", sysNode: "0", nvmlNode: -1, links: []int{-1, -1}, p2pRead: []int{1, 2}},
				{uuid: "GPU-1", bus: "0000:2a:00.0", sysNode: "0", nvmlNode: -1, links: []int{-1, -1}, p2pRead: []int{0, 2}},
				{uuid: "GPU-2", bus: "0000:9a:00.0", sysNode: "1", nvmlNode: -1, links: []int{-1, -1}, p2pRead: []int{0, 1}},
			},
			want: []Device{
				{Index: 0, UUID: "GPU-0", PCIBusID: "0000:18:00.0", NUMANode: 0, NVLinkLinks: 2, NVLinkPeers: []int{1, 2}, P2PPeers: []int{1, 2}},
				{Index: 1, UUID: "GPU-1", PCIBusID: "0000:2a:00.0", NUMANode: 0, NVLinkLinks: 2, NVLinkPeers: []int{0, 2}, P2PPeers: []int{0, 2}},
				{Index: 2, UUID: "GPU-2", PCIBusID: "0000:9a:00.0", NUMANode: 1, NVLinkLinks: 2, NVLinkPeers: []int{0, 1}, P2PPeers: []int{0, 1}},
			},
		},
		{
			name: "bridge pair without P2P status: direct links count; no sysfs: NVML node",
			specs: []gpuSpec{
				{uuid: "GPU-0", bus: "00000000:01:00.0", nvmlNode: 3, links: []int{1, 1}, noP2PQuery: true},
				{uuid: "GPU-1", bus: "00000000:02:00.0", nvmlNode: -1, links: []int{0, 0}, noP2PQuery: true},
			},
			want: []Device{
				{Index: 0, UUID: "GPU-0", PCIBusID: "0000:01:00.0", NUMANode: 3, NVLinkLinks: 2, NVLinkPeers: []int{1}, P2PPeers: []int{}},
				{Index: 1, UUID: "GPU-1", PCIBusID: "0000:02:00.0", NUMANode: -1, NVLinkLinks: 2, NVLinkPeers: []int{0}, P2PPeers: []int{}},
			},
		},
		{
			name: "sysfs -1 beats NVML; MIG devices listed; a lost GPU is skipped",
			specs: []gpuSpec{
				{uuid: "GPU-0", bus: "00000000:01:00.0", sysNode: "-1", nvmlNode: 2, mig: []string{"MIG-x", "MIG-y"}},
				{uuid: "GPU-1", bus: "00000000:02:00.0", lost: true},
			},
			want: []Device{
				{Index: 0, UUID: "GPU-0", PCIBusID: "0000:01:00.0", NUMANode: -1, NVLinkPeers: []int{}, P2PPeers: []int{}, MIGDevices: []string{"MIG-x", "MIG-y"}},
			},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			lib, sys := fakeHost(tc.specs)
			topo, err := (&NVML{Lib: lib, SysFS: sys}).List(context.Background())
			require.NoError(t, err)
			require.Equal(t, ModeCUDA, topo.Mode)
			require.Equal(t, "550.54.15", topo.DriverVersion)
			for i := range topo.Devices {
				topo.Devices[i].Name = "" // not what the table is about
			}
			require.Equal(t, tc.want, topo.Devices)
			require.Len(t, lib.ShutdownCalls(), 1, "NVML is shut down after listing")
		})
	}
}

func TestNVMLFailures(t *testing.T) {
	t.Run("init fails", func(t *testing.T) {
		lib := &mock.Interface{InitFunc: func() nvml.Return { return nvml.ERROR_LIBRARY_NOT_FOUND }}
		_, err := (&NVML{Lib: lib}).List(context.Background())
		require.ErrorContains(t, err, "nvml init")
		require.Empty(t, lib.ShutdownCalls(), "no shutdown without a successful init")
	})
	t.Run("no GPU", func(t *testing.T) {
		lib, sys := fakeHost(nil)
		topo, err := (&NVML{Lib: lib, SysFS: sys}).List(context.Background())
		require.NoError(t, err)
		require.False(t, topo.GPU())
		require.Contains(t, topo.Reason, "no usable GPU")
	})
	t.Run("cancelled", func(t *testing.T) {
		lib, sys := fakeHost([]gpuSpec{{uuid: "GPU-0", bus: "0000:01:00.0"}})
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		_, err := (&NVML{Lib: lib, SysFS: sys}).List(ctx)
		require.ErrorIs(t, err, context.Canceled)
	})
}

// TestRealNVML runs the real go-nvml against this host: CPU mode with a
// reason where there is no driver (CI), the GPUs where there is one.
func TestRealNVML(t *testing.T) {
	var logs bytes.Buffer
	topo := Discover(context.Background(), NewNVML(nil), slog.New(slog.NewTextHandler(&logs, nil)))
	if !topo.GPU() {
		require.Equal(t, ModeCPU, topo.Mode)
		require.NotEmpty(t, topo.Reason)
		require.Equal(t, 1, strings.Count(logs.String(), "no NVML: CPU mode"), logs.String())
		return
	}
	for _, d := range topo.Devices {
		require.True(t, strings.HasPrefix(d.UUID, "GPU-"), d.UUID)
		require.NotEmpty(t, d.PCIBusID)
		require.NotZero(t, d.MemoryBytes)
	}
}

// TestFakeLibraryNVML runs List over go-nvml, the nvmlshim forwarders and a
// real shared library (nvmlfake), which lacks most NVML functions: those
// answer ERROR_FUNCTION_NOT_FOUND and List leaves their facts unknown.
func TestFakeLibraryNVML(t *testing.T) {
	lib := nvml.New(nvml.WithLibraryPath(filepath.Join(nvmlfake.Build(t), "libnvidia-ml.so.1")))
	topo, err := (&NVML{Lib: lib, SysFS: fstest.MapFS{}}).List(context.Background())
	require.NoError(t, err)
	require.Equal(t, ModeCUDA, topo.Mode)
	require.Equal(t, nvmlfake.Driver, topo.DriverVersion)
	require.Len(t, topo.Devices, nvmlfake.GPUs)
	for i, d := range topo.Devices {
		require.Equal(t, Device{
			Index: i, UUID: fmt.Sprintf("GPU-fake-%d", i), Name: "Fake GPU", PCIBusID: fmt.Sprintf("0000:f%d:00.0", i),
			NUMANode: -1, MemoryBytes: uint64(i+1) << 30, NVLinkLinks: 1, NVLinkPeers: []int{}, P2PPeers: []int{},
		}, d)
	}
}

func TestParseBusID(t *testing.T) {
	tests := []struct {
		in, want string
		ok       bool
	}{
		{"00000000:3B:00.0", "0000:3b:00.0", true},
		{"0000:3b:00.0", "0000:3b:00.0", true},
		{"3b:00.0", "0000:3b:00.0", true},
		{"00000001:C1:1F.7", "0001:c1:1f.7", true},
		{"", "", false},
		{"zz:00.0", "", false},
		{"0000:3b:00", "", false},
		{"0000:3b:20.0", "", false},
	}
	for _, tc := range tests {
		got, ok := parseBusID(tc.in)
		require.Equal(t, tc.ok, ok, tc.in)
		require.Equal(t, tc.want, got, tc.in)
	}
}
