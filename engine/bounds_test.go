package engine

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"

	pb "github.com/pegaflow/pegaflow/engine/api/pegaflowv1"
	"github.com/pegaflow/pegaflow/internal/kvtest"
)

// A call names each hash and each block id once, so its work is bounded
// by the registration (a Load of one hash 1,000 times ran the engine out
// of memory).
func TestRepeatedRefsAreRejected(t *testing.T) {
	e := newTestEngine(t, 4<<20)
	w := newWorker(t, e, "W", 0, 1, smallSpec)
	h := kvtest.Hashes("dup", 3)
	w.save(t, seq(0, 2), h[:2], "", false)
	same := make([][]byte, smallSpec.NumBlocks)
	for i := range same {
		same[i] = h[0]
	}
	cases := []struct {
		name string
		refs []*pb.BlockRef
		want string
	}{
		{"repeated hash", refs([]int{3, 4}, [][]byte{h[0], h[0]}), "repeated"},
		{"repeated block id", refs([]int{3, 3}, [][]byte{h[0], h[1]}), "repeated"},
		{"one hash into every block", refs(seq(0, smallSpec.NumBlocks), same), "repeated"},
		{"more refs than blocks", refs(make([]int, smallSpec.NumBlocks+1), append(same, h[1])), "more than the instance's"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := e.Load(context.Background(), &pb.LoadRequest{SessionId: w.session, InstanceId: w.instance, Blocks: tc.refs})
			require.ErrorIs(t, err, ErrInvalid)
			require.ErrorContains(t, err, tc.want)
			_, err = e.Save(context.Background(), &pb.SaveRequest{SessionId: w.session, InstanceId: w.instance, Blocks: tc.refs})
			require.ErrorIs(t, err, ErrInvalid)
			require.ErrorContains(t, err, tc.want)
		})
	}
	require.Equal(t, allOK(2), w.load(t, []int{5, 6}, h[:2], "", ""), "distinct refs still load")
	require.Zero(t, e.Stats().PinnedBlocks)
}

// One call may not plan more copy ops than --max-copy-ops; calls that
// fit share the budget (they wait for each other, bounded by their ctx).
func TestCopyOpsBudget(t *testing.T) {
	perBlock := int64(smallSpec.Layers * 2) // flash_attn: K and V per layer
	e, err := New(Config{PoolSize: 4 << 20, NUMANode: -1, Device: -1, PartialTTL: time.Hour, MaxCopyOps: 4 * perBlock},
		nil, prometheus.NewRegistry())
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, e.Close()) })
	w := newWorker(t, e, "W", 0, 1, smallSpec)
	h := kvtest.Hashes("budget", 8)

	_, err = e.Save(context.Background(), &pb.SaveRequest{SessionId: w.session, InstanceId: w.instance, Blocks: refs(seq(0, 5), h[:5])})
	require.ErrorIs(t, err, ErrInvalid)
	require.ErrorContains(t, err, "--max-copy-ops")
	w.save(t, seq(0, 4), h[:4], "", false)
	w.save(t, seq(4, 4), h[4:], "", false)

	var wg sync.WaitGroup
	for i := range 8 {
		wg.Go(func() {
			lo := 4 * (i % 2)
			resp, err := e.Load(context.Background(), &pb.LoadRequest{SessionId: w.session, InstanceId: w.instance,
				Blocks: refs(seq(8+lo, 4), h[lo:lo+4])})
			require.NoError(t, err)
			require.Equal(t, allOK(4), resp.Status)
		})
	}
	wg.Wait()

	// A call that cannot get the budget before its deadline fails with it.
	require.True(t, e.budget.sem.TryAcquire(1))
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	_, err = e.Load(ctx, &pb.LoadRequest{SessionId: w.session, InstanceId: w.instance, Blocks: refs(seq(8, 4), h[:4])})
	require.ErrorIs(t, err, context.DeadlineExceeded)
	e.budget.release(1)
	require.True(t, e.budget.sem.TryAcquire(e.budget.max), "every call returned its ops")
	e.budget.release(e.budget.max)
	require.Zero(t, e.Stats().PinnedBlocks)
}
