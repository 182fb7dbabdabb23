package topology

import (
	"bytes"
	"context"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"slices"
	"strconv"
	"strings"

	"github.com/NVIDIA/go-nvml/pkg/nvml"

	// Defines go-nvml's NVML symbols, so the binary links with BIND_NOW.
	_ "github.com/pegaflow/pegaflow/engine/topology/nvmlshim"
)

// NVML lists GPUs through go-nvml, which dlopens libnvidia-ml.so.1 at Init:
// the binary builds and starts everywhere and Init fails cleanly on hosts
// without the driver.
type NVML struct {
	// Lib is the NVML library (nvml.New() for the real one).
	Lib nvml.Interface
	// SysFS is /sys, where a GPU's NUMA node is read from its PCI device.
	SysFS fs.FS
	Log   *slog.Logger
}

// NewNVML returns the lister of the host's real NVML and /sys.
func NewNVML(log *slog.Logger) *NVML {
	return &NVML{Lib: nvml.New(), SysFS: os.DirFS("/sys"), Log: log}
}

func nvmlErr(what string, ret nvml.Return) error {
	return fmt.Errorf("nvml %s: %s (%d)", what, ret.Error(), int32(ret))
}

// List initialises NVML, reads every GPU and shuts NVML down again: the
// engine needs the facts once, not a live handle.
func (n *NVML) List(ctx context.Context) (*Topology, error) {
	log := n.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if ret := n.Lib.Init(); ret != nvml.SUCCESS {
		return nil, nvmlErr("init", ret)
	}
	defer func() {
		if ret := n.Lib.Shutdown(); ret != nvml.SUCCESS {
			log.Debug("nvml shutdown", "err", nvmlErr("shutdown", ret))
		}
	}()
	t := &Topology{Mode: ModeCUDA, Devices: []Device{}}
	if v, ret := n.Lib.SystemGetDriverVersion(); ret == nvml.SUCCESS {
		t.DriverVersion = v
	}
	count, ret := n.Lib.DeviceGetCount()
	if ret != nvml.SUCCESS {
		return nil, nvmlErr("device count", ret)
	}
	handles := make([]nvml.Device, 0, count)
	for i := range count {
		if err := ctx.Err(); err != nil {
			return nil, fmt.Errorf("list GPUs: %w", err)
		}
		h, ret := n.Lib.DeviceGetHandleByIndex(i)
		if ret != nvml.SUCCESS {
			// A lost or unsupported GPU must not take the others down.
			log.Warn("skipping GPU", "index", i, "err", nvmlErr("handle", ret))
			continue
		}
		d, err := n.device(i, h)
		if err != nil {
			log.Warn("skipping GPU", "index", i, "err", err)
			continue
		}
		t.Devices = append(t.Devices, d)
		handles = append(handles, h)
	}
	if len(t.Devices) == 0 {
		t.Mode, t.Reason = ModeCPU, fmt.Sprintf("NVML (driver %s) lists no usable GPU", t.DriverVersion)
		return t, nil
	}
	n.links(t, handles)
	return t, nil
}

func (n *NVML) device(i int, h nvml.Device) (Device, error) {
	d := Device{Index: i, NUMANode: -1, NVLinkPeers: []int{}, P2PPeers: []int{}}
	var ret nvml.Return
	if d.UUID, ret = h.GetUUID(); ret != nvml.SUCCESS {
		return d, nvmlErr("uuid", ret)
	}
	if idx, ret := h.GetIndex(); ret == nvml.SUCCESS {
		d.Index = idx
	}
	if name, ret := h.GetName(); ret == nvml.SUCCESS {
		d.Name = name
	}
	if pci, ret := h.GetPciInfo(); ret == nvml.SUCCESS {
		d.PCIBusID = busID(pci)
	}
	if mem, ret := h.GetMemoryInfo(); ret == nvml.SUCCESS {
		d.MemoryBytes = mem.Total
	}
	d.NUMANode = n.numaNode(h, d.PCIBusID)
	d.MIGDevices = migDevices(h)
	return d, nil
}

// numaNode prefers sysfs: it is the CPU-side node of the PCIe root, which
// is where pinned host memory belongs. NVML's GetNumaNodeId only answers on
// platforms where GPU memory is itself a NUMA node (Grace), and there it
// names the GPU's memory node, so it is only a fallback.
func (n *NVML) numaNode(h nvml.Device, bus string) int {
	if bus != "" && n.SysFS != nil {
		if b, err := fs.ReadFile(n.SysFS, "bus/pci/devices/"+bus+"/numa_node"); err == nil {
			if v, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && v >= 0 {
				return v
			}
			// -1: the kernel knows no node (single-node host or firmware gap).
			return -1
		}
	}
	if v, ret := h.GetNumaNodeId(); ret == nvml.SUCCESS && v >= 0 {
		return v
	}
	return -1
}

