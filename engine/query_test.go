package engine

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	pb "github.com/pegaflow/pegaflow/engine/api/pegaflowv1"
	"github.com/pegaflow/pegaflow/internal/kvtest"
)

// A Query that waits for in-flight saves across the end of its own session
// answers NotFound and leaves no lease behind (one would pin the blocks
// until its TTL with nobody left to load or release them).
func TestQueryWaitingAcrossSessionCloseTakesNoLease(t *testing.T) {
	e := newTestEngine(t, 4<<20)
	p0 := newWorker(t, e, "P", 0, 2, smallSpec)
	p1 := newWorker(t, e, "P", 1, 2, smallSpec)
	d := newWorker(t, e, "D", 0, 2, smallSpec)
	hashes := kvtest.Hashes("closing", 3)
	p0.save(t, seq(0, 3), hashes, "", false)

	type result struct {
		resp *pb.QueryResponse
		err  error
	}
	got := make(chan result, 1)
	go func() {
		resp, err := e.Query(context.Background(), &pb.QueryRequest{SessionId: d.session, NamespaceId: d.nsID, Hashes: hashes,
			WaitMs: 10_000, Lease: true})
		got <- result{resp, err}
	}()
	time.Sleep(50 * time.Millisecond) // the query is waiting for rank 1
	e.CloseSession(d.session)
	p1.save(t, seq(0, 3), hashes, "", false)

	select {
	case r := <-got:
		require.ErrorIs(t, r.err, ErrNotFound, "response %v", r.resp)
	case <-time.After(5 * time.Second):
		t.Fatal("query did not return")
	}
	e.mu.Lock()
	leases, pinned := len(e.leases), 0
	for _, b := range e.namespaces[d.nsID].groups[0].blocks {
		if b.pins > 0 {
			pinned++
		}
	}
	e.mu.Unlock()
	require.Zero(t, leases, "a lease was created for a closed session")
	require.Zero(t, pinned)
}
