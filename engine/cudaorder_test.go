package engine

import (
	"context"
	"testing"

	"github.com/stretchr/testify/require"

	pb "github.com/pegaflow/pegaflow/engine/api/pegaflowv1"
	"github.com/pegaflow/pegaflow/internal/kvtest"
	"github.com/pegaflow/pegaflow/native"
)

// The CPU-visible half of GPU-side save ordering: an event the engine
// cannot open (shm regions here; a CPU build or a refused handle on GPU
// hosts) leaves the registration working with cuda_event=false, and a Save
// that asks for the wait anyway is refused rather than copied unordered.
func TestProducerEventFallback(t *testing.T) {
	e := newTestEngine(t, 1<<20)
	c := newCache(t, smallSpec)
	sid, err := e.OpenSession("w")
	require.NoError(t, err)
	req := c.RegisterRequest("inst", 0, smallSpec.Namespace("m", 1))
	req.SessionId = sid
	req.CudaIpcEvent = make([]byte, 64)
	resp, err := e.Register(context.Background(), req)
	require.NoError(t, err)
	require.False(t, resp.CudaEvent, "no CUDA region: no event to wait for")

	hashes := kvtest.Hashes("ev", 2)
	c.Fill(0, 1)
	c.Fill(1, 2)
	_, err = e.Save(context.Background(), &pb.SaveRequest{SessionId: sid, InstanceId: "inst", Rank: 0,
		Blocks: refs([]int{0, 1}, hashes), WaitEvent: true})
	require.ErrorIs(t, err, ErrPrecondition)
	// Nothing was reserved by the refused save: a plain one stores both.
	saved, err := e.Save(context.Background(), &pb.SaveRequest{SessionId: sid, InstanceId: "inst", Rank: 0,
		Blocks: refs([]int{0, 1}, hashes)})
	require.NoError(t, err)
	require.Equal(t, uint32(2), saved.Saved)

	// A Load asking to wait for the event (async scheduling: the previous
	// step may still use a reused block) is refused the same way, and pins
	// nothing; without the wait it loads.
	_, err = e.Load(context.Background(), &pb.LoadRequest{SessionId: sid, InstanceId: "inst", Rank: 0,
		Blocks: refs([]int{2, 3}, hashes), WaitEvent: true})
	require.ErrorIs(t, err, ErrPrecondition)
	require.Zero(t, e.Stats().PinnedBlocks)
	loaded, err := e.Load(context.Background(), &pb.LoadRequest{SessionId: sid, InstanceId: "inst", Rank: 0,
		Blocks: refs([]int{2, 3}, hashes)})
	require.NoError(t, err)
	require.Equal(t, allOK(2), loaded.Status)
}

func TestCUDADeviceResolution(t *testing.T) {
	dev, err := cudaDevice(regionSpec{})
	require.NoError(t, err)
	require.Equal(t, -1, dev, "no UUID: device 0 as before")
	dev, err = cudaDevice(regionSpec{deviceUUID: "not-a-uuid"})
	require.ErrorIs(t, err, ErrInvalid)
	require.Equal(t, -1, dev)
	dev, err = cudaDevice(regionSpec{deviceUUID: "GPU-00000000-0000-0000-0000-000000000000"})
	require.Equal(t, -1, dev)
	if native.Backend() == "cpu" {
		require.NoError(t, err, "the CPU build leaves the error to the region open")
	} else {
		require.ErrorIs(t, err, ErrPrecondition)
		require.Contains(t, err.Error(), "not visible to the engine")
	}
}
