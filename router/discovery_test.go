package router

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"
	"golang.org/x/net/dns/dnsmessage"
)

// dnsServer is a real DNS server on loopback UDP: A queries for a name it
// knows are answered with that name's current addresses, AAAA queries
// for it with none, anything else with NXDOMAIN; while failing, every
// query gets SERVFAIL.
type dnsServer struct {
	conn    net.PacketConn
	mu      sync.Mutex
	answers map[string][]netip.Addr // FQDN, lower case -> A records
	failing atomic.Bool
	queries atomic.Int64
}

func startDNS(t *testing.T) *dnsServer {
	t.Helper()
	conn, err := net.ListenPacket("udp", "127.0.0.1:0")
	require.NoError(t, err)
	s := &dnsServer{conn: conn, answers: map[string][]netip.Addr{}}
	go s.serve()
	t.Cleanup(func() { conn.Close() })
	return s
}

// set makes name resolve to addrs (none: NXDOMAIN).
func (s *dnsServer) set(name string, addrs ...string) {
	var as []netip.Addr
	for _, a := range addrs {
		as = append(as, netip.MustParseAddr(a))
	}
	s.mu.Lock()
	s.answers[strings.ToLower(name)+"."] = as
	s.mu.Unlock()
}

// resolver is a Go resolver that asks s alone.
func (s *dnsServer) resolver() *net.Resolver {
	return &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "udp", s.conn.LocalAddr().String())
	}}
}

func (s *dnsServer) serve() {
	buf := make([]byte, 1500)
	for {
		n, from, err := s.conn.ReadFrom(buf)
		if err != nil {
			return
		}
		if resp, err := s.answer(buf[:n]); err == nil {
			_, _ = s.conn.WriteTo(resp, from)
		}
	}
}

func (s *dnsServer) answer(query []byte) ([]byte, error) {
	s.queries.Add(1)
	var p dnsmessage.Parser
	h, err := p.Start(query)
	if err != nil {
		return nil, err
	}
	q, err := p.Question()
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	addrs, known := s.answers[strings.ToLower(q.Name.String())]
	s.mu.Unlock()
	rh := dnsmessage.Header{ID: h.ID, Response: true, Authoritative: true, RecursionDesired: h.RecursionDesired}
	switch {
	case s.failing.Load():
		rh.RCode = dnsmessage.RCodeServerFailure
	case !known || len(addrs) == 0:
		rh.RCode = dnsmessage.RCodeNameError
	}
	b := dnsmessage.NewBuilder(nil, rh)
	if err := b.StartQuestions(); err != nil {
		return nil, err
	}
	if err := b.Question(q); err != nil {
		return nil, err
	}
	if err := b.StartAnswers(); err != nil {
		return nil, err
	}
	if rh.RCode == dnsmessage.RCodeSuccess && q.Type == dnsmessage.TypeA {
		for _, a := range addrs {
			if err := b.AResource(dnsmessage.ResourceHeader{Name: q.Name, Class: dnsmessage.ClassINET}, dnsmessage.AResource{A: a.As4()}); err != nil {
				return nil, err
			}
		}
	}
	return b.Finish()
}

// fleet is one fake per loopback address, all on one port: what a
// headless Service's pods look like behind dns://name:port.
type fleet struct {
	port  int
	fakes map[string]*fakeVLLM // by IP
}

func startFleet(t *testing.T, ips []string, mutate func(*fakeVLLM)) *fleet {
	t.Helper()
	for try := 0; try < 20; try++ {
		probe, err := net.Listen("tcp", ips[0]+":0")
		require.NoError(t, err)
		port := probe.Addr().(*net.TCPAddr).Port
		lis := []net.Listener{probe}
		for _, ip := range ips[1:] {
			l, err := net.Listen("tcp", net.JoinHostPort(ip, fmt.Sprint(port)))
			if err != nil {
				break // the port is taken on that address: another port
			}
			lis = append(lis, l)
		}
		if len(lis) < len(ips) {
			for _, l := range lis {
				l.Close()
			}
			continue
		}
		f := &fleet{port: port, fakes: map[string]*fakeVLLM{}}
		for i, ip := range ips {
			f.fakes[ip] = newFakeOn(lis[i], mutate)
			t.Cleanup(f.fakes[ip].Close)
		}
		return f
	}
	t.Fatal("no port free on every loopback address")
	return nil
}

