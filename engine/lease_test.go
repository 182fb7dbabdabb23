package engine

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	pb "github.com/pegaflow/pegaflow/engine/api/pegaflowv1"
	"github.com/pegaflow/pegaflow/internal/kvtest"
)

// Another client of the socket cannot unpin what it does not use: a lease
// only by the session that took it, a transfer only by a session with an
// instance in its namespace. Both refusals look like an unknown id.
func TestReleaseOnlyByOwner(t *testing.T) {
	e := newTestEngine(t, 4<<20)
	p := newWorker(t, e, "P", 0, 1, smallSpec)
	d := newWorker(t, e, "D", 0, 1, smallSpec)
	stranger, err := e.OpenSession("stranger")
	require.NoError(t, err)

	hashes := kvtest.Hashes("owned", 3)
	p.save(t, seq(0, 3), hashes, "t-owned", true)
	q := d.query(t, hashes, time.Second, true)
	require.NotEmpty(t, q.LeaseId)
	pins := func() int32 {
		e.mu.Lock()
		defer e.mu.Unlock()
		return e.namespaces[d.nsID].groups[0].blocks[string(hashes[0])].pins
	}
	require.EqualValues(t, 2, pins(), "pinned by the lease and by the transfer")

	for _, sid := range []string{stranger, p.session} {
		require.ErrorIs(t, e.Release(&pb.ReleaseRequest{SessionId: sid, LeaseId: q.LeaseId}), ErrNotFound, "someone else's lease")
	}
	require.ErrorIs(t, e.Release(&pb.ReleaseRequest{SessionId: stranger, TransferId: "t-owned"}), ErrNotFound,
		"a transfer of a namespace the session has no instance in")
	require.EqualValues(t, 2, pins(), "refused releases unpinned nothing")

	require.NoError(t, e.Release(&pb.ReleaseRequest{SessionId: d.session, LeaseId: q.LeaseId}))
	require.EqualValues(t, 1, pins())
	// A vLLM scheduler has no instance: it works in the namespace by
	// querying it, and releases the transfers of its requests.
	sched, err := e.OpenSession("D scheduler")
	require.NoError(t, err)
	_, err = e.Query(context.Background(), &pb.QueryRequest{SessionId: sched, NamespaceId: d.nsID, Hashes: hashes})
	require.NoError(t, err)
	require.NoError(t, e.Release(&pb.ReleaseRequest{SessionId: sched, TransferId: "t-owned"}))
	require.Zero(t, pins())
}

// Two live processes registering one (instance, rank), e.g. DP ranks
// given the same instance_id, are refused instead of evicting each other;
// the same session re-registers, and a new one may once the old ended.
func TestDuplicateLiveInstanceIsRefused(t *testing.T) {
	e := newTestEngine(t, 4<<20)
	first := newWorker(t, e, "P", 0, 1, smallSpec)

	c := newCache(t, smallSpec)
	req := c.RegisterRequest("P", 0, smallSpec.Namespace("m", 1))
	sid, err := e.OpenSession("P second process")
	require.NoError(t, err)
	req.SessionId = sid
	_, err = e.Register(context.Background(), req)
	require.ErrorIs(t, err, ErrAlreadyExists)
	require.ErrorContains(t, err, `instance "P" rank 0 is registered by another live session`)
	require.EqualValues(t, 1, e.Stats().Instances, "the first registration stands")
	first.save(t, seq(0, 1), kvtest.Hashes("still-mine", 1), "", false)

	again := c.RegisterRequest("P", 0, smallSpec.Namespace("m", 1))
	again.SessionId = first.session
	_, err = e.Register(context.Background(), again)
	require.NoError(t, err, "the holder re-registers")

	e.CloseSession(first.session)
	_, err = e.Register(context.Background(), req)
	require.NoError(t, err, "a restarted process registers once the old session ended")
}
