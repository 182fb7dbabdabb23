package engine

import (
	"context"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/stretchr/testify/require"

	pb "github.com/pegaflow/pegaflow/engine/api/pegaflowv1"
	"github.com/pegaflow/pegaflow/engine/topology"
	"github.com/pegaflow/pegaflow/internal/kvtest"
)

// Fake host topologies: a GPU cannot run here, so NVML's answer is given as
// data, in the shape topology.NVML produces.
const (
	gpuA = "GPU-8c1b2f3e-0000-1111-2222-aaaaaaaaaaaa"
	gpuB = "GPU-8c1b2f3e-0000-1111-2222-bbbbbbbbbbbb"
)

func fakeGPUs(nodes ...int) *topology.Topology {
	t := &topology.Topology{Mode: topology.ModeCUDA, DriverVersion: "550.54.15"}
	for i, n := range nodes {
		t.Devices = append(t.Devices, topology.Device{Index: i, UUID: []string{gpuA, gpuB, "GPU-c", "GPU-d"}[i],
			Name: "NVIDIA H100 80GB HBM3", NUMANode: n, NVLinkPeers: []int{}, P2PPeers: []int{}})
	}
	return t
}

func newTopoEngine(t *testing.T, topo *topology.Topology, numaNode int) (*Engine, *prometheus.Registry) {
	t.Helper()
	reg := prometheus.NewRegistry()
	e, err := New(Config{PoolSize: 4 << 20, NUMANode: numaNode, Device: -1, CopyThreads: 1, PartialTTL: time.Hour, Topology: topo}, nil, reg)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, e.Close()) })
	return e, reg
}

// regStep is one registration of a test step; its shm cache is fresh, as a
// real worker's would be.
type regStep struct {
	instance string
	rank, tp int
	block    int      // block size in tokens (0: smallSpec's)
	extra    string   // namespace.extra["deployment"]
	uuids    []string // per region; "" = none
}

func (r regStep) request(t *testing.T) *pb.RegisterRequest {
	spec := smallSpec
	if r.block > 0 {
		spec.BlockSize = r.block
	}
	c := newCache(t, spec)
	ns := spec.Namespace("m", r.tp)
	if r.extra != "" {
		ns.Extra = map[string]string{"deployment": r.extra}
	}
	req := c.RegisterRequest(r.instance, r.rank, ns)
	for i, u := range r.uuids {
		req.Regions[i].DeviceUuid = u
	}
	return req
}

// restarter models a step that registers an (instance, rank) an earlier
// step registered as that process's restart: the old session ends first
// (as its Attach stream does when the process exits), since a live
// session's registration is not replaced by another session's.
func restarter(e *Engine) func(step regStep, sid string) {
	held := map[instanceKey]string{}
	return func(step regStep, sid string) {
		key := instanceKey{step.instance, uint32(step.rank)}
		if old, ok := held[key]; ok {
			e.CloseSession(old)
		}
		held[key] = sid
	}
}

