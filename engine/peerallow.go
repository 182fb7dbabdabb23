package engine

import (
	"fmt"
	"net"
	"strings"
)

// A Query's source_engine makes the engine dial that address and present
// the deployment's peer token there: whoever listens at it learns the key
// to every engine's pools. So the engine only dials peers the operator
// listed (Config.PeerAllow, the --peer-allow flag), and the default lists
// none: loopback is not safe either, since any local user may listen on a
// loopback port. Hostnames are compared as written, never resolved (a
// resolution at check time proves nothing about the one at dial time).

// PeerAllowLoopback is Config.PeerAllow's keyword for localhost,
// 127.0.0.0/8 and ::1, written with a port like every entry
// ("loopback:7400"): any local user may listen on another loopback port.
const PeerAllowLoopback = "loopback"

// peerRule is one parsed PeerAllow entry, always with its port: a peer's
// lower-case host:port, loopback:port or subnet:port.
type peerRule struct {
	loopback bool
	subnet   *net.IPNet
	addr     string // host:port rule
	port     string // of a loopback or subnet rule
}

// CheckPeerAllow reports whether every entry is a valid PeerAllow entry,
// for flag parsing.
func CheckPeerAllow(entries []string) error {
	_, err := parsePeerAllow(entries)
	return err
}

// parsePeerAllow turns Config.PeerAllow (entries may be comma-separated
// lists) into rules; no entries allow no peer. An entry without a port is
// refused: a subnet or loopback admitting every port would let any process
// that binds a port there collect the token.
func parsePeerAllow(entries []string) ([]peerRule, error) {
	var rules []peerRule
	for _, e := range entries {
		for _, raw := range strings.Split(e, ",") {
			r, err := parsePeerRule(strings.TrimSpace(raw))
			if err != nil {
				return nil, invalid("--peer-allow %q: %v", raw, err)
			}
			rules = append(rules, r)
		}
	}
	return rules, nil
}

func parsePeerRule(entry string) (peerRule, error) {
	_, _, cidrErr := net.ParseCIDR(entry)
	if strings.EqualFold(entry, PeerAllowLoopback) || cidrErr == nil {
		return peerRule{}, fmt.Errorf("needs a port, e.g. %s:7400 (a bare subnet or loopback would admit any port)", entry)
	}
	host, port, err := net.SplitHostPort(entry)
	if err != nil || host == "" || !validPort(port) {
		return peerRule{}, fmt.Errorf("want a peer's host:port, a subnet with a port like 10.1.0.0/24:7400, or %s:PORT", PeerAllowLoopback)
	}
	if strings.EqualFold(host, PeerAllowLoopback) {
		return peerRule{loopback: true, port: port}, nil
	}
	if _, subnet, err := net.ParseCIDR(host); err == nil {
		return peerRule{subnet: subnet, port: port}, nil
	}
	if strings.Contains(host, "/") {
		return peerRule{}, fmt.Errorf("%q is not a subnet (want e.g. 10.1.0.0/24:7400)", host)
	}
	return peerRule{addr: strings.ToLower(net.JoinHostPort(host, port))}, nil
}

// allows: addr is canonical (lower case), host and port its parts.
func (r peerRule) allows(addr, host, port string) bool {
	switch {
	case r.loopback:
		return port == r.port && loopbackHost(host)
	case r.subnet != nil:
		ip := net.ParseIP(host)
		return port == r.port && ip != nil && r.subnet.Contains(ip)
	}
	return r.addr == addr
}

// checkSourceEngine refuses a source_engine (a valid host:port) that
// PeerAllow does not list, before anything dials it.
func (e *Engine) checkSourceEngine(addr string) error {
	host, port, _ := net.SplitHostPort(addr)
	canon := strings.ToLower(addr)
	for _, r := range e.peerAllow {
		if r.allows(canon, host, port) {
			return nil
		}
	}
	allowed := strings.Join(e.cfg.PeerAllow, ",")
	if allowed == "" {
		allowed = "none"
	}
	return invalid("source_engine %q is not allowed by the engine's --peer-allow (%s): "+
		"this engine sends its peer token only to listed peers; start it with --peer-allow naming the peer engines' --peer-addr",
		addr, allowed)
}
