package engine

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/pegaflow/pegaflow/internal/retry"
)

// A Save's ready_url makes the engine POST to an address a socket client
// chose. So that this is not a request forgery from the engine's network
// position, the engine only POSTs to URLs the operator allowed
// (Config.KVReadyAllow, the --kv-ready-allow flag), never follows a
// redirect, and keeps the first URL and token bound to a transfer id
// (transfer.bind): a later Save cannot redirect the report or learn the
// token.

// KVReadyLoopback and KVReadyNone are the keywords of Config.KVReadyAllow
// besides host:port and URL-prefix entries.
const (
	KVReadyLoopback = "loopback" // any port of localhost, 127.0.0.0/8 or ::1
	KVReadyNone     = "none"     // no callbacks: a Save with ready_url fails
)

// callbackRule is one parsed KVReadyAllow entry. A URL matches when its
// scheme (if the rule has one), host and port equal the rule's and its
// path is the rule's path or lies below it (a path-segment boundary:
// /kv_ready admits /kv_ready and /kv_ready/x, never /kv_readyX); a CIDR
// rule (CIDR:port, for routers whose pod IPs change) matches an IP literal
// inside the prefix on that port. Whatever the rule, a URL whose path has
// a dot segment or an encoded slash is refused first (readyPath): a server
// would resolve /kv_ready/../v1/completions elsewhere than its prefix says.
type callbackRule struct {
	loopback     bool
	scheme, host string // host is hostname:port, lower case, port explicit
	path         string // decoded; "" admits every path
	cidr         *net.IPNet
	port         string // of a CIDR rule
}

// CheckKVReadyAllow reports whether every entry is a valid KVReadyAllow
// entry, for flag parsing.
func CheckKVReadyAllow(entries []string) error {
	_, err := parseKVReadyAllow(entries)
	return err
}

// parseKVReadyAllow turns Config.KVReadyAllow (entries may also be
// comma-separated lists) into rules; no entries means loopback only, and
// "none" (alone) allows nothing.
func parseKVReadyAllow(entries []string) ([]callbackRule, error) {
	var split []string
	for _, e := range entries {
		split = append(split, strings.Split(e, ",")...)
	}
	if len(split) == 0 {
		return []callbackRule{{loopback: true}}, nil
	}
	var rules []callbackRule
	for _, raw := range split {
		entry := strings.TrimSpace(raw)
		switch {
		case strings.EqualFold(entry, KVReadyNone):
			if len(split) > 1 {
				return nil, invalid("--kv-ready-allow %q: %q cannot be combined with other entries", raw, KVReadyNone)
			}
			return nil, nil
		case strings.EqualFold(entry, KVReadyLoopback):
			rules = append(rules, callbackRule{loopback: true})
		case strings.Contains(entry, "://"):
			u, err := url.Parse(entry)
			if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.User != nil ||
				u.RawQuery != "" || u.Fragment != "" {
				return nil, invalid("--kv-ready-allow %q: want host:port, an http(s) URL prefix like http://router:8080/kv_ready, %q or %q",
					raw, KVReadyLoopback, KVReadyNone)
			}
			path, ok := readyPath(u)
			if !ok {
				return nil, invalid("--kv-ready-allow %q: a URL prefix takes no dot segments (. ..) or encoded slashes (%%2f %%5c)", raw)
			}
			rules = append(rules, callbackRule{scheme: u.Scheme, host: canonicalHost(u), path: path})
		case strings.Contains(entry, "/"):
			i := strings.LastIndex(entry, ":")
			var cidr *net.IPNet
			var err error
			if i > 0 {
				_, cidr, err = net.ParseCIDR(strings.Trim(entry[:i], "[]"))
			}
			if i <= 0 || err != nil || !validPort(entry[i+1:]) {
				return nil, invalid("--kv-ready-allow %q: a CIDR entry is CIDR:port, e.g. 10.244.0.0/16:8000", raw)
			}
			rules = append(rules, callbackRule{cidr: cidr, port: entry[i+1:]})
		default:
			host, port, err := net.SplitHostPort(entry)
			if err != nil || host == "" || port == "" {
				return nil, invalid("--kv-ready-allow %q: want host:port, an http(s) URL prefix, %q or %q (%v)",
					raw, KVReadyLoopback, KVReadyNone, err)
			}
			rules = append(rules, callbackRule{host: strings.ToLower(net.JoinHostPort(host, port))})
		}
	}
	return rules, nil
}

// canonicalHost is u's host as lower-case hostname:port, the port made
// explicit from the scheme when absent.
func canonicalHost(u *url.URL) string {
	port := u.Port()
	if port == "" {
		port = "80"
		if u.Scheme == "https" {
			port = "443"
		}
	}
	return strings.ToLower(net.JoinHostPort(u.Hostname(), port))
}

// validPort: a decimal port 1..65535.
func validPort(p string) bool {
	n, err := strconv.Atoi(p)
	return err == nil && n >= 1 && n <= 65535 && strconv.Itoa(n) == p
}

