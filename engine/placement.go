package engine

import (
	"cmp"
	"fmt"
	"strings"

	"github.com/pegaflow/pegaflow/engine/topology"
)

// checkRegistrationLocked enforces the host-level rules a well-formed
// registration must also meet: its GPU is a local one not already used by
// another rank of the instance, its share of a block fits the pool of its
// GPU's node, and no live instance serves the same model with another TP
// size or block size. It records the rank's device on layout. Caller holds
// e.mu; Register calls it before and after opening memory, because the
// lock is dropped in between.
func (e *Engine) checkRegistrationLocked(r *registration) error {
	layout := r.layout
	if err := e.checkDeviceLocked(r); err != nil {
		return err
	}
	if p := e.pools[e.poolFor(layout)]; layout.rankBytes > p.mem.Size() {
		return invalid("instance %q rank %d: a block's share (%d bytes) does not fit the pool of its NUMA node %d (%d bytes)",
			r.instanceID, r.rank, layout.rankBytes, p.node, p.mem.Size())
	}
	return e.checkParallelismLocked(r)
}

// checkDeviceLocked resolves the rank's GPU from its regions' device UUIDs.
// In CPU mode (no NVML) there is nothing to check against: shm regions
// have no device, so UUIDs are ignored.
func (e *Engine) checkDeviceLocked(req *registration) error {
	layout, topo := req.layout, e.cfg.Topology
	if !topo.GPU() {
		return nil
	}
	device, first := "", -1
	for i, r := range layout.regions {
		if r.deviceUUID == "" {
			continue
		}
		gpu, ok := topo.Lookup(r.deviceUUID)
		if !ok {
			return fmt.Errorf("%w: instance %q rank %d: region %d is on device %s, which is not a GPU of this host (%s); "+
				"the engine must run on the same host as the vLLM workers", ErrPrecondition, req.instanceID, req.rank, i,
				r.deviceUUID, localGPUs(topo))
		}
		uuid := topology.NormalizeUUID(r.deviceUUID)
		switch {
		case device == "":
			device, first = uuid, i
			layout.gpuIndex = gpu.Index
		case uuid != device:
			return invalid("instance %q rank %d: region %d is on device %s but region %d on %s; one rank's KV caches live on one GPU",
				req.instanceID, req.rank, first, layout.regions[first].deviceUUID, i, r.deviceUUID)
		}
	}
	layout.device = device
	if device == "" {
		return nil
	}
	var clash *instance
	for key, inst := range e.instances {
		if key.id != req.instanceID || key.rank == req.rank || inst.layout.device != device {
			continue
		}
		if clash == nil || key.rank < clash.key.rank {
			clash = inst
		}
	}
	if clash != nil {
		return fmt.Errorf("%w: instance %q: ranks %d and %d are both on GPU %s (index %d); the TP ranks of an instance must be on distinct GPUs",
			ErrPrecondition, req.instanceID, clash.key.rank, req.rank, layout.regions[first].deviceUUID, layout.gpuIndex)
	}
	return nil
}

func localGPUs(t *topology.Topology) string {
	names := make([]string, len(t.Devices))
	for i, d := range t.Devices {
		names[i] = fmt.Sprintf("%d: %s", d.Index, d.UUID)
	}
	return "local GPUs " + strings.Join(names, ", ")
}

// checkParallelismLocked rejects a registration whose namespace differs
// from a live instance's only in TP size, block size or per-rank KV heads.
// Those are part of the namespace key, so P and D configured differently
// would silently land in disjoint namespaces and never hit; like a hash
// seed mismatch, that is reported instead. Instances with the same id are
// exempt: a restarted instance's new ranks replace its old ones.
// Deployments that mean to stay apart differ in namespace.extra.
func (e *Engine) checkParallelismLocked(req *registration) error {
	desc := req.ns
	clash := e.parallelismClashLocked(desc, req.instanceID)
	if clash == nil {
		return nil
	}
	return fmt.Errorf("%w: instance %q (tp_size %d, block_size %d) and %s", ErrPrecondition,
		req.instanceID, desc.TPSize, desc.BlockSize, clashText(desc, clash))
}

// checkOpenParallelismLocked is checkParallelismLocked for OpenNamespace
// (a scheduler, which names no instance): opening a namespace that has
// live instances of its own is always fine (their registration passed);
// otherwise it must not clash with another live instance, so a scheduler
// whose workers were rejected is rejected too rather than querying a
// namespace that never fills.
func (e *Engine) checkOpenParallelismLocked(desc *Namespace) error {
	id := namespaceID(desc)
	for _, inst := range e.instances {
		if inst.ns.id == id {
			return nil
		}
	}
	clash := e.parallelismClashLocked(desc, "")
	if clash == nil {
		return nil
	}
	return fmt.Errorf("%w: namespace of model %q (tp_size %d, block_size %d) and %s", ErrPrecondition,
		desc.Model, desc.TPSize, desc.BlockSize, clashText(desc, clash))
}

// parallelismClashLocked returns the live instance (lowest id and rank, so
// messages are stable) in another namespace with desc's serving key,
// ignoring instance exempt.
func (e *Engine) parallelismClashLocked(desc *Namespace, exempt string) *instance {
	id, serving := namespaceID(desc), servingKey(desc)
	var clash *instance
	for key, inst := range e.instances {
		if key.id == exempt || inst.ns.id == id || inst.ns.serving != serving {
			continue
		}
		if clash == nil || cmp.Or(cmp.Compare(key.id, clash.key.id), cmp.Compare(key.rank, clash.key.rank)) < 0 {
			clash = inst
		}
	}
	return clash
}

func clashText(desc *Namespace, clash *instance) string {
	other := clash.ns.desc
	var diffs []string
	if desc.TPSize != other.TPSize {
		diffs = append(diffs, fmt.Sprintf("tp_size %d vs %d", desc.TPSize, other.TPSize))
	}
	if desc.BlockSize != other.BlockSize {
		diffs = append(diffs, fmt.Sprintf("block_size %d vs %d", desc.BlockSize, other.BlockSize))
	}
	if desc.NumKVHeads != other.NumKVHeads {
		diffs = append(diffs, fmt.Sprintf("num_kv_heads per rank %d vs %d", desc.NumKVHeads, other.NumKVHeads))
	}
	return fmt.Sprintf("instance %q (tp_size %d, block_size %d) serve model %q but differ in %s, so they could never "+
		"share a KV block; P and D instances sharing a namespace must use the same TP size and block size "+
		"(set a distinguishing namespace.extra key to keep separate deployments apart)",
		clash.key.id, other.TPSize, other.BlockSize, desc.Model, strings.Join(diffs, ", "))
}
