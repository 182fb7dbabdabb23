package engine

import (
	"context"
	"errors"
	"fmt"

	pb "github.com/pegaflow/pegaflow/engine/api/pegaflowv1"
	"github.com/pegaflow/pegaflow/internal/ids"
	"github.com/pegaflow/pegaflow/native"
)

// session is one connected client (a vLLM scheduler or worker process). It
// lives as long as the client's Attach stream.
type session struct {
	id        string
	name      string
	instances map[instanceKey]*instance
	leases    map[string]*lease
	// opened are the namespaces the session named in OpenNamespace or
	// Query (a scheduler uses a namespace without an instance in it).
	opened map[*namespace]struct{}
}

// uses reports whether the session works in namespace ns: it opened or
// queried it, or has an instance in it.
func (s *session) uses(ns *namespace) bool {
	if _, ok := s.opened[ns]; ok {
		return true
	}
	for _, inst := range s.instances {
		if inst.ns == ns {
			return true
		}
	}
	return false
}

type instanceKey struct {
	id   string
	rank uint32
}

// instance is one registered TP rank of a vLLM instance.
type instance struct {
	key     instanceKey
	session *session
	ns      *namespace
	layout  *rankLayout
	regions []*native.Region
	// event is the worker's interprocess CUDA event that saves with
	// wait_event wait for on the GPU; nil when none was opened.
	event *native.Event
	// pool (index into e.pools) receives the shares this rank saves: the
	// pool on its GPU's NUMA node (Engine.poolFor).
	pool int
}

func (inst *instance) close() {
	for _, r := range inst.regions {
		// Safe with copies in flight: the native layer unmaps after them.
		_ = r.Close()
	}
	closeEvent(inst.event)
}

// OpenSession starts a session and returns its id.
func (e *Engine) OpenSession(name string) (string, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if err := e.checkOpen(); err != nil {
		return "", err
	}
	s := &session{id: ids.New("s-"), name: name, instances: map[instanceKey]*instance{}, leases: map[string]*lease{}, opened: map[*namespace]struct{}{}}
	e.sessions[s.id] = s
	e.log.Debug("session opened", "session", s.id, "client", name)
	return s.id, nil
}

// CloseSession ends a session: its instances are unregistered and its
// leases released. Sealed blocks stay, so a restarted client hits them.
// Saves and loads still copying finish first (they hold their own pins).
func (e *Engine) CloseSession(id string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	s, ok := e.sessions[id]
	if !ok {
		return
	}
	delete(e.sessions, id)
	for key, inst := range s.instances {
		if e.instances[key] == inst {
			delete(e.instances, key)
		}
		inst.close()
	}
	for lid, l := range s.leases {
		e.releaseLeaseLocked(lid, l)
	}
	// Queries of the session that wait for in-flight saves answer now.
	e.broadcastLocked()
	e.log.Info("session closed", "session", id, "client", s.name, "instances", len(s.instances))
}

func (e *Engine) sessionLocked(id string) (*session, error) {
	s, ok := e.sessions[id]
	if !ok {
		return nil, fmt.Errorf("%w: session %q (attach first)", ErrNotFound, id)
	}
	return s, nil
}

func (e *Engine) instanceLocked(sessionID, instanceID string, rank uint32) (*instance, error) {
	if err := e.checkOpen(); err != nil {
		return nil, err
	}
	s, err := e.sessionLocked(sessionID)
	if err != nil {
		return nil, err
	}
	inst, ok := s.instances[instanceKey{instanceID, rank}]
	if !ok {
		return nil, fmt.Errorf("%w: instance %q rank %d is not registered by this session", ErrNotFound, instanceID, rank)
	}
	return inst, nil
}