func (f *fleet) count(ip string) int { return len(f.fakes[ip].requests()) }

// startDNSRouter is a P/D router whose P and D are dns:// targets
// resolved by dns.
func startDNSRouter(t *testing.T, dns *dnsServer, prefill, decode string, mutate func(*Config)) *harness {
	t.Helper()
	return startRouterDeps(t, nil, nil, func(c *Config) {
		c.Prefill, c.Decode = []string{prefill}, []string{decode}
		c.ResolveInterval = 20 * time.Millisecond
		c.HealthInterval = 30 * time.Millisecond
		if mutate != nil {
			mutate(c)
		}
	}, Deps{Resolver: dns.resolver()})
}

// members is the pool's current addresses (host of each base).
func members(p *pool) []string {
	var out []string
	for _, b := range p.backends() {
		host, _, _ := net.SplitHostPort(strings.TrimPrefix(b.base, "http://"))
		out = append(out, host)
	}
	return out
}

func waitMembers(t *testing.T, p *pool, want ...string) {
	t.Helper()
	require.Eventually(t, func() bool { return fmt.Sprint(members(p)) == fmt.Sprint(want) }, 5*time.Second, 5*time.Millisecond,
		"%s pool: want %v, have %v", p.role, want, members(p))
}

// traffic sends requests from a few clients until stop, checking that
// every one is answered in full.
type traffic struct {
	stop   chan struct{}
	wg     sync.WaitGroup
	ok     atomic.Int64
	mu     sync.Mutex
	failed []string
}

func startTraffic(t *testing.T, urls []string, clients int) *traffic {
	tr := &traffic{stop: make(chan struct{})}
	for c := 0; c < clients; c++ {
		tr.wg.Add(1)
		go func() {
			defer tr.wg.Done()
			for i := 0; ; i++ {
				select {
				case <-tr.stop:
					return
				default:
				}
				url := urls[(c+i)%len(urls)] // alternating replicas, when there are several
				if err := completeOnce(url); err != nil {
					tr.mu.Lock()
					tr.failed = append(tr.failed, err.Error())
					tr.mu.Unlock()
					continue
				}
				tr.ok.Add(1)
			}
		}()
	}
	t.Cleanup(tr.end)
	return tr
}

func (tr *traffic) end() {
	select {
	case <-tr.stop:
	default:
		close(tr.stop)
	}
	tr.wg.Wait()
}

// waitOK waits until n more requests were answered.
func (tr *traffic) waitOK(t *testing.T, n int64) {
	t.Helper()
	want := tr.ok.Load() + n
	require.Eventually(t, func() bool { return tr.ok.Load() >= want }, 10*time.Second, 5*time.Millisecond)
}

// completeOnce posts one streaming completion and checks its answer.
func completeOnce(url string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	status, body, err := postErr(ctx, url+"/v1/completions", completionBody)
	if err != nil {
		return err
	}
	if status != http.StatusOK || !strings.Contains(body, `"text":" world"`) ||
		!strings.HasSuffix(body, "data: [DONE]\n\n") || strings.Contains(body, `"error"`) {
		return fmt.Errorf("status %d: %s", status, body)
	}
	return nil
}

