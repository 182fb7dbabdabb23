package engine

import (
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

// PeerAllowLoopback is Config.PeerAllow's keyword for any port of
// localhost, 127.0.0.0/8 or ::1 (tests, one-host trials).
const PeerAllowLoopback = "loopback"

// peerRule is one parsed PeerAllow entry: loopback, a subnet (any port)
// or one lower-case host:port.
type peerRule struct {
	loopback bool
	subnet   *net.IPNet
	addr     string
}

// CheckPeerAllow reports whether every entry is a valid PeerAllow entry,
// for flag parsing.
func CheckPeerAllow(entries []string) error {
	_, err := parsePeerAllow(entries)
	return err
}

// parsePeerAllow turns Config.PeerAllow (entries may be comma-separated
// lists) into rules; no entries allow no peer.
func parsePeerAllow(entries []string) ([]peerRule, error) {
	var rules []peerRule
	for _, e := range entries {
		for _, raw := range strings.Split(e, ",") {
			entry := strings.TrimSpace(raw)
			if strings.EqualFold(entry, PeerAllowLoopback) {
				rules = append(rules, peerRule{loopback: true})
				continue
			}
			if _, subnet, err := net.ParseCIDR(entry); err == nil {
				rules = append(rules, peerRule{subnet: subnet})
				continue
			}
			host, port, err := net.SplitHostPort(entry)
			if err != nil || host == "" || port == "" {
				return nil, invalid("--peer-allow %q: want a peer's host:port, a subnet like 10.1.0.0/24, or %q", raw, PeerAllowLoopback)
			}
			rules = append(rules, peerRule{addr: strings.ToLower(net.JoinHostPort(host, port))})
		}
	}
	return rules, nil
}

func (r peerRule) allows(addr, host string) bool {
	switch {
	case r.loopback:
		return loopbackHost(host)
	case r.subnet != nil:
		ip := net.ParseIP(host)
		return ip != nil && r.subnet.Contains(ip)
	}
	return r.addr == addr
}

// checkSourceEngine refuses a source_engine (a valid host:port) that
// PeerAllow does not list, before anything dials it.
func (e *Engine) checkSourceEngine(addr string) error {
	host, _, _ := net.SplitHostPort(addr)
	canon := strings.ToLower(addr)
	for _, r := range e.peerAllow {
		if r.allows(canon, host) {
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
