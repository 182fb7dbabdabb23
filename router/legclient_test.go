package router

import (
	"flag"
	"fmt"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"
)

// legClientFlag runs the router's tests with another leg client: make
// test-go runs them once more with -upstream-client=nethttp, so both
// clients pass the same tests.
var legClientFlag = flag.String("upstream-client", "pegaflow", "the leg client the router tests run with: pegaflow or nethttp")

// A P that read the prefill leg whole and then closed the connection
// without answering may have run it: the leg is not replayed on a new
// connection behind the router's back (P would run it twice, unseen), it
// is retried by the prefill leg's policy on another P, with a new
// transfer, counted (retries_total, unanswered_total) and logged.
func TestUnansweredPrefillIsRetriedNotReplayed(t *testing.T) {
	p1, p2, d := newFake(nil), newFake(nil), newFake(nil)
	p1.hangupReused.Store(1)
	h := startRouter(t, []*fakeVLLM{p1, p2}, []*fakeVLLM{d}, nil, nil)
	const n = 4 // round-robin: p1 twice at least, the second time on its kept connection
	for range n {
		resp, out := post(t, h.url+"/v1/completions", strings.Replace(completionBody, `"stream":true`, `"stream":false`, 1))
		require.Equal(t, http.StatusOK, resp.StatusCode, out)
	}
	require.EqualValues(t, 1, testutil.ToFloat64(h.r.m.retries.WithLabelValues(rolePrefill)), "the one retry is counted")
	ids := map[any]int{}
	for _, body := range append(p1.requests(), p2.requests()...) {
		ids[body["kv_transfer_params"].(map[string]any)["pegaflow_transfer_id"]]++
	}
	require.Len(t, ids, n+1, "each prefill P read is a transfer of its own, the retry included: no request ran twice unseen (%v)", ids)
	require.Len(t, d.requests(), n)
}

// fdCount is the number of open file descriptors of this process.
func fdCount(t *testing.T) int {
	t.Helper()
	fds, err := os.ReadDir("/proc/self/fd")
	require.NoError(t, err)
	return len(fds)
}

// TestDepartedBackendsLeaveNoConnections: three generations of dns://
// backends, each serving concurrent traffic, then a fourth that serves
// none: every connection to the first three is closed, and the process
// holds the descriptors it held before the first request.
func TestDepartedBackendsLeaveNoConnections(t *testing.T) {
	if _, err := os.Stat("/proc/self/fd"); err != nil {
		t.Skip("no /proc/self/fd")
	}
	ips := []string{"127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"}
	ps, ds := startFleet(t, ips, nil), startFleet(t, ips, nil)
	dns := startDNS(t)
	dns.set("p.pegaflow.test", ips[0])
	dns.set("d.pegaflow.test", ips[0])
	h := startDNSRouter(t, dns, fmt.Sprintf("dns://p.pegaflow.test:%d", ps.port), fmt.Sprintf("dns://d.pegaflow.test:%d", ds.port),
		func(c *Config) { c.HealthInterval = 0 }) // health polls keep connections of their own
	waitMembers(t, h.r.prefill, ips[0])
	waitMembers(t, h.r.decode, ips[0])
	// The least seen over a while: a DNS lookup holds a socket briefly.
	baseline := fdCount(t)
	for range 20 {
		baseline = min(baseline, fdCount(t))
		time.Sleep(5 * time.Millisecond)
	}
	for i, ip := range ips {
		if i > 0 {
			dns.set("p.pegaflow.test", ip)
			dns.set("d.pegaflow.test", ip)
			waitMembers(t, h.r.prefill, ip)
			waitMembers(t, h.r.decode, ip)
		}
		if i == len(ips)-1 {
			break // the last generation serves nothing
		}
		tr := startTraffic(t, []string{h.url}, 8)
		tr.waitOK(t, 40)
		tr.end()
		require.Empty(t, tr.failed)
		require.Positive(t, ps.count(ip))
	}
	// The test's own client and the engines' /kv_ready posts keep theirs.
	http.DefaultTransport.(*http.Transport).CloseIdleConnections()
	var last int
	require.Eventually(t, func() bool { last = fdCount(t); return last <= baseline }, 10*time.Second, 10*time.Millisecond,
		"open descriptors back to %d", baseline)
	t.Logf("descriptors: baseline %d, after the churn %d", baseline, last)
}
