package engine

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"

	pb "github.com/pegaflow/pegaflow/engine/api/pegaflowv1"
	"github.com/pegaflow/pegaflow/internal/kvtest"
)

// readySink is an HTTP server standing in for a /kv_ready endpoint: it
// counts what reaches it and answers with handle (200 when nil).
type readySink struct {
	*httptest.Server
	hits    atomic.Int32
	reports chan readyReport
}

func newReadySink(t *testing.T, handle http.HandlerFunc) *readySink {
	t.Helper()
	s := &readySink{reports: make(chan readyReport, 16)}
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.hits.Add(1)
		var rep readyReport
		if json.NewDecoder(r.Body).Decode(&rep) == nil {
			s.reports <- rep
		}
		if handle != nil {
			handle(w, r)
		}
	}))
	t.Cleanup(s.Close)
	return s
}

func (s *readySink) hostPort() string { u, _ := url.Parse(s.URL); return u.Host }

func newCallbackEngine(t *testing.T, allow ...string) *Engine {
	t.Helper()
	e, err := New(Config{PoolSize: 4 << 20, NUMANode: -1, Device: -1, PartialTTL: time.Hour, KVReadyAllow: allow}, nil, prometheus.NewRegistry())
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, e.Close()) })
	return e
}

func (w *worker) saveTransfer(ids []int, hashes [][]byte, transfer, readyURL, token string, last bool) error {
	_, err := w.e.Save(context.Background(), &pb.SaveRequest{SessionId: w.session, InstanceId: w.instance, Rank: w.rank,
		Blocks: refs(ids, hashes), TransferId: transfer, TransferLast: last, ReadyUrl: readyURL, ReadyToken: token})
	return err
}

