package engine

import (
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"

	pb "github.com/pegaflow/pegaflow/engine/api/pegaflowv1"
	"github.com/pegaflow/pegaflow/internal/kvtest"
)

// feedReader reads a namespace's feed as a scheduler would.
type feedReader struct {
	e       *Engine
	session string
	nsID    string
	after   uint64
	epoch   string
}

func (r *feedReader) poll(t *testing.T, max uint32) *pb.BlockEventsResponse {
	t.Helper()
	resp, err := r.e.BlockEvents(&pb.BlockEventsRequest{SessionId: r.session, NamespaceId: r.nsID, After: r.after,
		MaxEvents: max, Epoch: r.epoch})
	require.NoError(t, err)
	r.after, r.epoch = resp.Next, resp.Epoch
	return resp
}

type seen struct {
	kind pb.BlockEventKind
	hash string
}

func kinds(resp *pb.BlockEventsResponse) []seen {
	out := make([]seen, len(resp.Events))
	for i, ev := range resp.Events {
		out[i] = seen{ev.Kind, string(ev.Hash)}
	}
	return out
}

const (
	stored  = pb.BlockEventKind_BLOCK_EVENT_KIND_STORED
	present = pb.BlockEventKind_BLOCK_EVENT_KIND_PRESENT
	removed = pb.BlockEventKind_BLOCK_EVENT_KIND_REMOVED
)

// The feed says, in order, which blocks sealed (only once every rank saved
// them), which a rank-0 save or load found present, and which were evicted.
func TestBlockEventsSealPresentEvict(t *testing.T) {
	spec := smallSpec
	e := newTestEngine(t, 8*uint64(spec.BlockBytes())) // 4 blocks of 2 ranks
	p0 := newWorker(t, e, "P", 0, 2, spec)
	p1 := newWorker(t, e, "P", 1, 2, spec)
	r := &feedReader{e: e, session: p0.session, nsID: p0.nsID}

	early := kvtest.Hashes("before-any-reader", 1)
	p0.save(t, seq(0, 1), early, "", false)
	p1.save(t, seq(0, 1), early, "", false)
	first := r.poll(t, 0)
	require.Empty(t, first.Events, "a feed records nothing before its first reader")
	require.NotEmpty(t, first.Epoch)

	h := kvtest.Hashes("feed", 3)
	p0.save(t, seq(1, 3), h, "", false)
	require.Empty(t, r.poll(t, 0).Events, "a block is not stored before every rank saved it")
	p1.save(t, seq(1, 3), h, "", false)
	p1.save(t, seq(1, 1), h[:1], "", false) // rank 1: no present event
	p0.save(t, seq(1, 1), h[:1], "", false)
	require.Equal(t, allOK(1), p1.load(t, seq(5, 1), h[1:2], "", ""))
	require.Equal(t, allOK(1), p0.load(t, seq(5, 1), h[1:2], "", ""))
	resp := r.poll(t, 0)
	require.False(t, resp.Gap)
	require.Equal(t, []seen{{stored, string(h[0])}, {stored, string(h[1])}, {stored, string(h[2])},
		{present, string(h[0])}, {present, string(h[1])}}, kinds(resp))
	for i, ev := range resp.Events {
		require.Equal(t, resp.Events[0].Seq+uint64(i), ev.Seq, "gapless sequence")
	}
	require.Equal(t, resp.Events[4].Seq, resp.Next)

	// Pool full (4 blocks): two more evict the two oldest, in that order.
	more := kvtest.Hashes("more", 2)
	p0.save(t, seq(8, 2), more, "", false)
	p1.save(t, seq(8, 2), more, "", false)
	resp = r.poll(t, 0)
	var got []seen
	for _, s := range kinds(resp) {
		if s.kind == removed {
			got = append(got, s)
		}
	}
	require.Len(t, got, 2)
	require.Equal(t, uint64(2), e.Stats().Evictions)
	require.Equal(t, []seen{{stored, string(more[0])}, {stored, string(more[1])}}, kinds(resp)[len(kinds(resp))-2:])
	require.Empty(t, r.poll(t, 0).Events, "read up to the end")
}

