package engine

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
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

// CheckKVReadyAllow reports whether every entry is a valid KVReadyAllow
// entry, for flag parsing.
func CheckKVReadyAllow(entries []string) error {
	_, err := parseKVReadyAllow(entries)
	return err
}

// parseKVReadyAllow turns Config.KVReadyAllow into an allowlist
// (allowlist.go): its address entries, KVReadyLoopback for any port of
// loopback, and http(s) URL prefixes, which also need the URL's scheme and
// a path at or below theirs on a segment boundary (/kv_ready admits
// /kv_ready and /kv_ready/x, never /kv_readyX). No entries means
// loopback only, and KVReadyNone (alone) allows nothing. Whatever the
// rule, a URL whose path has a dot segment or an encoded slash is refused
// (readyPath): a server would resolve /kv_ready/../v1/completions
// elsewhere than its prefix says.
func parseKVReadyAllow(entries []string) (*allowlist, error) {
	split := splitEntries(entries)
	l := &allowlist{flag: "--kv-ready-allow", text: strings.Join(entries, ",")}
	if len(split) == 0 {
		l.text, l.rules = KVReadyLoopback, []allowRule{{loopback: true}}
		return l, nil
	}
	for _, raw := range split {
		entry := strings.TrimSpace(raw)
		switch {
		case strings.EqualFold(entry, KVReadyNone):
			if len(split) > 1 {
				return nil, invalid("--kv-ready-allow %q: %q cannot be combined with other entries", raw, KVReadyNone)
			}
			return l, nil
		case strings.EqualFold(entry, KVReadyLoopback):
			l.rules = append(l.rules, allowRule{loopback: true})
		case strings.Contains(entry, "://"):
			r, err := parseURLPrefix(entry)
			if err != nil {
				return nil, invalid("--kv-ready-allow %q: %v", raw, err)
			}
			l.rules = append(l.rules, r)
		default:
			r, err := parseAddrRule(entry, "8000")
			if err != nil {
				return nil, invalid("--kv-ready-allow %q: %v (or an http(s) URL prefix like http://router:8080/kv_ready, %q or %q)",
					raw, err, KVReadyLoopback, KVReadyNone)
			}
			l.rules = append(l.rules, r)
		}
	}
	return l, nil
}

// parseURLPrefix parses a --kv-ready-allow URL prefix entry.
func parseURLPrefix(entry string) (allowRule, error) {
	u, err := url.Parse(entry)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.User != nil ||
		u.RawQuery != "" || u.Fragment != "" {
		return allowRule{}, fmt.Errorf("want host:port, an http(s) URL prefix like http://router:8080/kv_ready, %q or %q",
			KVReadyLoopback, KVReadyNone)
	}
	path, ok := readyPath(u)
	if !ok {
		return allowRule{}, errors.New("a URL prefix takes no dot segments (. ..) or encoded slashes (%2f %5c)")
	}
	return allowRule{scheme: u.Scheme, addr: strings.ToLower(net.JoinHostPort(u.Hostname(), urlPort(u))), path: path}, nil
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
