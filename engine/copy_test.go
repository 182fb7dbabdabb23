package engine

import (
	"context"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"

	pb "github.com/pegaflow/pegaflow/engine/api/pegaflowv1"
	"github.com/pegaflow/pegaflow/internal/kvtest"
)

// A copy that never completes (the native copier held, as one stuck on a
// dead producer's CUDA event would be) fails its Save or Load at the
// deadline instead of hanging it, leaves nothing in flight for queries,
// keeps its memory reserved until the copy really ends, and does not hang
// Close.
func TestStuckCopiesFailAtTheDeadline(t *testing.T) {
	const timeout = 300 * time.Millisecond
	e, err := New(Config{PoolSize: 4 << 20, NUMANode: -1, Device: -1, CopyThreads: 2, PartialTTL: time.Hour,
		CopyTimeout: timeout}, nil, prometheus.NewRegistry())
	require.NoError(t, err)
	released := false
	t.Cleanup(func() {
		if !released {
			e.copier.HoldForTest(false)
		}
		_ = e.Close()
	})
	w := newWorker(t, e, "P", 0, 1, smallSpec)
	sealed := kvtest.Hashes("sealed", 2)
	w.save(t, seq(0, 2), sealed, "", false)
	baseline := e.Stats().PoolUsedBytes
	require.Positive(t, baseline)

	e.copier.HoldForTest(true)
	stuck := kvtest.Hashes("stuck", 4)
	begin := time.Now()
	_, err = e.Save(context.Background(), &pb.SaveRequest{SessionId: w.session, InstanceId: w.instance, Blocks: refs(seq(2, 4), stuck)})
	require.ErrorIs(t, err, context.DeadlineExceeded)
	require.Less(t, time.Since(begin), timeout+time.Second)
	// The caller's own, shorter deadline wins over the cap.
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	begin = time.Now()
	_, err = e.Load(ctx, &pb.LoadRequest{SessionId: w.session, InstanceId: w.instance, Blocks: refs(seq(8, 2), sealed)})
	cancel()
	require.ErrorIs(t, err, context.DeadlineExceeded)
	require.Less(t, time.Since(begin), timeout)

	st := e.Stats()
	require.Greater(t, st.PoolUsedBytes, baseline, "the stuck save's extents stay reserved")
	require.EqualValues(t, 2, st.PinnedBlocks, "the stuck load's blocks stay pinned")
	require.False(t, e.budget.sem.TryAcquire(e.budget.max), "late copies still hold their copy ops")
	begin = time.Now()
	q := w.query(t, stuck, 5*time.Second, false)
	require.Zero(t, q.NumHit)
	require.Zero(t, q.NumInflight, "the stuck save's blocks failed")
	require.Less(t, time.Since(begin), time.Second, "the query did not wait for them")

	begin = time.Now()
	require.Error(t, e.Close(), "close reports copies still running")
	require.Less(t, time.Since(begin), timeout+time.Second, "close is bounded")
	select {
	case <-e.freed:
		t.Fatal("pools freed while a copy still uses them")
	default:
	}

	e.copier.HoldForTest(false)
	released = true
	select {
	case <-e.freed:
	case <-time.After(5 * time.Second):
		t.Fatal("the pools were not freed after the copies ended")
	}
	st = e.Stats()
	require.Equal(t, baseline, st.PoolUsedBytes, "late copies' memory is free again")
	require.Zero(t, st.PinnedBlocks)
	require.Zero(t, st.InflightBlocks)
	// The copy ops of the late calls go back to the budget only now that
	// their copies ended, never when the calls gave up.
	require.True(t, e.budget.sem.TryAcquire(e.budget.max), "every late call returned its copy ops")
	e.budget.release(e.budget.max)
}