func TestRegisterDevicePlacement(t *testing.T) {
	tests := []struct {
		name  string
		topo  *topology.Topology
		steps []regStep
		kind  error  // of the last step; nil: accepted
		msg   string // in the last step's error
	}{
		{"ranks on distinct GPUs", fakeGPUs(0, 0), []regStep{
			{instance: "P", rank: 0, tp: 2, uuids: []string{gpuA, gpuA}},
			{instance: "P", rank: 1, tp: 2, uuids: []string{gpuB, gpuB}},
		}, nil, ""},
		{"two ranks on one GPU", fakeGPUs(0, 0), []regStep{
			{instance: "P", rank: 0, tp: 2, uuids: []string{gpuA, gpuA}},
			{instance: "P", rank: 1, tp: 2, uuids: []string{gpuA, gpuA}},
		}, ErrPrecondition, `instance "P": ranks 0 and 1 are both on GPU ` + gpuA + " (index 0)"},
		{"torch's bare upper-case UUID names the same GPU", fakeGPUs(0, 0), []regStep{
			{instance: "P", rank: 0, tp: 2, uuids: []string{gpuA, gpuA}},
			{instance: "P", rank: 1, tp: 2, uuids: []string{"8C1B2F3E-0000-1111-2222-AAAAAAAAAAAA", ""}},
		}, ErrPrecondition, "ranks 0 and 1 are both on GPU"},
		{"not a local GPU", fakeGPUs(0, 0), []regStep{
			{instance: "P", rank: 0, tp: 1, uuids: []string{"GPU-ffff", ""}},
		}, ErrPrecondition, `instance "P" rank 0: region 0 is on device GPU-ffff, which is not a GPU of this host (local GPUs 0: ` + gpuA},
		{"one rank on two GPUs", fakeGPUs(0, 0), []regStep{
			{instance: "P", rank: 0, tp: 1, uuids: []string{gpuA, gpuB}},
		}, ErrInvalid, "region 0 is on device " + gpuA + " but region 1 on " + gpuB},
		{"re-registering a rank keeps its GPU", fakeGPUs(0, 0), []regStep{
			{instance: "P", rank: 0, tp: 1, uuids: []string{gpuA, gpuA}},
			{instance: "P", rank: 0, tp: 1, uuids: []string{gpuA, gpuA}},
		}, nil, ""},
		{"P and D may share a GPU", fakeGPUs(0, 0), []regStep{
			{instance: "P", rank: 0, tp: 1, uuids: []string{gpuA, gpuA}},
			{instance: "D", rank: 0, tp: 1, uuids: []string{gpuA, gpuA}},
		}, nil, ""},
		{"regions without a device are not checked", fakeGPUs(0, 0), []regStep{
			{instance: "P", rank: 0, tp: 2},
			{instance: "P", rank: 1, tp: 2},
		}, nil, ""},
		{"CPU mode skips UUID checks", topology.CPU("no driver"), []regStep{
			{instance: "P", rank: 0, tp: 2, uuids: []string{gpuA, "GPU-ffff"}},
			{instance: "P", rank: 1, tp: 2, uuids: []string{gpuA, gpuA}},
		}, nil, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e, _ := newTopoEngine(t, tc.topo, -1)
			restart := restarter(e)
			for i, step := range tc.steps {
				req := step.request(t)
				sid, err := e.OpenSession(step.instance)
				require.NoError(t, err)
				restart(step, sid)
				req.SessionId = sid
				_, err = e.Register(context.Background(), req)
				if i < len(tc.steps)-1 || tc.kind == nil {
					require.NoError(t, err, "step %d", i)
					continue
				}
				require.ErrorIs(t, err, tc.kind)
				require.ErrorContains(t, err, tc.msg)
			}
		})
	}
}

func TestRankFreesItsGPUWhenItsSessionEnds(t *testing.T) {
	e, _ := newTopoEngine(t, fakeGPUs(0, 0), -1)
	register := func(rank int, uuid string) (string, error) {
		req := regStep{instance: "P", rank: rank, tp: 2, uuids: []string{uuid, uuid}}.request(t)
		sid, err := e.OpenSession("P")
		require.NoError(t, err)
		req.SessionId = sid
		_, err = e.Register(context.Background(), req)
		return sid, err
	}
	old, err := register(0, gpuA)
	require.NoError(t, err)
	_, err = register(1, gpuA)
	require.ErrorIs(t, err, ErrPrecondition)
	e.CloseSession(old)
	_, err = register(1, gpuA)
	require.NoError(t, err)
}

func TestRegisterParallelismAcrossInstances(t *testing.T) {
	tests := []struct {
		name  string
		steps []regStep
		msg   string // "" = every step accepted
	}{
		{"same TP and block size share a namespace", []regStep{
			{instance: "P", rank: 0, tp: 1}, {instance: "D", rank: 0, tp: 1},
		}, ""},
		{"different TP size", []regStep{
			{instance: "P", rank: 0, tp: 1}, {instance: "D", rank: 1, tp: 2},
		}, `instance "D" (tp_size 2, block_size 4) and instance "P" (tp_size 1, block_size 4) serve model "m" but differ in tp_size 2 vs 1`},
		{"different block size", []regStep{
			{instance: "P", rank: 0, tp: 1}, {instance: "D", rank: 0, tp: 1, block: 8},
		}, "differ in block_size 8 vs 4"},
		{"the conflict is reported against a stable instance", []regStep{
			{instance: "P2", rank: 0, tp: 1}, {instance: "P1", rank: 0, tp: 1}, {instance: "D", rank: 0, tp: 2},
		}, `and instance "P1"`},
		{"separate deployments differ in extra", []regStep{
			{instance: "P", rank: 0, tp: 1, extra: "a"}, {instance: "D", rank: 0, tp: 2, extra: "b"},
		}, ""},
		{"one instance re-registering with a new TP size", []regStep{
			{instance: "P", rank: 0, tp: 1}, {instance: "P", rank: 0, tp: 2},
		}, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e, _ := newTopoEngine(t, topology.CPU("test"), -1)
			restart := restarter(e)
			for i, step := range tc.steps {
				req := step.request(t)
				sid, err := e.OpenSession(step.instance)
				require.NoError(t, err)
				restart(step, sid)
				req.SessionId = sid
				before := e.Stats().Namespaces
				_, err = e.Register(context.Background(), req)
				if i < len(tc.steps)-1 || tc.msg == "" {
					require.NoError(t, err, "step %d", i)
					continue
				}
				require.ErrorIs(t, err, ErrPrecondition)
				require.ErrorContains(t, err, tc.msg)
				require.Equal(t, before, e.Stats().Namespaces, "a rejected registration creates no namespace")
			}
		})
	}
}