// Register registers one rank's KV memory. A registration of the same
// (instance, rank) by the same session replaces the previous one (a
// worker re-registering); one held by another live session is refused
// with ErrAlreadyExists: two processes with one instance id (e.g. DP
// ranks given the same id) would otherwise evict each other's
// registration in a loop. A restarted vLLM registers again once its old
// session ended (its Attach stream closes with the process).
// A done ctx stops it before any memory is opened.
func (e *Engine) Register(ctx context.Context, req *pb.RegisterRequest) (*pb.RegisterResponse, error) {
	reg, err := validateRegister(req, e.capacity())
	if err != nil {
		return nil, err
	}
	reg.peer = peerFrom(ctx)
	ns, err := e.preflightRegister(reg)
	if err != nil {
		return nil, err
	}
	// Opening CUDA IPC memory maps another process's device memory and
	// cannot be interrupted: a caller that gave up gets none opened.
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	regions, ev, err := e.openMemory(reg)
	if err != nil {
		return nil, err
	}
	layout := reg.layout
	e.mu.Lock()
	defer e.mu.Unlock()
	s, err := e.sessionLocked(reg.sessionID)
	if err == nil {
		err = e.checkOpen()
	}
	if err == nil {
		err = ns.adoptShape(layout)
	}
	if err == nil {
		err = e.checkRegistrationLocked(reg)
	}
	if err == nil {
		err = e.checkInstanceFreeLocked(s, reg)
	}
	if err != nil {
		for _, r := range regions {
			_ = r.Close()
		}
		closeEvent(ev)
		return nil, err
	}
	key := instanceKey{reg.instanceID, reg.rank}
	if old, ok := e.instances[key]; ok {
		delete(old.session.instances, key)
		old.close()
		e.log.Info("instance re-registered", "instance", reg.instanceID, "rank", reg.rank)
	}
	inst := &instance{key: key, session: s, ns: ns, layout: layout, regions: regions, event: ev, pool: e.poolFor(layout)}
	e.instances[key] = inst
	s.instances[key] = inst
	if e.tier != nil {
		for _, g := range ns.groups {
			e.tier.learn(slotShare(g) * uint64(ns.desc.TPSize))
		}
	}
	e.log.Info("instance registered", "instance", reg.instanceID, "rank", reg.rank, "namespace", ns.id,
		"blocks", layout.numBlocks, "layers", len(layout.layers), "rank_block_bytes", layout.rankBytes, "device", layout.device,
		"pool_numa_node", e.pools[inst.pool].node)
	return &pb.RegisterResponse{NamespaceId: ns.id, BytesPerBlock: layout.rankBytes, CudaEvent: ev != nil}, nil
}

// checkInstanceFreeLocked refuses an (instance, rank) that another live
// session holds. Caller holds e.mu.
func (e *Engine) checkInstanceFreeLocked(s *session, reg *registration) error {
	old, ok := e.instances[instanceKey{reg.instanceID, reg.rank}]
	if !ok || old.session == s {
		return nil
	}
	return fmt.Errorf("%w: instance %q rank %d is registered by another live session %s (%s); "+
		"give each vLLM process (each DP rank) its own instance_id", ErrAlreadyExists,
		reg.instanceID, reg.rank, old.session.id, old.session.name)
}

// preflightRegister runs Register's namespace and placement checks before
// any memory is opened, so a mismatch fails cheaply, and opens (or
// creates) the namespace. Register repeats the checks after opening the
// memory, because e.mu is not held in between.
func (e *Engine) preflightRegister(reg *registration) (*namespace, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if err := e.checkOpen(); err != nil {
		return nil, err
	}
	s, err := e.sessionLocked(reg.sessionID)
	if err != nil {
		return nil, err
	}
	if err := e.checkRegistrationLocked(reg); err != nil {
		return nil, err
	}
	if err := e.checkInstanceFreeLocked(s, reg); err != nil {
		return nil, err
	}
	ns, err := e.openNamespaceLocked(reg.ns)
	if err != nil {
		return nil, err
	}
	if ns.shape != nil {
		if err := ns.adoptShape(reg.layout); err != nil {
			return nil, err
		}
	}
	return ns, nil
}

// openRegions opens a registration's memory on behalf of peer.
func openRegions(specs []regionSpec, shmDir string, peer Peer) ([]*native.Region, error) {
	regions := make([]*native.Region, 0, len(specs))
	for i, spec := range specs {
		var r *native.Region
		var err error
		if spec.ipcHandle != nil {
			dev, derr := cudaDevice(spec)
			if derr != nil {
				for _, opened := range regions {
					_ = opened.Close()
				}
				return nil, fmt.Errorf("region %d: %w", i, derr) // already of an engine kind
			}
			r, err = native.OpenCUDAIPCRegion(spec.ipcHandle, dev, spec.size)
		} else {
			r, err = openShmRegion(shmDir, spec.shmPath, spec.size, peer)
		}
		if err != nil {
			for _, opened := range regions {
				_ = opened.Close()
			}
			if isEngineError(err) {
				return nil, fmt.Errorf("region %d: %w", i, err)
			}
			kind := ErrInvalid
			if errors.Is(err, native.ErrNotSupported) {
				kind = ErrPrecondition
			}
			return nil, fmt.Errorf("%w: region %d: %w", kind, i, err)
		}
		regions = append(regions, r)
	}
	return regions, nil
}

// Unregister drops one rank's registration.
func (e *Engine) Unregister(req *pb.UnregisterRequest) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	inst, err := e.instanceLocked(req.SessionId, req.InstanceId, req.Rank)
	if err != nil {
		return err
	}
	delete(e.instances, inst.key)
	delete(inst.session.instances, inst.key)
	inst.close()
	return nil
}
