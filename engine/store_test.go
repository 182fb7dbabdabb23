package engine

import (
	"context"
	"testing"

	"github.com/stretchr/testify/require"

	pb "github.com/pegaflow/pegaflow/engine/api/pegaflowv1"
	"github.com/pegaflow/pegaflow/internal/kvtest"
)

// A caller that already gave up starts no copies, opens no memory and
// leaves nothing pinned or half saved behind.
func TestSaveLoadWithDoneContextStartNothing(t *testing.T) {
	e := newTestEngine(t, 4<<20)
	p := newWorker(t, e, "P", 0, 1, smallSpec)
	hashes := kvtest.Hashes("prompt", 3)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()

	_, err := e.Save(ctx, &pb.SaveRequest{SessionId: p.session, InstanceId: p.instance, Rank: p.rank, Blocks: refs(seq(0, 3), hashes)})
	require.ErrorIs(t, err, context.Canceled)
	reg := newCache(t, smallSpec).RegisterRequest("Q", 0, smallSpec.Namespace("m", 1))
	reg.SessionId = p.session
	_, err = e.Register(ctx, reg)
	require.ErrorIs(t, err, context.Canceled)
	st := e.Stats()
	require.EqualValues(t, 1, st.Instances)
	require.Zero(t, st.ResidentBlocks)
	require.Zero(t, st.PoolUsedBytes)

	require.EqualValues(t, 3, p.save(t, seq(0, 3), hashes, "", false).Saved)
	_, err = e.Load(ctx, &pb.LoadRequest{SessionId: p.session, InstanceId: p.instance, Rank: p.rank, Blocks: refs(seq(3, 3), hashes)})
	require.ErrorIs(t, err, context.Canceled)
	require.Zero(t, e.Stats().PinnedBlocks)
	require.Equal(t, allOK(3), p.load(t, seq(3, 3), hashes, "", ""))
}
