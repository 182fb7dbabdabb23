package topology

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

type listerFunc func(context.Context) (*Topology, error)

func (f listerFunc) List(ctx context.Context) (*Topology, error) { return f(ctx) }

func gpus(nodes ...int) *Topology {
	t := &Topology{Mode: ModeCUDA}
	for i, n := range nodes {
		t.Devices = append(t.Devices, Device{Index: i, UUID: "GPU-" + string(rune('a'+i)), NUMANode: n})
	}
	return t
}

func TestPoolPlacement(t *testing.T) {
	const mib = PoolAlign
	tests := []struct {
		name      string
		topo      *Topology
		requested int
		size      uint64
		node      int
		spread    bool
		reason    string
		pools     []PoolShare
	}{
		{"explicit node wins", gpus(1, 1), 0, 8 * mib, 0, false, "--numa-node", []PoolShare{{0, 2, 8 * mib}}},
		{"explicit node takes every GPU's shares", gpus(0, 1), 1, 8 * mib, 1, true, "--numa-node", []PoolShare{{1, 2, 8 * mib}}},
		{"cpu mode", CPU("no driver"), -1, 100, -1, false, "cpu mode", []PoolShare{{-1, 0, 100}}},
		{"nil topology", nil, -1, 100, -1, false, "cpu mode", []PoolShare{{-1, 0, 100}}},
		{"all on one node", gpus(1, 1, 1, 1), -1, 8 * mib, 1, false, "GPUs on node 1 (4 of 4)", []PoolShare{{1, 4, 8 * mib}}},
		{"unknown nodes", gpus(-1, -1), -1, 8 * mib, -1, false, "unknown", []PoolShare{{-1, 2, 8 * mib}}},
		{"one pool per node, by GPU count", gpus(0, 1, 1, 1), -1, 8 * mib, 1, true, "node 0: 1, node 1: 3",
			[]PoolShare{{0, 1, 2 * mib}, {1, 3, 6 * mib}}},
		{"the default pool takes the rounding", gpus(0, 1, 1), -1, 10*mib + 5, 1, true, "one pool per node",
			[]PoolShare{{0, 1, 3 * mib}, {1, 2, 7*mib + 5}}},
		{"tie takes the lowest node as default", gpus(1, 1, 0, 0), -1, 4 * mib, 0, true, "default pool on node 0",
			[]PoolShare{{0, 2, 2 * mib}, {1, 2, 2 * mib}}},
		{"a small node still gets one MiB", gpus(0, 1, 1, 1, 1, 1, 1, 1), -1, 4 * mib, 1, true, "one pool per node",
			[]PoolShare{{0, 1, mib}, {1, 7, 3 * mib}}},
		{"unknown GPUs weigh on the default pool", gpus(0, 0, 1, -1, -1), -1, 5 * mib, 0, true, "one pool per node",
			[]PoolShare{{0, 4, 4 * mib}, {1, 1, mib}}},
		{"too small to split", gpus(0, 1), -1, mib + mib/2, 0, true, "too small to split", []PoolShare{{0, 2, mib + mib/2}}},
		{"unknown ones do not vote", gpus(-1, 2), -1, 8 * mib, 2, false, "GPUs on node 2 (1 of 2)", []PoolShare{{2, 2, 8 * mib}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := tc.topo.PoolPlacement(tc.requested, tc.size)
			require.Equal(t, tc.node, p.Node)
			require.Equal(t, tc.spread, p.Spread)
			require.Contains(t, p.Reason, tc.reason)
			require.Equal(t, tc.pools, p.Pools)
			var sum uint64
			defaults := 0
			for _, ps := range p.Pools {
				sum += ps.Size
				if ps.Node == p.Node {
					defaults++
				}
			}
			require.Equal(t, tc.size, sum, "the sizes add up to the pool size")
			require.Equal(t, 1, defaults, "exactly one default pool")
		})
	}
}

func TestLookup(t *testing.T) {
	topo := &Topology{Mode: ModeCUDA, Devices: []Device{
		{Index: 0, UUID: "GPU-8c1b2f3e-0000-1111-2222-333344445555"},
		{Index: 1, UUID: "GPU-9d00", MIGDevices: []string{"MIG-7a1c"}},
	}}
	tests := []struct {
		uuid  string
		index int
		ok    bool
	}{
		{"GPU-8c1b2f3e-0000-1111-2222-333344445555", 0, true},
		{"8C1B2F3E-0000-1111-2222-333344445555", 0, true}, // torch's bare form, other case
		{"gpu-9d00", 1, true},
		{"MIG-7a1c", 1, true},
		{"GPU-ffff", 0, false},
		{"", 0, false},
	}
	for _, tc := range tests {
		d, ok := topo.Lookup(tc.uuid)
		require.Equal(t, tc.ok, ok, tc.uuid)
		if ok {
			require.Equal(t, tc.index, d.Index, tc.uuid)
		}
	}
	_, ok := (*Topology)(nil).Lookup("GPU-8c1b")
	require.False(t, ok)
}

func TestDiscoverLogsModeOnce(t *testing.T) {
	tests := []struct {
		name   string
		lister Lister
		gpu    bool
		log    string
	}{
		{"nvml error", listerFunc(func(context.Context) (*Topology, error) {
			return nil, errors.New("nvml init: ERROR_LIBRARY_NOT_FOUND")
		}), false, "no NVML: CPU mode"},
		{"no gpu", listerFunc(func(context.Context) (*Topology, error) { return CPU("NVML lists no usable GPU"), nil }), false, "no NVML: CPU mode"},
		{"gpus", listerFunc(func(context.Context) (*Topology, error) { return gpus(0, 0), nil }), true, "NVML: CUDA mode"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var buf bytes.Buffer
			topo := Discover(context.Background(), tc.lister, slog.New(slog.NewTextHandler(&buf, nil)))
			require.Equal(t, tc.gpu, topo.GPU())
			require.NotNil(t, topo.Devices, "devices encode as [] in CPU mode")
			require.Equal(t, 1, strings.Count(buf.String(), tc.log), buf.String())
			if !tc.gpu {
				require.NotEmpty(t, topo.Reason)
				require.Contains(t, buf.String(), topo.Reason)
			}
		})
	}
}