// TestDNSDiscoveryUnderTraffic: P and D given as dns:// names served by a
// real DNS server whose answer changes while requests run: backends that
// join get requests, backends that leave get no new ones, a failing DNS
// keeps the last good set (counted), an address that comes back is a
// fresh backend; every request is answered in full.
func TestDNSDiscoveryUnderTraffic(t *testing.T) {
	ips := []string{"127.0.0.2", "127.0.0.3", "127.0.0.4"}
	ps, ds := startFleet(t, ips, nil), startFleet(t, ips, nil)
	dns := startDNS(t)
	dns.set("p.pegaflow.test", "127.0.0.2")
	dns.set("d.pegaflow.test", "127.0.0.2")
	pTarget := fmt.Sprintf("dns://p.pegaflow.test:%d", ps.port)
	h := startDNSRouter(t, dns, pTarget, fmt.Sprintf("dns://d.pegaflow.test:%d", ds.port), nil)
	waitMembers(t, h.r.prefill, "127.0.0.2")
	waitMembers(t, h.r.decode, "127.0.0.2")
	ok, _ := h.r.Healthy()
	require.True(t, ok)

	tr := startTraffic(t, []string{h.url}, 4)
	tr.waitOK(t, 10)

	// Scale out: backends join and get requests.
	dns.set("p.pegaflow.test", "127.0.0.3", "127.0.0.2")
	dns.set("d.pegaflow.test", "127.0.0.4", "127.0.0.3", "127.0.0.2")
	waitMembers(t, h.r.prefill, "127.0.0.2", "127.0.0.3")
	waitMembers(t, h.r.decode, "127.0.0.2", "127.0.0.3", "127.0.0.4")
	require.Eventually(t, func() bool {
		return ps.count("127.0.0.3") > 0 && ds.count("127.0.0.3") > 0 && ds.count("127.0.0.4") > 0
	}, 10*time.Second, 5*time.Millisecond, "joined backends get requests")
	oldP2 := h.r.prefill.backends()[0]
	oldP2.mu.Lock()
	oldP2.ejectedUntil = time.Now().Add(time.Hour) // passive health ejected it
	oldP2.mu.Unlock()
	tr.waitOK(t, 10)
	require.Same(t, oldP2, h.r.prefill.backends()[0], "a backend still present keeps its object")
	require.False(t, h.r.prefill.backends()[0].healthy(time.Now()), "and its ejection")

	// Scale in: backends that left get no new requests.
	dns.set("p.pegaflow.test", "127.0.0.3")
	dns.set("d.pegaflow.test", "127.0.0.4")
	waitMembers(t, h.r.prefill, "127.0.0.3")
	waitMembers(t, h.r.decode, "127.0.0.4")
	time.Sleep(100 * time.Millisecond) // requests that picked them before finish
	p2, d2, d3 := ps.count("127.0.0.2"), ds.count("127.0.0.2"), ds.count("127.0.0.3")
	tr.waitOK(t, 20)
	require.Equal(t, []int{p2, d2, d3}, []int{ps.count("127.0.0.2"), ds.count("127.0.0.2"), ds.count("127.0.0.3")},
		"no new request reaches a backend that left")
	for _, vec := range []interface{ DeleteLabelValues(...string) bool }{h.r.m.healthy, h.r.m.inflight} {
		require.False(t, vec.DeleteLabelValues(rolePrefill, fmt.Sprintf("http://127.0.0.2:%d", ps.port)), "a backend that left has no series")
	}

	// DNS fails: the last good set stays, the failures are counted.
	dns.failing.Store(true)
	errs := h.r.m.resolveErrors.WithLabelValues(pTarget)
	require.Eventually(t, func() bool { return testutil.ToFloat64(errs) >= 3 }, 5*time.Second, 5*time.Millisecond)
	require.Equal(t, []string{"127.0.0.3"}, members(h.r.prefill))
	require.Equal(t, []string{"127.0.0.4"}, members(h.r.decode))
	tr.waitOK(t, 10)

	// It answers again: the address that came back is a fresh backend (no
	// stale ejection) and gets requests.
	dns.set("p.pegaflow.test", "127.0.0.2", "127.0.0.3")
	dns.failing.Store(false)
	waitMembers(t, h.r.prefill, "127.0.0.2", "127.0.0.3")
	back := h.r.prefill.backends()[0]
	require.NotSame(t, oldP2, back)
	require.True(t, back.healthy(time.Now()))
	before := ps.count("127.0.0.2")
	require.Eventually(t, func() bool { return ps.count("127.0.0.2") > before }, 10*time.Second, 5*time.Millisecond)

	tr.end()
	require.Empty(t, tr.failed, "every request answered")
	require.Positive(t, tr.ok.Load())
	require.Positive(t, dns.queries.Load())
}

