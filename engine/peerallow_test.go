package engine

import (
	"context"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"

	pb "github.com/pegaflow/pegaflow/engine/api/pegaflowv1"
	"github.com/pegaflow/pegaflow/internal/kvtest"
	"github.com/pegaflow/pegaflow/native"
)

func TestPeerAllowRules(t *testing.T) {
	cases := []struct {
		allow   []string
		addr    string
		allowed bool
	}{
		{nil, "127.0.0.1:7400", false},
		{nil, "10.0.0.7:7400", false},
		{[]string{"loopback:7400"}, "127.0.0.1:7400", true},
		{[]string{"loopback:7400"}, "127.0.0.1:7401", false}, // another local user's port
		{[]string{"LOOPBACK:1"}, "localhost:1", true},
		{[]string{"loopback:7400"}, "[::1]:7400", true},
		{[]string{"loopback:7400"}, "10.0.0.7:7400", false},
		{[]string{"10.0.0.7:7400"}, "10.0.0.7:7400", true},
		{[]string{"10.0.0.7:7400"}, "10.0.0.7:7401", false},
		{[]string{"Engine-A:7400"}, "engine-a:7400", true},
		{[]string{"engine-a:7400"}, "10.0.0.7:7400", false},
		{[]string{"10.0.0.0/24:7400"}, "10.0.0.7:7400", true},
		{[]string{"10.0.0.0/24:7400"}, "10.0.0.7:22", false}, // a subnet admits its port only
		{[]string{"10.0.0.0/24:7400"}, "10.0.1.7:7400", false},
		{[]string{"10.0.0.0/24:7400"}, "engine-a:7400", false}, // names are never resolved
		{[]string{"[fd00::/64]:7400"}, "[fd00::7]:7400", true},
		{[]string{"[fd00::/64]:7400"}, "[fd00::7]:7401", false},
		{[]string{"loopback:9,10.0.0.7:7400"}, "10.0.0.7:7400", true},
		{[]string{"loopback:9", "10.0.0.7:7400"}, "127.0.0.2:9", true},
	}
	for _, tc := range cases {
		t.Run(strings.Join(tc.allow, ",")+" "+tc.addr, func(t *testing.T) {
			e, err := New(Config{PoolSize: 4 << 20, NUMANode: -1, Device: -1, PeerAllow: tc.allow}, nil, prometheus.NewRegistry())
			require.NoError(t, err)
			t.Cleanup(func() { require.NoError(t, e.Close()) })
			err = e.checkSourceEngine(tc.addr)
			if tc.allowed {
				require.NoError(t, err)
				return
			}
			require.ErrorIs(t, err, ErrInvalid)
			require.ErrorContains(t, err, "--peer-allow")
		})
	}
	for _, bad := range [][]string{{"nonsense"}, {"10.0.0.7"}, {":7400"}, {"http://a:1"}, {"loopback:9,"},
		{"10.0.0.7:0"}, {"10.0.0.7:http"}, {"10.0.0.0/33:7400"}, {"10.0.0.0/24:"}} {
		require.ErrorIs(t, CheckPeerAllow(bad), ErrInvalid, "%q", bad)
	}
	// A bare subnet or loopback admitted any port: refused, naming the form
	// that works.
	for _, bare := range []string{"10.0.0.0/24", "fd00::/64", "loopback", "Loopback"} {
		err := CheckPeerAllow([]string{bare})
		require.ErrorIs(t, err, ErrInvalid, bare)
		require.ErrorContains(t, err, "needs a port, e.g. "+bare+":7400")
	}
}

// countingPeers counts the calls that would reach the network.
type countingPeers struct {
	*directPeers
	handshakes atomic.Int32
}

func (c *countingPeers) Handshake(ctx context.Context, addr string) (*pb.PeerHandshakeResponse, error) {
	c.handshakes.Add(1)
	return c.directPeers.Handshake(ctx, addr)
}

