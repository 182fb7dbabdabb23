package router

import (
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"
)

// TestRouterReplicas: two routers share no state, each with
// --kv-ready-url set to its own address, in front of the same P and D
// (found by DNS, whose answer changes meanwhile), behind one client that
// alternates between them. P posts each kv_ready callback to the URL its
// request carried, as the engine does: every callback reaches the replica
// that holds the request, every request is answered, and D learns which
// P's engine holds each transfer's KV.
func TestRouterReplicas(t *testing.T) {
	ips := []string{"127.0.0.2", "127.0.0.3"}
	ps := startFleet(t, ips, func(f *fakeVLLM) { f.readyDelay = 10 * time.Millisecond })
	for ip, f := range ps.fakes {
		f.readySource = net.JoinHostPort(ip, "7100") // its engine's --peer-addr
	}
	ds := startFleet(t, ips, nil)
	dns := startDNS(t)
	dns.set("p.pegaflow.test", "127.0.0.2")
	dns.set("d.pegaflow.test", "127.0.0.2", "127.0.0.3")
	pTarget, dTarget := fmt.Sprintf("dns://p.pegaflow.test:%d", ps.port), fmt.Sprintf("dns://d.pegaflow.test:%d", ds.port)
	ownURL := func(c *Config) { c.KVReadyURL = "http://" + c.ListenAddr + "/kv_ready" }
	replicas := []*harness{startDNSRouter(t, dns, pTarget, dTarget, ownURL), startDNSRouter(t, dns, pTarget, dTarget, ownURL)}
	var urls []string
	for _, h := range replicas {
		waitMembers(t, h.r.prefill, "127.0.0.2")
		waitMembers(t, h.r.decode, "127.0.0.2", "127.0.0.3")
		urls = append(urls, h.url)
	}
	require.NotEqual(t, replicas[0].r.readyURL, replicas[1].r.readyURL)

	tr := startTraffic(t, urls, 4)
	tr.waitOK(t, 20)
	dns.set("p.pegaflow.test", "127.0.0.2", "127.0.0.3")
	for _, h := range replicas {
		waitMembers(t, h.r.prefill, "127.0.0.2", "127.0.0.3")
	}
	tr.waitOK(t, 20)
	dns.set("p.pegaflow.test", "127.0.0.3")
	dns.set("d.pegaflow.test", "127.0.0.2")
	for _, h := range replicas {
		waitMembers(t, h.r.prefill, "127.0.0.3")
		waitMembers(t, h.r.decode, "127.0.0.2")
	}
	tr.waitOK(t, 20)
	tr.end()
	require.Empty(t, tr.failed, "every request answered")

	var served float64
	for i, h := range replicas {
		ok := testutil.ToFloat64(h.r.m.outcomes[outcomeOK])
		require.Positive(t, ok, "replica %d served requests", i)
		require.Equal(t, ok, testutil.ToFloat64(h.r.m.readyBy[sourceCallback]), "replica %d: every request's callback reached it", i)
		require.Zero(t, testutil.ToFloat64(h.r.m.kvTimeouts), "replica %d: no wait expired", i)
		require.Zero(t, testutil.CollectAndCount(h.r.m.kvRejected), "replica %d: no callback was another's", i)
		require.Zero(t, h.r.transfers.liveCount())
		served += ok
	}
	require.Equal(t, float64(tr.ok.Load()), served)

	// Where each transfer's KV is: the P that prefilled it, as it reported.
	heldBy := map[string]string{}
	for ip, f := range ps.fakes {
		for _, body := range f.requests() {
			kv := body["kv_transfer_params"].(map[string]any)
			require.Contains(t, urls, strings.TrimSuffix(kv[kvReadyURL].(string), "/kv_ready"), "P was given a replica's own URL")
			heldBy[kv[kvTransferID].(string)] = net.JoinHostPort(ip, "7100")
		}
	}
	decoded := 0
	for _, f := range ds.fakes {
		for _, body := range f.requests() {
			kv := body["kv_transfer_params"].(map[string]any)
			require.Equal(t, heldBy[kv[kvTransferID].(string)], kv[kvSourceEngine], "D is told the engine of the P that prefilled")
			decoded++
		}
	}
	require.Equal(t, int(served), decoded)
}
