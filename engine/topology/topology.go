// Package topology lists the host's GPUs (through NVML) and holds the
// placement facts the engine's policy needs: which GPUs exist, on which NUMA
// node each sits, and which pairs talk over NVLink or PCIe P2P.
//
// The NVML boundary is the Lister interface; NVML is its go-nvml
// implementation, and subpackage nvmlshim defines the NVML symbols go-nvml
// calls, so the binary links with full RELRO (BIND_NOW). Discover turns a lister failure (no driver, no library, no
// GPU) into a CPU-mode Topology, so callers never handle "no NVML" as an
// error. A Topology is immutable after Discover returns.
package topology

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"strings"
)

// Modes of a Topology.
const (
	ModeCUDA = "cuda" // NVML listed at least one GPU
	ModeCPU  = "cpu"  // no NVML or no GPU: registrations carry shm regions only
)

// Device is one GPU as NVML reports it.
type Device struct {
	// Index is NVML's index (PCI order). It equals the CUDA ordinal only
	// with CUDA_DEVICE_ORDER=PCI_BUS_ID and no CUDA_VISIBLE_DEVICES, so
	// policy keys on UUID, never on it.
	Index int    `json:"index"`
	UUID  string `json:"uuid"`
	Name  string `json:"name"`
	// PCIBusID is in sysfs form ("0000:3b:00.0"), lower case.
	PCIBusID string `json:"pci_bus_id"`
	// NUMANode is the CPU-side node of the GPU's PCIe root (-1: unknown),
	// where pinned host memory for this GPU should live.
	NUMANode    int    `json:"numa_node"`
	MemoryBytes uint64 `json:"memory_bytes"`
	// NVLinkLinks counts active NVLink links.
	NVLinkLinks int `json:"nvlink_links"`
	// NVLinkPeers and P2PPeers are the Index of the GPUs this one reaches
	// over NVLink (directly or through NVSwitch) and by PCIe/NVLink P2P
	// reads, ascending.
	NVLinkPeers []int `json:"nvlink_peers"`
	P2PPeers    []int `json:"p2p_peers"`
	// MIGDevices are the UUIDs of the MIG instances carved from this GPU
	// (MIG mode on); a rank on one of them is on this GPU.
	MIGDevices []string `json:"mig_devices,omitempty"`
}

// Topology is what Discover found.
type Topology struct {
	Mode string `json:"mode"`
	// Reason says why Mode is cpu.
	Reason        string   `json:"reason,omitempty"`
	DriverVersion string   `json:"driver_version,omitempty"`
	Devices       []Device `json:"devices"`
}

// CPU is the topology of a host without usable NVML.
func CPU(reason string) *Topology {
	return &Topology{Mode: ModeCPU, Reason: reason, Devices: []Device{}}
}

// Lister lists the host's GPUs. An error means NVML is unusable; a host
// where NVML works but lists no GPU returns a CPU-mode Topology instead.
type Lister interface {
	List(ctx context.Context) (*Topology, error)
}

// Discover lists the GPUs once and logs the outcome once: the devices in
// CUDA mode, "no NVML: CPU mode" with the reason otherwise. It never fails.
func Discover(ctx context.Context, l Lister, log *slog.Logger) *Topology {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	t, err := l.List(ctx)
	if err != nil {
		t = CPU(err.Error())
	}
	if t.Devices == nil {
		t.Devices = []Device{}
	}
	if !t.GPU() {
		log.Info("no NVML: CPU mode", "reason", t.Reason)
		return t
	}
	for _, d := range t.Devices {
		log.Info("gpu", "index", d.Index, "uuid", d.UUID, "name", d.Name, "pci_bus_id", d.PCIBusID,
			"numa_node", d.NUMANode, "memory_bytes", d.MemoryBytes, "nvlink_peers", d.NVLinkPeers, "p2p_peers", d.P2PPeers)
	}
	log.Info("NVML: CUDA mode", "gpus", len(t.Devices), "driver", t.DriverVersion)
	return t
}

// GPU reports CUDA mode. A nil Topology is CPU mode.
func (t *Topology) GPU() bool { return t != nil && t.Mode == ModeCUDA && len(t.Devices) > 0 }

// NormalizeUUID returns the canonical form of a device UUID: lower case
// with its "gpu-"/"mig-" prefix. torch reports the bare UUID, NVML the
// prefixed one; both name the same GPU.
func NormalizeUUID(u string) string {
	u = strings.ToLower(strings.TrimSpace(u))
	if u == "" || strings.HasPrefix(u, "gpu-") || strings.HasPrefix(u, "mig-") {
		return u
	}
	return "gpu-" + u
}

// Lookup finds the GPU a device UUID (GPU or MIG, any case, with or
// without prefix) belongs to.
func (t *Topology) Lookup(uuid string) (Device, bool) {
	if t == nil {
		return Device{}, false
	}
	want := NormalizeUUID(uuid)
	if want == "" {
		return Device{}, false
	}
	for _, d := range t.Devices {
		if NormalizeUUID(d.UUID) == want {
			return d, true
		}
		for _, m := range d.MIGDevices {
			if NormalizeUUID(m) == want {
				return d, true
			}
		}
	}
	return Device{}, false
}

func (t *Topology) gpuCount() int {
	if t == nil {
		return 0
	}
	return len(t.Devices)
}