func TestKVReadyAllowRules(t *testing.T) {
	cases := []struct {
		allow   []string
		url     string
		allowed bool
	}{
		{nil, "http://127.0.0.1:9/kv_ready", true},
		{nil, "http://localhost:9/kv_ready", true},
		{nil, "http://[::1]:9/kv_ready", true},
		{nil, "http://10.0.0.7:8080/kv_ready", false},
		{nil, "http://metadata.internal/latest", false},
		{nil, "http://0.0.0.0:8080/kv_ready", false},
		{nil, "http://127.0.0.1@10.0.0.7:8080/kv_ready", false},
		{[]string{"router:8080"}, "http://router:8080/kv_ready", true},
		{[]string{"router:8080"}, "https://ROUTER:8080/x", true},
		{[]string{"router:8080"}, "http://router:8081/kv_ready", false},
		{[]string{"router:8080"}, "http://127.0.0.1:8080/kv_ready", false},
		{[]string{"http://router/kv_ready"}, "http://router:80/kv_ready", true},
		{[]string{"http://router/kv_ready"}, "http://router/other", false},
		{[]string{"http://router/kv_ready"}, "https://router/kv_ready", false},
		{[]string{"http://router:8080/kv_ready"}, "http://router:80801/kv_ready", false},
		{[]string{"none"}, "http://127.0.0.1:9/kv_ready", false},
		{[]string{"loopback", "10.0.0.7:8080"}, "http://10.0.0.7:8080/kv_ready", true},
		{[]string{"loopback,10.0.0.7:8080"}, "http://10.0.0.7:8080/kv_ready", true},
		// Router pods behind a Deployment: any IP of the pod network, one port.
		{[]string{"10.244.0.0/16:8000"}, "http://10.244.3.17:8000/kv_ready", true},
		{[]string{"10.244.0.0/16:8000"}, "http://10.245.0.1:8000/kv_ready", false},
		{[]string{"10.244.0.0/16:8000"}, "http://10.244.3.17:8001/kv_ready", false},
		{[]string{"10.244.0.0/16:8000"}, "http://router.ns.svc:8000/kv_ready", false},
		{[]string{"[fd00::/8]:8000"}, "http://[fd12::5]:8000/kv_ready", true},
		// The address forms --peer-allow takes mean the same here.
		{[]string{"loopback:9"}, "http://127.0.0.1:9/kv_ready", true},
		{[]string{"loopback:9"}, "http://127.0.0.1:10/kv_ready", false},
		{[]string{"fd00::/8:8000"}, "http://[fd12::5]:8000/kv_ready", true},
		// A URL prefix ends on a path-segment boundary.
		{[]string{"http://r/kv_ready"}, "http://r/kv_readyX", false},
		{[]string{"http://r/kv_ready"}, "http://r/kv_ready.evil", false},
		{[]string{"http://r/kv_ready"}, "http://r/kv_ready/", true},
		{[]string{"http://r/kv_ready"}, "http://r/kv_ready/x", true},
		{[]string{"http://r/kv_ready"}, "http://r/kv_re%61dy", true}, // the same path, encoded
		{[]string{"http://r/kv_ready/"}, "http://r/kv_ready", false},
		{[]string{"http://r/kv_ready/"}, "http://r/kv_ready/x", true},
		{[]string{"http://r/"}, "http://r/anything", true},
		{[]string{"http://r"}, "http://r/anything", true},
		// Dot segments and encoded slashes: a server resolves them elsewhere.
		{[]string{"http://r/kv_ready"}, "http://r/kv_ready/../v1/completions", false},
		{[]string{"http://r/kv_ready"}, "http://r/kv_ready/%2e%2e/v1/completions", false},
		{[]string{"http://r/kv_ready"}, "http://r/kv_ready/%2E./v1/completions", false},
		{[]string{"http://r/kv_ready"}, "http://r/kv_ready/./x", false},
		{[]string{"http://r/kv_ready"}, "http://r/kv_ready%2f..%2fv1", false},
		{[]string{"http://r/kv_ready"}, "http://r/kv_ready/..%2F..%2Fv1", false},
		{[]string{"http://r/kv_ready"}, "http://r/kv_ready/x%5c..%5cv1", false},
		{[]string{"http://r/kv_ready"}, "http://r/kv_ready/x\\..\\v1", false},
		{[]string{"r:80"}, "http://r/a/../kv_ready", false},
		{nil, "http://127.0.0.1:9/kv_ready/..", false},
		// Scheme, host and port compared canonically, exactly.
		{[]string{"http://R:80/kv_ready"}, "HTTP://r/kv_ready", true},
		{[]string{"https://r/kv_ready"}, "https://r:443/kv_ready", true},
		{[]string{"https://r/kv_ready"}, "http://r:443/kv_ready", false},
		{[]string{"http://r/kv_ready"}, "http://r.evil/kv_ready", false},
		{[]string{"http://r/kv_ready"}, "http://r:8080/kv_ready", false},
	}
	for _, tc := range cases {
		t.Run(strings.Join(tc.allow, ",")+" "+tc.url, func(t *testing.T) {
			e := newCallbackEngine(t, tc.allow...)
			err := e.checkReadyURL(tc.url)
			if tc.allowed {
				require.NoError(t, err)
			} else {
				require.ErrorIs(t, err, ErrInvalid)
				require.ErrorContains(t, err, "--kv-ready-allow")
			}
		})
	}
	for _, bad := range [][]string{{"nonsense"}, {"ftp://x/y"}, {"none", "loopback"}, {"http://u:p@router/kv_ready"},
		{"10.0.0.0/33:80"}, {"10.0.0.0/8"}, {"10.0.0.0/8:0"}, {"10.0.0.0/8:x"},
		{"http://r/kv_ready/../v1"}, {"http://r/a%2fb"}, {"http://r/%2e%2e/kv_ready"},
		{"router:0"}, {"router:08080"}, {"a b:80"}, {"loopback:"}} {
		require.ErrorIs(t, CheckKVReadyAllow(bad), ErrInvalid, "%q", bad)
	}
}

// A Save whose ready_url the operator did not allow fails, loudly, and
// the host it names is never contacted.
func TestDisallowedReadyURLIsNeverContacted(t *testing.T) {
	allowed := newReadySink(t, nil)
	forbidden := newReadySink(t, nil)
	e := newCallbackEngine(t, allowed.hostPort())
	p := newWorker(t, e, "P", 0, 1, smallSpec)
	hashes := kvtest.Hashes("ssrf", 2)

	err := p.saveTransfer(seq(0, 2), hashes, "t-ssrf", forbidden.URL+"/kv_ready", "tok", true)
	require.ErrorIs(t, err, ErrInvalid)
	require.ErrorContains(t, err, "--kv-ready-allow")

	require.NoError(t, p.saveTransfer(seq(0, 2), hashes, "t-ok", allowed.URL+"/kv_ready", "tok", true))
	require.Eventually(t, func() bool { return allowed.hits.Load() == 1 }, 5*time.Second, 5*time.Millisecond)
	time.Sleep(100 * time.Millisecond)
	require.Zero(t, forbidden.hits.Load(), "a disallowed host must never be contacted")
}