// TestDNSRemovedBackendFinishesInFlight: a D that leaves the DNS answer
// mid-stream finishes the stream it serves.
func TestDNSRemovedBackendFinishesInFlight(t *testing.T) {
	ips := []string{"127.0.0.2", "127.0.0.3"}
	ps := startFleet(t, ips[:1], nil)
	ds := startFleet(t, ips, func(f *fakeVLLM) { f.gap = 100 * time.Millisecond })
	dns := startDNS(t)
	dns.set("p.pegaflow.test", "127.0.0.2")
	dns.set("d.pegaflow.test", "127.0.0.2")
	h := startDNSRouter(t, dns, fmt.Sprintf("dns://p.pegaflow.test:%d", ps.port), fmt.Sprintf("dns://d.pegaflow.test:%d", ds.port), nil)
	waitMembers(t, h.r.prefill, "127.0.0.2")
	waitMembers(t, h.r.decode, "127.0.0.2")
	done := make(chan error, 1)
	go func() { done <- completeOnce(h.url) }()
	require.Eventually(t, func() bool { return ds.count("127.0.0.2") == 1 }, 5*time.Second, 5*time.Millisecond)
	dns.set("d.pegaflow.test", "127.0.0.3")
	waitMembers(t, h.r.decode, "127.0.0.3")
	require.NoError(t, <-done, "the in-flight stream finished on the backend that left")
	require.NoError(t, completeOnce(h.url))
	require.Equal(t, 1, ds.count("127.0.0.2"))
	require.Equal(t, 1, ds.count("127.0.0.3"))
}

// fakeResolver answers from a map; an absent name fails.
type fakeResolver struct {
	mu    sync.Mutex
	hosts map[string][]string
}

func (f *fakeResolver) LookupHost(_ context.Context, host string) ([]string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if a, ok := f.hosts[host]; ok {
		return a, nil
	}
	return nil, errors.New("no such host")
}

