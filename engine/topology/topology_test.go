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
	tests := []struct {
		name      string
		topo      *Topology
		requested int
		node      int
		spread    bool
		reason    string
	}{
		{"explicit node wins", gpus(1, 1), 0, 0, false, "--numa-node"},
		{"cpu mode", CPU("no driver"), -1, -1, false, "cpu mode"},
		{"nil topology", nil, -1, -1, false, "cpu mode"},
		{"all on one node", gpus(1, 1, 1, 1), -1, 1, false, "GPUs on node 1 (4 of 4)"},
		{"unknown nodes", gpus(-1, -1), -1, -1, false, "unknown"},
		{"majority node", gpus(0, 1, 1, 1), -1, 1, true, "node 0: 1, node 1: 3"},
		{"tie takes the lowest node", gpus(1, 1, 0, 0), -1, 0, true, "pool on node 0"},
		{"unknown ones do not vote", gpus(-1, 2), -1, 2, false, "GPUs on node 2 (1 of 2)"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := tc.topo.PoolPlacement(tc.requested)
			require.Equal(t, tc.node, p.Node)
			require.Equal(t, tc.spread, p.Spread)
			require.Contains(t, p.Reason, tc.reason)
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