// The engine does not follow a redirect from an allowed callback target,
// not even to another allowed one, and does not retry it.
func TestReadyCallbackRedirectIsNotFollowed(t *testing.T) {
	target := newReadySink(t, nil)
	redirector := newReadySink(t, func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, target.URL+"/kv_ready", http.StatusTemporaryRedirect)
	})
	e := newCallbackEngine(t) // loopback: both are allowed
	p := newWorker(t, e, "P", 0, 1, smallSpec)
	require.NoError(t, p.saveTransfer(seq(0, 1), kvtest.Hashes("redirect", 1), "t-redir", redirector.URL+"/kv_ready", "tok", true))
	require.Eventually(t, func() bool { return redirector.hits.Load() == 1 }, 5*time.Second, 5*time.Millisecond)
	time.Sleep(1200 * time.Millisecond) // past every retry of the callback policy
	require.EqualValues(t, 1, redirector.hits.Load(), "a 3xx is a permanent failure, not retried")
	require.Zero(t, target.hits.Load(), "the redirect must not be followed")
}

// The first ready_url/token bound to a transfer id wins: a later Save
// cannot take the report (or its token) over.
func TestTransferFirstBindingWins(t *testing.T) {
	owner := newReadySink(t, nil)
	thief := newReadySink(t, nil)
	e := newCallbackEngine(t)
	p := newWorker(t, e, "P", 0, 1, smallSpec)
	hashes := kvtest.Hashes("bind", 3)
	require.NoError(t, p.saveTransfer(seq(0, 2), hashes[:2], "t-bind", owner.URL+"/kv_ready", "owner-token", false))

	err := p.saveTransfer([]int{2}, hashes[2:], "t-bind", thief.URL+"/kv_ready", "thief-token", true)
	require.ErrorIs(t, err, ErrInvalid)
	require.ErrorContains(t, err, "first binding wins")
	err = p.saveTransfer([]int{2}, hashes[2:], "t-bind", owner.URL+"/kv_ready", "other-token", true)
	require.ErrorIs(t, err, ErrInvalid, "a different token is a different binding")

	require.NoError(t, p.saveTransfer([]int{2}, hashes[2:], "t-bind", "", "", true), "a save without a URL joins the binding")
	select {
	case rep := <-owner.reports:
		require.Equal(t, readyReport{TransferID: "t-bind", Token: "owner-token", Status: "ready"}, rep)
	case <-time.After(5 * time.Second):
		t.Fatal("the owner got no report")
	}
	time.Sleep(100 * time.Millisecond)
	require.Zero(t, thief.hits.Load())
}

// With a peer address the report names it as the source engine, for the
// router to pass to D; without, the field is absent.
func TestReadyReportNamesSourceEngine(t *testing.T) {
	for _, addr := range []string{"", "10.0.0.5:7400"} {
		sink := newReadySink(t, nil)
		e, err := New(Config{PoolSize: 4 << 20, NUMANode: -1, Device: -1, PartialTTL: time.Hour, PeerAddress: addr}, nil, prometheus.NewRegistry())
		require.NoError(t, err)
		t.Cleanup(func() { require.NoError(t, e.Close()) })
		p := newWorker(t, e, "P", 0, 1, smallSpec)
		require.NoError(t, p.saveTransfer(seq(0, 1), kvtest.Hashes("src"+addr, 1), "t-src", sink.URL+"/kv_ready", "tok", true))
		select {
		case rep := <-sink.reports:
			require.Equal(t, readyReport{TransferID: "t-src", Token: "tok", Status: "ready", SourceEngine: addr}, rep)
		case <-time.After(5 * time.Second):
			t.Fatal("no report")
		}
	}
	_, err := New(Config{PoolSize: 4 << 20, NUMANode: -1, Device: -1, PeerAddress: "nonsense"}, nil, prometheus.NewRegistry())
	require.ErrorIs(t, err, ErrInvalid)
}