func TestDNSTargetsAndPoolUpdate(t *testing.T) {
	t.Run("targets parse", func(t *testing.T) {
		for _, tc := range []struct{ raw, name, key, base string }{
			{"dns://p.ns.svc.cluster.local:8100", "dns://p.ns.svc.cluster.local:8100", "dns://p.ns.svc.cluster.local:8100", "http://10.0.0.1:8100"},
			{"DNS://P.example:81/", "dns://P.example:81", "dns://p.example:81", "http://10.0.0.1:81"},
			{"dns://u:pw@p:81", "dns://xxxxx@p:81", "dns://p:81", "http://u:pw@10.0.0.1:81"},
		} {
			tg, err := parseDNSTarget(tc.raw)
			require.NoError(t, err, tc.raw)
			require.Equal(t, tc.name, tg.name)
			require.Equal(t, tc.key, tg.key())
			require.Equal(t, []string{tc.base}, tg.bases([]string{"10.0.0.1"}))
		}
		tg, _ := parseDNSTarget("dns://p:81")
		require.Equal(t, []string{"http://10.0.0.1:81", "http://10.0.0.2:81", "http://[fd00::1]:81"},
			tg.bases([]string{"10.0.0.2", "fd00::1", "10.0.0.1", "10.0.0.2"}), "sorted, deduplicated, IPv6 bracketed")
		for _, bad := range []string{"dns://p", "dns://p:0", "dns://:81", "dns://p:81/x", "dns://p:81?q", "dns:p:81", "dns://p q:81"} {
			_, err := parseDNSTarget(bad)
			require.Error(t, err, bad)
		}
	})
	t.Run("config", func(t *testing.T) {
		c := DefaultConfig()
		c.Prefill = []string{"dns://p.ns:8100", "http://p2:8100"}
		c.Decode = []string{"dns://d.ns:8200"}
		require.NoError(t, c.Validate())
		c.Decode = []string{"dns://d.ns:8200", "DNS://D.ns:8200/"}
		require.ErrorContains(t, c.Validate(), "given twice")
		c.Decode = []string{"dns://d.ns"}
		require.ErrorContains(t, c.Validate(), "--decode")
		c.Decode, c.ResolveInterval = []string{"dns://d.ns:8200"}, 0
		require.ErrorContains(t, c.Validate(), "--resolve-interval")
		c = DefaultConfig()
		c.Backends = []string{"dns://a.ns:8000"}
		require.NoError(t, c.Validate())
	})
	t.Run("pool update keeps state per address", func(t *testing.T) {
		p := newPool(roleDecode, []string{"http://static:1", "dns://d:2"}, newSelector(LBRoundRobin, ""))
		require.Len(t, p.targets, 1)
		require.Equal(t, []string{"static"}, members(p))
		joined, left, _ := p.update([]string{"http://static:1", "http://a:2", "http://b:2"})
		require.Len(t, joined, 2)
		require.Empty(t, left)
		a := p.backends()[1]
		a.inflight.Store(2)
		a.ejectedUntil = time.Now().Add(time.Hour)
		joined, left, _ = p.update([]string{"http://static:1", "http://a:2", "http://b:2", "http://b:2"})
		require.Empty(t, joined)
		require.Empty(t, left)
		require.Same(t, a, p.backends()[1])
		_, left, _ = p.update([]string{"http://static:1", "http://b:2"})
		require.Equal(t, []*backend{a}, left)
		require.Equal(t, int64(2), a.inflight.Load(), "its in-flight requests go on")
		joined, _, _ = p.update([]string{"http://static:1", "http://a:2", "http://b:2"})
		require.Len(t, joined, 1)
		require.NotSame(t, a, joined[0])
		require.True(t, joined[0].healthy(time.Now()), "back without the stale ejection")
		require.Zero(t, joined[0].inflight.Load())
	})
	t.Run("pool caps its members", func(t *testing.T) {
		p := newPool(roleDecode, nil, newSelector(LBRoundRobin, ""))
		var bases []string
		for i := 0; i < maxBackends+5; i++ {
			bases = append(bases, fmt.Sprintf("http://10.0.%d.%d:1", i/256, i%256))
		}
		_, _, dropped := p.update(bases)
		require.Equal(t, 5, dropped)
		require.Len(t, p.backends(), maxBackends)
	})
	t.Run("a failed lookup keeps the last good answer", func(t *testing.T) {
		res := &fakeResolver{hosts: map[string][]string{"d": {"10.0.0.2", "10.0.0.1"}}}
		cfg := DefaultConfig()
		cfg.Prefill, cfg.Decode = []string{"http://p:1"}, []string{"dns://d:2"}
		r, err := New(cfg, Deps{Resolver: res}) // not run: resolvePool by hand
		require.NoError(t, err)
		ctx := t.Context()
		require.Empty(t, members(r.decode), "nothing until the first answer")
		r.resolvePool(ctx, r.decode)
		require.Equal(t, []string{"10.0.0.1", "10.0.0.2"}, members(r.decode))
		for _, answer := range [][]string{nil, {}} {
			res.mu.Lock()
			if answer == nil {
				delete(res.hosts, "d")
			} else {
				res.hosts["d"] = answer
			}
			res.mu.Unlock()
			r.resolvePool(ctx, r.decode)
			require.Equal(t, []string{"10.0.0.1", "10.0.0.2"}, members(r.decode))
		}
		require.Equal(t, 2.0, testutil.ToFloat64(r.m.resolveErrors.WithLabelValues("dns://d:2")))
		require.Equal(t, 1, testutil.CollectAndCount(r.m.resolveErrors))
	})
}