// A reader that fell behind the ring is told (gap) and resumes at the
// oldest event held; a cursor never handed out is a gap too; max bounds
// each answer; another epoch voids the cursor.
func TestBlockEventsGapsAndCursors(t *testing.T) {
	spec := smallSpec
	e, err := New(Config{PoolSize: 4 << 20, NUMANode: -1, Device: -1, CopyThreads: 2, PartialTTL: time.Hour, BlockEventRing: 4},
		nil, prometheus.NewRegistry())
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, e.Close()) })
	p := newWorker(t, e, "P", 0, 1, spec)
	r := &feedReader{e: e, session: p.session, nsID: p.nsID}
	r.poll(t, 0)
	h := kvtest.Hashes("ring", 6)
	p.save(t, seq(0, 6), h, "", false)

	tests := []struct {
		name      string
		after     uint64
		epoch     string
		max       uint32
		wantGap   bool
		wantRst   bool
		wantFirst string // hash of the first event, "" = none
		wantN     int
	}{
		{"behind the ring", 1, r.epoch, 0, true, false, string(h[2]), 4},
		{"within the ring", 3, r.epoch, 0, false, false, string(h[3]), 3},
		{"max bounds the answer", 2, r.epoch, 2, false, false, string(h[2]), 2},
		{"at the end", 6, r.epoch, 0, false, false, "", 0},
		{"cursor never handed out", 99, r.epoch, 0, true, false, string(h[2]), 4},
		{"another engine's cursor", 3, "ep-old", 0, false, true, "", 0},
		{"first call starts now", 0, "", 0, false, false, "", 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			resp, err := e.BlockEvents(&pb.BlockEventsRequest{SessionId: p.session, NamespaceId: p.nsID, After: tc.after,
				Epoch: tc.epoch, MaxEvents: tc.max})
			require.NoError(t, err)
			require.Equal(t, tc.wantGap, resp.Gap)
			require.Equal(t, tc.wantRst, resp.Restarted)
			require.Len(t, resp.Events, tc.wantN)
			if tc.wantN > 0 {
				require.Equal(t, tc.wantFirst, string(resp.Events[0].Hash))
				require.Equal(t, resp.Events[tc.wantN-1].Seq, resp.Next)
			} else {
				require.EqualValues(t, 6, resp.Next, "the cursor is the feed's end")
			}
		})
	}
}

// Only a session that uses the namespace reads its feed: another client of
// the socket learns nothing of which blocks the host holds.
func TestBlockEventsAccess(t *testing.T) {
	e := newTestEngine(t, 4<<20)
	p := newWorker(t, e, "P", 0, 1, smallSpec)
	stranger, err := e.OpenSession("stranger")
	require.NoError(t, err)
	tests := []struct {
		name    string
		session string
		ns      string
		epoch   string
		want    error
	}{
		{"a session not in the namespace", stranger, p.nsID, "", ErrPermission},
		{"an unknown namespace", p.session, "ns-nope", "", ErrNotFound},
		{"an unknown session", "s-nope", p.nsID, "", ErrNotFound},
		{"an oversized epoch", p.session, p.nsID, string(make([]byte, 65)), ErrInvalid},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := e.BlockEvents(&pb.BlockEventsRequest{SessionId: tc.session, NamespaceId: tc.ns, Epoch: tc.epoch})
			require.ErrorIs(t, err, tc.want)
		})
	}
	// Opening the namespace makes it the session's.
	ns, err := e.OpenNamespace(stranger, smallSpec.Namespace("m", 1))
	require.NoError(t, err)
	require.Equal(t, p.nsID, ns)
	_, err = e.BlockEvents(&pb.BlockEventsRequest{SessionId: stranger, NamespaceId: p.nsID})
	require.NoError(t, err)
}