func (r callbackRule) allows(u *url.URL) bool {
	if r.cidr != nil {
		// An IP literal only: a name could resolve anywhere later.
		ip := net.ParseIP(u.Hostname())
		_, port, _ := net.SplitHostPort(canonicalHost(u))
		return ip != nil && r.cidr.Contains(ip) && port == r.port
	}
	if r.loopback {
		return loopbackHost(u.Hostname())
	}
	if (r.scheme != "" && r.scheme != u.Scheme) || r.host != canonicalHost(u) {
		return false
	}
	path, ok := readyPath(u)
	switch {
	case !ok:
		return false
	case r.path == "" || r.path == "/":
		return true
	case strings.HasSuffix(r.path, "/"):
		return strings.HasPrefix(path, r.path)
	}
	return path == r.path || strings.HasPrefix(path, r.path+"/")
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

// checkReadyURL validates a Save's ready_url against the allowlist.
func (e *Engine) checkReadyURL(readyURL string) error {
	u, err := url.Parse(readyURL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return invalid("ready_url %q is not an http(s) URL", readyURL)
	}
	if _, ok := readyPath(u); !ok {
		return invalid("ready_url %q: dot segments (. ..) and encoded slashes (%%2f %%5c) are refused (--kv-ready-allow)", readyURL)
	}
	if u.User == nil {
		for _, r := range e.readyAllow {
			if r.allows(u) {
				return nil
			}
		}
	}
	return invalid("ready_url %q is not allowed by the engine's --kv-ready-allow (%s); "+
		"start the engine with --kv-ready-allow naming the router's /kv_ready address",
		readyURL, e.readyAllowText())
}

func (e *Engine) readyAllowText() string {
	if len(e.cfg.KVReadyAllow) == 0 {
		return KVReadyLoopback
	}
	return strings.Join(e.cfg.KVReadyAllow, ",")
}

// newCallbackClient never follows redirects: the allowlist vetted the
// URL, not wherever it points on.
func newCallbackClient(timeout time.Duration) *http.Client {
	return &http.Client{Timeout: timeout, CheckRedirect: func(*http.Request, []*http.Request) error {
		return http.ErrUseLastResponse
	}}
}

// readyReport is the body POSTed to a transfer's ready_url (the router's
// /kv_ready contract).
type readyReport struct {
	TransferID string `json:"transfer_id"`
	Token      string `json:"token"`
	Status     string `json:"status"`
	Message    string `json:"message,omitempty"`
	// SourceEngine is this engine's peer address (Config.PeerAddress),
	// for the router to pass to D as pegaflow_source_engine.
	SourceEngine string `json:"source_engine,omitempty"`
}

// callbackRetry spaces the attempts of a ready_url POST: 50ms, 200ms,
// 800ms between four attempts.
var callbackRetry = retry.Policy{Attempts: 4, Backoff: 50 * time.Millisecond, Factor: 4}

// notify POSTs the outcome to ready_url with bounded retries. Close stops
// the retries (not a POST in flight, which CallbackTimeout bounds).
func (e *Engine) notify(readyURL, id, token, status, message string) {
	defer e.bg.Done()
	body, _ := json.Marshal(readyReport{TransferID: id, Token: token, Status: status, Message: message,
		SourceEngine: e.cfg.PeerAddress})
	_ = retry.Do(e.stopped, callbackRetry, nil, func(ctx context.Context, attempt int) error {
		err := e.postReady(context.WithoutCancel(ctx), readyURL, body)
		if err != nil && !retry.IsPermanent(err) {
			e.log.Warn("kv_ready callback failed", "transfer", id, "url", readyURL, "attempt", attempt, "err", err)
		}
		return err
	})
}

// postReady makes one POST; a 3xx (not followed) or 4xx answer is a
// permanent error.
func (e *Engine) postReady(ctx context.Context, readyURL string, body []byte) error {
	ctx, cancel := context.WithTimeout(ctx, e.cfg.CallbackTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, readyURL, bytes.NewReader(body))
	if err != nil {
		return retry.Permanent(err)
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := e.http.Do(req)
	if err != nil {
		return err
	}
	resp.Body.Close()
	switch {
	case resp.StatusCode < 300:
		return nil
	case resp.StatusCode < 400:
		e.log.Warn("kv_ready callback redirected; redirects are not followed", "url", readyURL,
			"status", resp.StatusCode, "location", resp.Header.Get("Location"))
		return retry.Permanent(fmt.Errorf("status %d (redirect not followed)", resp.StatusCode))
	case resp.StatusCode < 500:
		// The router rejected it (unknown or wrong token): retrying won't help.
		e.log.Warn("kv_ready callback rejected", "url", readyURL, "status", resp.StatusCode)
		return retry.Permanent(fmt.Errorf("status %d", resp.StatusCode))
	}
	return fmt.Errorf("status %d", resp.StatusCode)
}