// NodeGPUs counts GPUs per known NUMA node.
func (t *Topology) NodeGPUs() map[int]int {
	out := map[int]int{}
	if t == nil {
		return out
	}
	for _, d := range t.Devices {
		if d.NUMANode >= 0 {
			out[d.NUMANode]++
		}
	}
	return out
}

// PoolAlign is the granularity of a pool's share of the pool size when
// the size is split across NUMA nodes: whole MiB, so every pool stays a
// multiple of the allocator's alignment and of small pages.
const PoolAlign = 1 << 20

// PoolShare is one pool of a Placement.
type PoolShare struct {
	// Node is the NUMA node the pool is bound to (-1: no binding).
	Node int `json:"numa_node"`
	// GPUs counts the GPUs whose ranks' block shares this pool holds:
	// those on Node, plus those of unknown node for the default pool, or
	// every GPU when there is a single pool.
	GPUs int `json:"gpus"`
	// Size is the pool's share of the pool size, in bytes.
	Size uint64 `json:"size_bytes"`
}

// Placement is where the pools go and why.
//
// Invariants: Pools is non-empty, ascending by Node, with distinct nodes;
// exactly one pool (the default) has Node == Node; the sizes sum to the
// size PoolPlacement was given.
type Placement struct {
	// Node is the default pool's node (-1: no binding). Shares saved by
	// ranks whose GPU has no pool of its own (CPU mode, shm regions, a GPU
	// of unknown node) go to the default pool.
	Node   int    `json:"numa_node"`
	Reason string `json:"reason"`
	// Spread is true when GPUs sit on several nodes. With one pool per
	// node that costs nothing; with a single pool (--numa-node, or a pool
	// too small to split) some copies cross the inter-socket link.
	Spread bool        `json:"spread"`
	Pools  []PoolShare `json:"pools"`
}

// PoolPlacement splits a pool of size bytes across NUMA nodes. An explicit
// node (>= 0) puts everything there. Otherwise, in CUDA mode, every node
// that hosts GPUs gets a pool, sized in proportion to its GPU count (whole
// MiB; the default pool takes the rounding), so each rank's block shares
// live next to its GPU. The default pool is on the node holding the most
// GPUs (lowest node on a tie). Without GPUs or NUMA facts there is one
// pool and no binding; a size too small to give every node PoolAlign
// bytes leaves one pool on the default node.
func (t *Topology) PoolPlacement(requested int, size uint64) Placement {
	single := func(node int, spread bool, reason string) Placement {
		return Placement{Node: node, Reason: reason, Spread: spread,
			Pools: []PoolShare{{Node: node, GPUs: t.gpuCount(), Size: size}}}
	}
	counts := t.NodeGPUs()
	if requested >= 0 {
		return single(requested, t.GPU() && len(counts) > 1, "--numa-node")
	}
	if !t.GPU() {
		return single(-1, false, "cpu mode: no binding")
	}
	if len(counts) == 0 {
		return single(-1, false, "GPU NUMA nodes unknown: no binding")
	}
	nodes := make([]int, 0, len(counts))
	for n := range counts {
		nodes = append(nodes, n)
	}
	slices.Sort(nodes)
	best := nodes[0]
	for _, n := range nodes[1:] {
		if counts[n] > counts[best] {
			best = n
		}
	}
	if len(nodes) == 1 {
		return single(best, false, fmt.Sprintf("GPUs on node %d (%d of %d)", best, counts[best], len(t.Devices)))
	}
	parts := make([]string, len(nodes))
	for i, n := range nodes {
		parts[i] = fmt.Sprintf("node %d: %d", n, counts[n])
	}
	span := fmt.Sprintf("GPUs span NUMA nodes (%s)", strings.Join(parts, ", "))
	pools, ok := splitPool(size, nodes, counts, best, len(t.Devices))
	if !ok {
		return single(best, true, fmt.Sprintf("%s: pool of %d bytes too small to split into %d MiB-aligned pools; one pool on node %d, the one with most GPUs",
			span, size, len(nodes), best))
	}
	return Placement{Node: best, Spread: true, Pools: pools,
		Reason: fmt.Sprintf("%s: one pool per node, sized by GPU count; default pool on node %d", span, best)}
}

// splitPool gives every node but best a whole number of PoolAlign units
// in proportion to its GPUs (at least one unit) and best the rest. GPUs of
// unknown node (total minus the known ones) weigh on best, whose pool
// holds their shares. It fails when best would get less than one unit.
func splitPool(size uint64, nodes []int, counts map[int]int, best, total int) ([]PoolShare, bool) {
	weight := func(n int) uint64 {
		w := uint64(counts[n])
		if n == best {
			known := 0
			for _, c := range counts {
				known += c
			}
			w += uint64(total - known)
		}
		return w
	}
	var sumW uint64
	for _, n := range nodes {
		sumW += weight(n)
	}
	if size/PoolAlign < uint64(len(nodes)) {
		return nil, false
	}
	pools := make([]PoolShare, len(nodes))
	rest := size
	for i, n := range nodes {
		pools[i] = PoolShare{Node: n, GPUs: int(weight(n))}
		if n == best {
			continue
		}
		// size*w/sumW without overflow: size/PoolAlign units fit easily.
		units := max(size/PoolAlign*weight(n)/sumW, 1)
		pools[i].Size = units * PoolAlign
		if pools[i].Size >= rest {
			return nil, false
		}
		rest -= pools[i].Size
	}
	if rest < PoolAlign {
		return nil, false
	}
	for i := range pools {
		if pools[i].Node == best {
			pools[i].Size = rest
		}
	}
	return pools, true
}