func migDevices(h nvml.Device) []string {
	cur, _, ret := h.GetMigMode()
	if ret != nvml.SUCCESS || cur != nvml.DEVICE_MIG_ENABLE {
		return nil
	}
	slots, ret := h.GetMaxMigDeviceCount()
	if ret != nvml.SUCCESS {
		return nil
	}
	var out []string
	for i := range slots {
		m, ret := h.GetMigDeviceHandleByIndex(i)
		if ret != nvml.SUCCESS {
			continue // unpopulated slot
		}
		if u, ret := m.GetUUID(); ret == nvml.SUCCESS {
			out = append(out, u)
		}
	}
	return out
}

// links fills NVLink and P2P facts. P2P status over the NVLink index covers
// NVSwitch systems, where every link ends at a switch rather than a GPU;
// when the driver cannot answer it, a link whose far end is a local GPU
// still counts.
func (n *NVML) links(t *Topology, handles []nvml.Device) {
	byBus := map[string]int{}
	for _, d := range t.Devices {
		byBus[d.PCIBusID] = d.Index
	}
	for i := range t.Devices {
		d := &t.Devices[i]
		h := handles[i]
		direct := map[int]bool{}
		for link := range nvml.NVLINK_MAX_LINKS {
			state, ret := h.GetNvLinkState(link)
			if ret != nvml.SUCCESS {
				if ret == nvml.ERROR_NOT_SUPPORTED || ret == nvml.ERROR_INVALID_ARGUMENT {
					break // no (more) links on this GPU
				}
				continue
			}
			if state != nvml.FEATURE_ENABLED {
				continue
			}
			d.NVLinkLinks++
			if pci, ret := h.GetNvLinkRemotePciInfo(link); ret == nvml.SUCCESS {
				if peer, ok := byBus[busID(pci)]; ok && peer != d.Index {
					direct[peer] = true
				}
			}
		}
		for j := range t.Devices {
			if j == i {
				continue
			}
			peer := t.Devices[j].Index
			nv, ret := h.GetP2PStatus(handles[j], nvml.P2P_CAPS_INDEX_NVLINK)
			if (ret == nvml.SUCCESS && nv == nvml.P2P_STATUS_OK) || (ret != nvml.SUCCESS && direct[peer]) {
				d.NVLinkPeers = append(d.NVLinkPeers, peer)
			}
			if rd, ret := h.GetP2PStatus(handles[j], nvml.P2P_CAPS_INDEX_READ); ret == nvml.SUCCESS && rd == nvml.P2P_STATUS_OK {
				d.P2PPeers = append(d.P2PPeers, peer)
			}
		}
		slices.Sort(d.NVLinkPeers)
		slices.Sort(d.P2PPeers)
	}
}

// busID renders NVML's PCI info in sysfs form. NVML's string has an 8-digit
// domain and upper-case hex ("00000000:3B:00.0"); sysfs has 4 digits, lower
// case ("0000:3b:00.0").
func busID(p nvml.PciInfo) string {
	raw := make([]byte, 0, len(p.BusId))
	for _, c := range p.BusId {
		if c == 0 {
			break
		}
		raw = append(raw, byte(c))
	}
	if s, ok := parseBusID(string(bytes.TrimSpace(raw))); ok {
		return s
	}
	if p.Domain == 0 && p.Bus == 0 && p.Device == 0 {
		return ""
	}
	return fmt.Sprintf("%04x:%02x:%02x.0", p.Domain, p.Bus, p.Device)
}

// parseBusID normalises "[domain:]bus:device.function" to sysfs form.
func parseBusID(s string) (string, bool) {
	parts := strings.Split(s, ":")
	if len(parts) == 2 {
		parts = append([]string{"0"}, parts...)
	}
	if len(parts) != 3 {
		return "", false
	}
	devFn := strings.SplitN(parts[2], ".", 2)
	if len(devFn) != 2 {
		return "", false
	}
	var v [4]uint64
	for i, f := range []string{parts[0], parts[1], devFn[0], devFn[1]} {
		x, err := strconv.ParseUint(f, 16, 32)
		if err != nil {
			return "", false
		}
		v[i] = x
	}
	if v[0] > 0xffff || v[1] > 0xff || v[2] > 0x1f || v[3] > 0x7 {
		return "", false
	}
	return fmt.Sprintf("%04x:%02x:%02x.%x", v[0], v[1], v[2], v[3]), true
}
