// Package hostport is the one check of a host:port that PegaFlow takes
// from a client or the network and may dial: a KV source engine (the
// router's /kv_ready report and a Query's source_engine), a peer
// engine's advertised address, a dns:// backend pool. The router and the
// engine share it so that an address one of them accepts the other does
// too.
package hostport

import (
	"errors"
	"fmt"
	"net"
	"strconv"
)

// MaxLen bounds a host:port (a DNS name is at most 253 bytes, a port 5
// digits).
const MaxLen = 261

// Check accepts host:port with a DNS name or IP literal (IPv6 in
// brackets) for host and a port in 1..65535: what a dialer needs, and
// nothing a URL or a log line could be confused by.
func Check(s string) error {
	if len(s) > MaxLen {
		return fmt.Errorf("longer than %d bytes", MaxLen)
	}
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return errors.New("want host:port")
	}
	if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 || port[0] == '+' {
		return fmt.Errorf("port %q: want 1..65535", port)
	}
	if host == "" {
		return errors.New("want host:port, the host is empty")
	}
	if net.ParseIP(host) != nil {
		return nil
	}
	for i := 0; i < len(host); i++ {
		c := host[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '.' || c == '_') {
			return fmt.Errorf("host %q: want a DNS name or an IP address", host)
		}
	}
	return nil
}

// CanonicalPort reports whether p is a port as Go's URL parser and
// dialers print it: decimal 1..65535, no sign, no leading zero. An
// allowlist compares ports as strings, so its entries take this form.
func CanonicalPort(p string) bool {
	n, err := strconv.Atoi(p)
	return err == nil && n >= 1 && n <= 65535 && strconv.Itoa(n) == p
}
