package engine

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"

	pb "github.com/pegaflow/pegaflow/engine/api/pegaflowv1"
	"github.com/pegaflow/pegaflow/internal/kvtest"
)

// Waiting on transfer ids no save named (junk Query waits and
// AwaitTransfer calls) leaves no records behind.
func TestJunkTransferWaitsLeaveNoRecords(t *testing.T) {
	reg := prometheus.NewRegistry()
	e, err := New(Config{PoolSize: 4 << 20, NUMANode: -1, Device: -1, PartialTTL: time.Hour}, nil, reg)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, e.Close()) })
	d := newWorker(t, e, "D", 0, 1, smallSpec)
	hashes := kvtest.Hashes("junk", 1)

	const junk = 20_000
	var wg sync.WaitGroup
	jobs := make(chan int)
	for range 32 {
		wg.Go(func() {
			for i := range jobs {
				_, err := e.Query(context.Background(), &pb.QueryRequest{SessionId: d.session, NamespaceId: d.nsID,
					Hashes: hashes, TransferId: fmt.Sprintf("junk-q-%d", i), WaitMs: 1})
				require.NoError(t, err)
				ctx, cancel := context.WithCancel(context.Background())
				cancel()
				require.ErrorIs(t, e.AwaitTransfer(ctx, fmt.Sprintf("junk-a-%d", i)), context.Canceled)
			}
		})
	}
	for i := range junk {
		jobs <- i
	}
	close(jobs)
	wg.Wait()
	require.Zero(t, gauge(t, reg, "pegaflow_engine_transfers"), "junk waits must not leave transfer records")
	require.Zero(t, gauge(t, reg, "pegaflow_engine_transfer_waits"), "waits end with their waiters")
}

// Beyond --max-transfers, new records and new waits fail with a clear
// ResourceExhausted error; known ids keep working.
func TestTransferCapIsClear(t *testing.T) {
	e, err := New(Config{PoolSize: 4 << 20, NUMANode: -1, Device: -1, PartialTTL: time.Hour, MaxTransfers: 3}, nil, nil)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, e.Close()) })
	p := newWorker(t, e, "P", 0, 1, smallSpec)
	for i := range 3 {
		p.save(t, []int{i}, kvtest.Hashes(fmt.Sprint("cap", i), 1), fmt.Sprint("t-", i), false)
	}
	err = p.saveTransfer([]int{3}, kvtest.Hashes("cap3", 1), "t-3", "", "", false)
	require.ErrorIs(t, err, ErrExhausted)
	require.ErrorContains(t, err, "--max-transfers")
	p.save(t, []int{4}, kvtest.Hashes("cap4", 1), "t-0", true) // an existing record still takes saves

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var wg sync.WaitGroup
	for i := range 3 {
		wg.Go(func() { _ = e.AwaitTransfer(ctx, fmt.Sprint("w-", i)) })
	}
	require.Eventually(t, func() bool { e.mu.Lock(); defer e.mu.Unlock(); return len(e.waits) == 3 }, 5*time.Second, time.Millisecond)
	err = e.AwaitTransfer(context.Background(), "w-3")
	require.ErrorIs(t, err, ErrExhausted)
	require.ErrorContains(t, err, "--max-transfers")
	cancel()
	wg.Wait()
}

// A waiter that arrives before the first save is woken by the record
// that save creates; records expire one TTL after they settle, in order.
func TestTransferWaiterAdoptedAndExpiry(t *testing.T) {
	const ttl = time.Minute
	e, err := New(Config{PoolSize: 4 << 20, NUMANode: -1, Device: -1, PartialTTL: time.Hour, TransferTTL: ttl}, nil, nil)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, e.Close()) })
	p := newWorker(t, e, "P", 0, 1, smallSpec)
	ready := make(chan error, 1)
	go func() { ready <- e.AwaitTransfer(context.Background(), "early") }()
	require.Eventually(t, func() bool { e.mu.Lock(); defer e.mu.Unlock(); return len(e.waits) == 1 }, 5*time.Second, time.Millisecond)
	p.save(t, []int{0}, kvtest.Hashes("early", 1), "early", true)
	require.NoError(t, <-ready)
	p.save(t, []int{1}, kvtest.Hashes("pending", 1), "pending", false)

	e.mu.Lock()
	defer e.mu.Unlock()
	require.Empty(t, e.waits)
	require.Len(t, e.transfers, 2)
	pending := e.transfers["pending"]
	e.expireTransfersLocked(time.Now().Add(ttl / 2))
	require.Len(t, e.transfers, 2, "nothing is due yet")
	e.expireTransfersLocked(time.Now().Add(2 * ttl))
	require.Empty(t, e.transfers)
	require.Equal(t, transferFailed, pending.state, "the pending one timed out")
	require.Equal(t, "timed out waiting for saves", pending.message)
	require.Empty(t, e.expiry, "the queue is compacted")
}

// BenchmarkTransferExpiryPass is one housekeeping pass over 500,000 live
// records none of which is due: it must not scan them (it took 39 ms of
// every 250 ms tick with a full scan).
func BenchmarkTransferExpiryPass(b *testing.B) {
	e, err := New(Config{PoolSize: 4 << 20, NUMANode: -1, Device: -1, MaxTransfers: 1 << 20}, nil, nil)
	require.NoError(b, err)
	defer e.Close()
	sid, err := e.OpenSession("bench")
	require.NoError(b, err)
	ns, err := e.OpenNamespace(sid, smallSpec.Namespace("m", 1))
	require.NoError(b, err)
	e.mu.Lock()
	for i := range 500_000 {
		_, err := e.transferLocked(fmt.Sprint("t-", i), e.namespaces[ns], "", "")
		require.NoError(b, err)
	}
	e.mu.Unlock()
	now := time.Now()
	for b.Loop() {
		e.expire(now)
	}
}