func newAllowEngine(t *testing.T, ctl PeerControl, addr string, allow ...string) *Engine {
	t.Helper()
	e, err := New(Config{PoolSize: 8 << 20, NUMANode: -1, Device: -1, PartialTTL: time.Hour, Peers: ctl, PeerAddress: addr, PeerAllow: allow},
		nil, prometheus.NewRegistry())
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, e.Close()) })
	return e
}

// A source the operator did not list is refused before anything dials it
// (the engine would present its peer token there); a listed one fetches.
func TestUnlistedSourceEngineIsNeverContacted(t *testing.T) {
	if !native.XferBuilt {
		t.Skip("UCX not built")
	}
	t.Setenv("UCX_TLS", "tcp")
	ctl := &countingPeers{directPeers: &directPeers{peers: map[string]*Engine{}}}
	a := newAllowEngine(t, ctl, "a:1")
	b := newAllowEngine(t, ctl, "b:1", "a:1")
	ctl.peers["a:1"], ctl.peers["evil:1"] = a, a
	p := newWorker(t, a, "P", 0, 1, smallSpec)
	d := newWorker(t, b, "D", 0, 1, smallSpec)
	hashes := kvtest.Hashes("allow", 3)
	p.save(t, seq(0, 3), hashes, "", false)

	for _, src := range []string{"evil:1", "A:2"} {
		_, err := b.Query(context.Background(), &pb.QueryRequest{SessionId: d.session, NamespaceId: d.nsID, Hashes: hashes,
			WaitMs: 1000, SourceEngine: src})
		require.ErrorIs(t, err, ErrInvalid)
		require.ErrorContains(t, err, "--peer-allow (a:1)")
	}
	require.Zero(t, ctl.handshakes.Load(), "an unlisted source must never be dialled")
	require.EqualValues(t, 3, d.queryFrom(t, "a:1", hashes, time.Second).NumHit)
	require.EqualValues(t, 1, ctl.handshakes.Load())
}

// A query naming this engine itself (P and D on one host of a multi-host
// deployment) is local: it waits for the local transfer, fetches nothing.
func TestSourceEngineNamingItselfIsLocal(t *testing.T) {
	if !native.XferBuilt {
		t.Skip("UCX not built")
	}
	t.Setenv("UCX_TLS", "tcp")
	ctl := &countingPeers{directPeers: &directPeers{peers: map[string]*Engine{}}}
	e := newAllowEngine(t, ctl, "host-a:7400") // itself unlisted: no allowlist needed
	ctl.peers["host-a:7400"] = e
	p := newWorker(t, e, "P", 0, 1, smallSpec)
	d := newWorker(t, e, "D", 0, 1, smallSpec)
	hashes := kvtest.Hashes("self", 4)
	go func() {
		time.Sleep(100 * time.Millisecond)
		_ = p.saveTransfer(seq(0, 4), hashes, "t-self", "", "", true)
	}()
	resp, err := e.Query(context.Background(), &pb.QueryRequest{SessionId: d.session, NamespaceId: d.nsID, Hashes: hashes,
		WaitMs: 5000, TransferId: "t-self", SourceEngine: "HOST-A:7400"})
	require.NoError(t, err)
	require.EqualValues(t, 4, resp.NumHit, "waited for the local transfer")
	require.Zero(t, ctl.handshakes.Load())
	require.Zero(t, testutil.ToFloat64(e.m.fetchBlocks))
}

// An engine without peers ignores source_engine, as before it had any.
func TestSourceEngineWithoutPeersIsIgnored(t *testing.T) {
	e := newCallbackEngine(t)
	d := newWorker(t, e, "D", 0, 1, smallSpec)
	hashes := kvtest.Hashes("nopeers", 2)
	resp, err := e.Query(context.Background(), &pb.QueryRequest{SessionId: d.session, NamespaceId: d.nsID, Hashes: hashes,
		SourceEngine: "10.0.0.7:7400"})
	require.NoError(t, err)
	require.Zero(t, resp.NumHit)
}
