package router

import (
	"errors"
	"net/url"
	"strings"

	"github.com/pegaflow/pegaflow/internal/hostport"
	"github.com/pegaflow/pegaflow/router/upstream"
)

// The URL and address helpers: what a backend URL may be, how a URL is
// shown (never with its credentials), and what host:port the router
// accepts from the network.

// normalizeBackendURL checks a backend base URL and drops a trailing slash.
func normalizeBackendURL(raw string) (string, error) {
	u, err := url.Parse(raw)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return "", errors.New("want an http(s) base URL like http://host:8100, or dns://name:port")
	}
	if u.RawQuery != "" || u.Fragment != "" {
		return "", errors.New("a base URL takes no query or fragment")
	}
	if _, err := upstream.NewTarget(u); err != nil {
		return "", err
	}
	return strings.TrimRight(raw, "/"), nil
}

// redactURL is raw as it may be shown (metric labels, logs, error
// messages, /health): any userinfo (user:password@, or a token as the
// user) is replaced by "xxxxx". A URL that does not parse as one with a
// host loses everything between its scheme and its last '@'.
func redactURL(raw string) string {
	const mask = "xxxxx"
	u, err := url.Parse(raw)
	switch {
	case err == nil && u.User != nil:
		u.User = url.User(mask)
		return u.String()
	case err == nil && u.Opaque == "":
		return raw
	}
	at := strings.LastIndexByte(raw, '@')
	if at < 0 {
		return raw
	}
	start := 0
	if i := strings.Index(raw, "://"); i >= 0 && i < at {
		start = i + 3
	}
	return raw[:start] + mask + raw[at:]
}

// redactURLError redacts the request URL that http.Client's errors carry
// (net/http masks the password, not the user name). The error stays a
// *url.Error, so Timeout and Unwrap still answer.
func redactURLError(err error) error {
	ue, ok := err.(*url.Error) // as http.Client returns it, unwrapped
	if !ok {
		return err
	}
	return &url.Error{Op: ue.Op, URL: redactURL(ue.URL), Err: ue.Err}
}

// checkHostPort is the host:port check the router and the engine share
// (internal/hostport): a DNS name or IP literal (IPv6 in brackets) and a
// port in 1..65535, nothing a URL or a log line could be confused by.
func checkHostPort(s string) error { return hostport.Check(s) }