func TestParallelismCheckEndsWithTheInstance(t *testing.T) {
	e, _ := newTopoEngine(t, nil, -1)
	p := newWorker(t, e, "P", 0, 1, smallSpec)
	d := regStep{instance: "D", rank: 0, tp: 2}.request(t)
	sid, err := e.OpenSession("D")
	require.NoError(t, err)
	d.SessionId = sid
	_, err = e.Register(context.Background(), d)
	require.ErrorIs(t, err, ErrPrecondition)
	// Once P is gone, a redeployment at another TP size is no conflict.
	e.CloseSession(p.session)
	_, err = e.Register(context.Background(), d)
	require.NoError(t, err)
}

func gauge(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	families, err := reg.Gather()
	require.NoError(t, err)
	for _, f := range families {
		if f.GetName() == name {
			require.Equal(t, dto.MetricType_GAUGE, f.GetType())
			return f.GetMetric()[0].GetGauge().GetValue()
		}
	}
	t.Fatalf("metric %s not registered", name)
	return 0
}

func TestPoolPlacementFromTopology(t *testing.T) {
	tests := []struct {
		name      string
		topo      *topology.Topology
		requested int
		node      int
		gpus      int
	}{
		{"CPU mode: no binding", nil, -1, -1, 0},
		{"all GPUs on node 0", fakeGPUs(0, 0), -1, 0, 2},
		{"explicit node", fakeGPUs(0, 0), 0, 0, 2},
		// This host has node 0 only; mbind to another node is best effort,
		// so the choice is visible without the node existing.
		{"GPUs span nodes: the majority node", fakeGPUs(1, 0, 1), -1, 1, 3},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e, reg := newTopoEngine(t, tc.topo, tc.requested)
			require.Equal(t, tc.node, e.PoolPlacement().Node)
			require.Equal(t, tc.topo.GPU(), e.Topology().GPU())
			require.EqualValues(t, tc.gpus, gauge(t, reg, "pegaflow_engine_gpus"))
			require.EqualValues(t, tc.node, gauge(t, reg, "pegaflow_engine_pool_numa_node"))
			// The pool works wherever it landed.
			w := newWorker(t, e, "P", 0, 1, smallSpec)
			hashes := kvtest.Hashes("placed", 2)
			w.cache.Fill(0, 1)
			w.cache.Fill(1, 2)
			require.EqualValues(t, 2, w.save(t, seq(0, 2), hashes, "", false).Saved)
			require.Equal(t, allOK(2), w.load(t, []int{5, 6}, hashes, "", ""))
			require.True(t, w.cache.Equal(0, w.cache, 5))
		})
	}
}

func TestOpenNamespaceFollowsTheRegistrationRule(t *testing.T) {
	e, _ := newTopoEngine(t, nil, -1)
	d := newWorker(t, e, "D", 0, 2, smallSpec)
	d1 := regStep{instance: "D", rank: 1, tp: 2}.request(t)
	d1.SessionId = d.session
	_, err := e.Register(context.Background(), d1)
	require.NoError(t, err)
	p := regStep{instance: "P", rank: 0, tp: 1}.request(t)
	sid, err := e.OpenSession("P")
	require.NoError(t, err)
	p.SessionId = sid
	_, err = e.Register(context.Background(), p)
	require.ErrorIs(t, err, ErrPrecondition)

	tests := []struct {
		name string
		tp   int
		msg  string // "" = opened
	}{
		{"the scheduler of the rejected instance", 1,
			`namespace of model "m" (tp_size 1, block_size 4) and instance "D" (tp_size 2, block_size 4) serve model "m" but differ in tp_size 1 vs 2`},
		{"the scheduler of the live instance", 2, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			id, err := e.OpenNamespace(sid, smallSpec.Namespace("m", tc.tp))
			if tc.msg == "" {
				require.NoError(t, err)
				require.Equal(t, d.nsID, id)
				return
			}
			require.ErrorIs(t, err, ErrPrecondition)
			require.ErrorContains(t, err, tc.msg)
		})
	}
	// Another model is no clash.
	_, err = e.OpenNamespace(sid, smallSpec.Namespace("other", 1))
	require.NoError(t, err)
}
