package server

import (
	"context"
	"testing"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/pegaflow/pegaflow/engine"
	"github.com/pegaflow/pegaflow/engine/client"
	"github.com/pegaflow/pegaflow/engine/topology"
	"github.com/pegaflow/pegaflow/internal/kvtest"
)

// TestPlacementErrorsMapToStatusCodes checks the registration rules of
// docs/gpu.md end to end, over the socket, on a host whose NVML answer is
// given as data (no GPU here).
func TestPlacementErrorsMapToStatusCodes(t *testing.T) {
	const gpu0, gpu1 = "GPU-00000000-0000-0000-0000-000000000000", "GPU-11111111-1111-1111-1111-111111111111"
	topo := &topology.Topology{Mode: topology.ModeCUDA, Devices: []topology.Device{
		{Index: 0, UUID: gpu0, NUMANode: 0}, {Index: 1, UUID: gpu1, NUMANode: 0},
	}}
	sock, _ := startServerWith(t, engine.Config{PoolSize: 16 << 20, NUMANode: -1, Device: -1, Topology: topo})
	ctx := context.Background()

	c, err := client.Dial(ctx, sock, "placement")
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	register := func(instance string, rank, tp, blockSize int, uuids ...string) error {
		s := spec
		s.BlockSize = blockSize
		cache, err := kvtest.New(kvtest.TempShmDir(t), "kv", s)
		require.NoError(t, err)
		t.Cleanup(cache.Close)
		req := cache.RegisterRequest(instance, rank, s.Namespace("m", tp))
		for i, u := range uuids {
			req.Regions[i].DeviceUuid = u
		}
		_, err = c.Register(ctx, req)
		return err
	}
	require.NoError(t, register("P", 0, 2, 16, gpu0, gpu0, gpu0))

	tests := []struct {
		name string
		err  error
		code codes.Code
		msg  string
	}{
		{"one rank on two GPUs", register("P", 1, 2, 16, gpu1, gpu0, gpu1), codes.InvalidArgument, "one rank's KV caches live on one GPU"},
		{"TP ranks on one GPU", register("P", 1, 2, 16, gpu0, gpu0, gpu0), codes.FailedPrecondition, "ranks 0 and 1 are both on GPU " + gpu0},
		{"not a local GPU", register("P", 1, 2, 16, "GPU-ffffffff-ffff-ffff-ffff-ffffffffffff"), codes.FailedPrecondition, "not a GPU of this host"},
		{"D with another block size", register("D", 0, 2, 32, gpu1), codes.FailedPrecondition, `instance "D" (tp_size 2, block_size 32) and instance "P"`},
		{"D with another TP size", register("D", 0, 1, 16, gpu1), codes.FailedPrecondition, "differ in tp_size 1 vs 2"},
		{"D like P", register("D", 0, 2, 16, gpu1), codes.OK, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			require.Equal(t, tc.code, status.Code(tc.err), "%v", tc.err)
			require.Contains(t, status.Convert(tc.err).Message(), tc.msg)
		})
	}
}
