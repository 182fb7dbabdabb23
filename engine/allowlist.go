package engine

import (
	"fmt"
	"net"
	"net/url"
	"strings"

	"github.com/pegaflow/pegaflow/internal/hostport"
)

// An allowlist says where the engine may go on a client's word: a Save's
// ready_url (--kv-ready-allow, callback.go) and a Query's source_engine
// (--peer-allow, peerallow.go). Both flags name addresses alike, parsed
// by parseAddrRule: host:port, loopback:PORT, or a subnet with a port
// (10.0.0.0/24:7400, [fd00::/64]:7400). A subnet or loopback rule
// without a port would admit whatever process binds another port there,
// so every rule has one, except --kv-ready-allow's bare "loopback" (its
// historical default: a callback carries no secret of the engine's).
// Hostnames are compared as written, never resolved: a resolution at
// check time proves nothing about the one at dial time.

// allowlist is a parsed --kv-ready-allow or --peer-allow; no rules
// admits nothing.
type allowlist struct {
	flag  string // the flag it came from, named in refusals
	text  string // its entries as the operator gave them, named in refusals
	rules []allowRule
}

// allowRule admits one form of address.
type allowRule struct {
	loopback bool       // localhost, 127.0.0.0/8 or ::1
	subnet   *net.IPNet // an IP literal inside it (a name never matches)
	port     string     // of a loopback or subnet rule; "" any port
	addr     string     // an exact host:port, lower case
	// A URL-prefix rule (--kv-ready-allow only) also needs the URL's
	// scheme when set, and its path to be path or lie below it on a
	// path-segment boundary ("" admits every path).
	scheme, path string
}

// splitEntries splits flag values that may be comma-separated lists.
func splitEntries(entries []string) []string {
	var split []string
	for _, e := range entries {
		split = append(split, strings.Split(e, ",")...)
	}
	return split
}

// parseAddrRule parses a host:port, loopback:PORT or SUBNET:PORT entry;
// example is a port for the messages.
func parseAddrRule(entry, example string) (allowRule, error) {
	if _, _, err := net.ParseCIDR(entry); err == nil || strings.EqualFold(entry, allowLoopback) {
		return allowRule{}, fmt.Errorf("needs a port, e.g. %s:%s (a bare subnet or loopback would admit any port)", entry, example)
	}
	if strings.Contains(entry, "/") {
		i := strings.LastIndex(entry, ":")
		var subnet *net.IPNet
		err := fmt.Errorf("no port")
		if i > 0 {
			_, subnet, err = net.ParseCIDR(strings.Trim(entry[:i], "[]"))
		}
		if err != nil || !hostport.CanonicalPort(entry[i+1:]) {
			return allowRule{}, fmt.Errorf("a subnet entry is SUBNET:PORT, e.g. 10.1.0.0/24:%s", example)
		}
		return allowRule{subnet: subnet, port: entry[i+1:]}, nil
	}
	host, port, err := net.SplitHostPort(entry)
	if err != nil || host == "" || !hostport.CanonicalPort(port) {
		return allowRule{}, fmt.Errorf("want host:port, a subnet with a port like 10.1.0.0/24:%s, or %s:%s", example, allowLoopback, example)
	}
	if strings.EqualFold(host, allowLoopback) {
		return allowRule{loopback: true, port: port}, nil
	}
	if err := hostport.Check(entry); err != nil {
		return allowRule{}, err
	}
	return allowRule{addr: strings.ToLower(net.JoinHostPort(host, port))}, nil
}

// allowLoopback is the keyword both flags share (KVReadyLoopback,
// PeerAllowLoopback).
const allowLoopback = "loopback"

// admits reports whether the rule admits host:port, leaving a
// URL-prefix rule's scheme and path to admitsURL.
func (r allowRule) admits(host, port string) bool {
	switch {
	case r.loopback:
		return (r.port == "" || port == r.port) && loopbackHost(host)
	case r.subnet != nil:
		ip := net.ParseIP(host)
		return port == r.port && ip != nil && r.subnet.Contains(ip)
	}
	return r.addr == strings.ToLower(net.JoinHostPort(host, port))
}

// admitsAddr reports whether a rule admits host:port.
func (l *allowlist) admitsAddr(host, port string) bool {
	for _, r := range l.rules {
		if r.scheme == "" && r.admits(host, port) {
			return true
		}
	}
	return false
}

// admitsURL reports whether a rule admits u, an http(s) URL: its host
// and port (made explicit from the scheme), and for a URL-prefix rule its
// scheme and path. A URL with userinfo, or whose path a server could read
// otherwise than as written (readyPath), is never admitted.
func (l *allowlist) admitsURL(u *url.URL) bool {
	path, ok := readyPath(u)
	if !ok || u.User != nil {
		return false
	}
	host, port := u.Hostname(), urlPort(u)
	for _, r := range l.rules {
		if (r.scheme == "" || r.scheme == u.Scheme) && r.admits(host, port) && r.admitsPath(path) {
			return true
		}
	}
	return false
}

func (r allowRule) admitsPath(path string) bool {
	switch {
	case r.path == "" || r.path == "/":
		return true
	case strings.HasSuffix(r.path, "/"):
		return strings.HasPrefix(path, r.path)
	}
	return path == r.path || strings.HasPrefix(path, r.path+"/")
}

// urlPort is u's port, made explicit from the scheme when absent.
func urlPort(u *url.URL) string {
	if p := u.Port(); p != "" {
		return p
	}
	if u.Scheme == "https" {
		return "443"
	}
	return "80"
}

// readyPath is u's decoded path, or false when a server could read it
// otherwise than as written: a dot segment (also %2e-encoded), an encoded
// slash or backslash (%2f, %5c), or a backslash.
func readyPath(u *url.URL) (string, bool) {
	for _, seg := range strings.Split(u.EscapedPath(), "/") {
		lower := strings.ToLower(seg)
		if strings.Contains(lower, "%2f") || strings.Contains(lower, "%5c") || strings.Contains(seg, "\\") {
			return "", false
		}
		if dec, err := url.PathUnescape(seg); err != nil || dec == "." || dec == ".." {
			return "", false
		}
	}
	return u.Path, true
}

// loopbackHost reports whether a host (name or address) is this host's
// loopback: localhost, 127.0.0.0/8 or ::1.
func loopbackHost(host string) bool {
	ip := net.ParseIP(host)
	return strings.EqualFold(host, "localhost") || (ip != nil && ip.IsLoopback())
}
