package engine

import "strings"

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

// CheckPeerAllow reports whether every entry is a valid PeerAllow entry,
// for flag parsing.
func CheckPeerAllow(entries []string) error {
	_, err := parsePeerAllow(entries)
	return err
}

// parsePeerAllow turns Config.PeerAllow into an allowlist of address
// entries (allowlist.go), every one with its port; no entries allow no
// peer.
func parsePeerAllow(entries []string) (*allowlist, error) {
	l := &allowlist{flag: "--peer-allow", text: strings.Join(entries, ",")}
	if l.text == "" {
		l.text = "none"
	}
	for _, raw := range splitEntries(entries) {
		r, err := parseAddrRule(strings.TrimSpace(raw), "7400")
		if err != nil {
			return nil, invalid("--peer-allow %q: %v", raw, err)
		}
		l.rules = append(l.rules, r)
	}
	return l, nil
}
