package kvlookup

import (
	"fmt"
	"net"
	"net/url"
	"strings"

	"github.com/pegaflow/pegaflow/engine/peer"
	"github.com/pegaflow/pegaflow/internal/hostport"
)

// ParseEngine parses a BACKEND=ENGINE_HOST:PORT mapping (a flag's value):
// BACKEND is a backend's host or host:port.
func ParseEngine(s string) (backend, engineAddr string, err error) {
	backend, engineAddr, ok := strings.Cut(s, "=")
	if !ok || backend == "" {
		return "", "", fmt.Errorf("%q: want BACKEND_HOST[:PORT]=ENGINE_HOST:PORT", s)
	}
	if err := hostport.Check(engineAddr); err != nil {
		return "", "", fmt.Errorf("%q: engine address: %w", s, err)
	}
	if strings.Contains(backend, ":") && !strings.HasPrefix(backend, "[") {
		if err := hostport.Check(backend); err != nil {
			return "", "", fmt.Errorf("%q: backend: %w", s, err)
		}
	}
	return backend, engineAddr, nil
}

func (c *Config) check() error {
	for b, a := range c.Engines {
		if err := hostport.Check(a); err != nil {
			return fmt.Errorf("kvlookup: engine of backend %q: %q: %w", b, a, err)
		}
	}
	if c.EnginePort != "" {
		if err := hostport.Check(net.JoinHostPort("h", c.EnginePort)); err != nil {
			return fmt.Errorf("kvlookup: engine port %q: %w", c.EnginePort, err)
		}
	}
	return nil
}

// EngineFor is the peer address of the engine serving backend
// (host:port, or a URL whose host:port is taken), or local when that is
// the in-process engine (addr is then "" or its own address).
func (x *Index) EngineFor(backend string) (addr string, local bool, err error) {
	if strings.Contains(backend, "://") {
		u, perr := url.Parse(backend)
		if perr != nil {
			return "", false, fmt.Errorf("%w %q: %w", ErrNoEngine, backend, perr)
		}
		backend = u.Host
	}
	host, _, serr := net.SplitHostPort(backend)
	if serr != nil {
		host = backend
	}
	c := &x.cfg
	if a, ok := c.Engines[backend]; ok {
		return a, c.Local != nil && a == c.LocalAddr, nil
	}
	if a, ok := c.Engines[host]; ok {
		return a, c.Local != nil && a == c.LocalAddr, nil
	}
	if c.Local != nil && peer.IsLoopback(host) {
		return c.LocalAddr, true, nil
	}
	if c.EnginePort == "" || host == "" {
		return "", false, fmt.Errorf("%w %q (no --kv-engine entry, no engine port)", ErrNoEngine, backend)
	}
	addr = net.JoinHostPort(host, c.EnginePort)
	return addr, c.Local != nil && addr == c.LocalAddr, nil
}
