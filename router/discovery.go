package router

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"slices"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Resolver looks up the addresses of a backend name: *net.Resolver is
// one (net.DefaultResolver unless Deps.Resolver says otherwise).
type Resolver interface {
	LookupHost(ctx context.Context, host string) ([]string, error)
}

// dnsScheme marks a backend entry that names a DNS name to re-resolve
// (--prefill dns://pegaflow-prefill.ns.svc.cluster.local:8100): each
// address it resolves to is a backend http://addr:port. A Kubernetes
// headless Service answers with its ready pods' IPs.
const dnsScheme = "dns://"

// dnsTarget is one dns:// entry of a pool. last is written by the
// discovery loop alone.
type dnsTarget struct {
	name       string // dns://host:port as shown (userinfo redacted): logs, the metric label
	host, port string
	userinfo   string   // "user:pass@" carried to every base, or ""
	last       []string // bases of the last good answer, sorted
	errors     prometheus.Counter
}

func isDNSTarget(raw string) bool {
	return len(raw) >= len(dnsScheme) && strings.EqualFold(raw[:len(dnsScheme)], dnsScheme)
}

// parseDNSTarget checks dns://[user:pass@]host:port (no path beyond "/",
// no query or fragment).
func parseDNSTarget(raw string) (*dnsTarget, error) {
	u, err := url.Parse(raw)
	if err != nil || u.Opaque != "" || (u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.Fragment != "" {
		return nil, errors.New("want dns://name:port, e.g. dns://pegaflow-prefill.ns.svc.cluster.local:8100")
	}
	if err := checkHostPort(u.Host); err != nil || u.Port() == "" {
		return nil, fmt.Errorf("want dns://name:port: %v", err)
	}
	t := &dnsTarget{host: u.Hostname(), port: u.Port()}
	if u.User != nil {
		t.userinfo = u.User.String() + "@"
	}
	t.name = redactURL(dnsScheme + t.userinfo + net.JoinHostPort(t.host, t.port))
	return t, nil
}

// key is the target as compared for duplicates.
func (t *dnsTarget) key() string {
	return dnsScheme + strings.ToLower(net.JoinHostPort(t.host, t.port))
}

// bases are the backend base URLs of a lookup's addresses, sorted (a
// stable order keeps round-robin fair across re-resolutions).
func (t *dnsTarget) bases(addrs []string) []string {
	out := make([]string, 0, len(addrs))
	for _, a := range addrs {
		out = append(out, "http://"+t.userinfo+net.JoinHostPort(a, t.port))
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// discover re-resolves every dns:// target of the router's pools each
// --resolve-interval until ctx ends, the first time at once. It returns
// at once when no pool has a target.
func (r *Router) discover(ctx context.Context) {
	var pools []*pool
	for _, p := range r.pools() {
		if len(p.targets) > 0 {
			pools = append(pools, p)
		}
	}
	if len(pools) == 0 {
		return
	}
	t := time.NewTicker(r.cfg.ResolveInterval)
	defer t.Stop()
	for {
		for _, p := range pools {
			r.resolvePool(ctx, p)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// resolveTimeout bounds one lookup: the resolve interval, within [1s, 10s].
func (r *Router) resolveTimeout() time.Duration {
	return min(max(r.cfg.ResolveInterval, time.Second), 10*time.Second)
}

// resolvePool looks up p's targets and makes the answers, with p's static
// backends, its members. A failed lookup (an error, no such host, no
// address) keeps that target's last good answer: a DNS outage must not
// empty a pool, and a backend that really went away fails its health
// polls and requests meanwhile.
func (r *Router) resolvePool(ctx context.Context, p *pool) {
	bases := slices.Clone(p.static)
	for _, t := range p.targets {
		lctx, cancel := context.WithTimeout(ctx, r.resolveTimeout())
		addrs, err := r.resolver.LookupHost(lctx, t.host)
		cancel()
		switch {
		case ctx.Err() != nil:
			return // shutting down: no verdict
		case err == nil && len(addrs) == 0:
			err = errors.New("no addresses")
		}
		if err != nil {
			t.errors.Inc()
			r.log.Warn("backend name did not resolve: keeping the last good addresses", "role", p.role, "target", t.name,
				"addresses", len(t.last), "err", err)
		} else {
			t.last = t.bases(addrs)
		}
		bases = append(bases, t.last...)
	}
	joined, left, dropped := p.update(bases)
	for _, b := range joined {
		r.log.Info("backend joined", "role", p.role, "backend", b.name)
	}
	if len(left) > 0 {
		// The health polls' and /v1/models' idle connections too: net/http
		// closes per transport, not per host, and the others re-dial.
		r.client.CloseIdleConnections()
	}
	for _, b := range left {
		// Its idle connections would otherwise wait out the idle timeout;
		// those in flight go back to the pool and are reaped.
		r.legs.closeIdleTo(b)
		r.log.Info("backend left: no new requests, in-flight ones finish", "role", p.role, "backend", b.name)
	}
	if dropped > 0 {
		r.log.Warn("more addresses than a pool holds: some left out", "role", p.role, "max", maxBackends, "left_out", dropped)
	}
}
