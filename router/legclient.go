package router

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/url"
	"sync/atomic"
	"time"

	"github.com/pegaflow/pegaflow/router/upstream"
)

// UpstreamClient names the legs' HTTP client (--upstream-client).
type UpstreamClient string

// The legs' HTTP clients.
const (
	// UpstreamPegaFlow is router/upstream: a few allocations per leg.
	UpstreamPegaFlow UpstreamClient = "pegaflow"
	// UpstreamNetHTTP is Go's net/http: the operator's fallback, and the
	// reference the router's tests and FuzzUpstreamResponse compare with.
	UpstreamNetHTTP UpstreamClient = "nethttp"
)

// upstreamIdleTimeout is how long either client keeps an idle backend
// connection: below uvicorn's (vLLM's) 5 s keep-alive, so the router ends
// idle connections and a request seldom meets the backend's close.
const upstreamIdleTimeout = 4 * time.Second

// legClient is what a leg needs from an HTTP client. Both kinds send a
// request at most once unless the backend provably never had it, and
// return an error matching upstream.ErrUnanswered when the backend
// closed the connection after the request was written and before a byte
// of answer (it may have run it): the leg's retry policy decides.
type legClient interface {
	// post sends body to path on b with the extra header lines hdr
	// ("Name: value\r\n" each, valid: upstream.AppendHeader built them).
	// The answer's body must be closed. Errors carry no URL.
	post(ctx context.Context, b *backend, path string, hdr, body []byte) (legAnswer, error)
	// closeIdleTo closes the idle connections to b (it left its pool).
	closeIdleTo(b *backend)
	// closeIdle closes every idle connection.
	closeIdle()
}

// legAnswer is a backend's answer: what the legs read of its head, and
// its body.
type legAnswer struct {
	status int
	ctype  string // Content-Type, "" none
	length int64  // Content-Length, -1 not declared
	body   io.ReadCloser
}

func newLegClient(cfg Config) legClient {
	if cfg.UpstreamClient == UpstreamNetHTTP {
		return newNetHTTPLegs(cfg)
	}
	return upstreamLegs{upstream.New(upstream.Config{DialTimeout: cfg.ConnectTimeout, IdleTimeout: upstreamIdleTimeout})}
}

// upstreamLegs is legClient on router/upstream (keep-alive 30 s, 1024
// idle per backend).
type upstreamLegs struct{ c *upstream.Client }

func (u upstreamLegs) post(ctx context.Context, b *backend, path string, hdr, body []byte) (legAnswer, error) {
	resp, err := u.c.Post(ctx, &upstream.Request{Target: b.endpoint(path), Header: hdr, Body: body})
	if err != nil {
		return legAnswer{}, err
	}
	return legAnswer{status: resp.StatusCode, ctype: resp.ContentType, length: resp.ContentLength, body: resp}, nil
}

func (u upstreamLegs) closeIdleTo(b *backend) {
	for _, t := range b.endpoints {
		u.c.CloseIdleTo(t)
	}
}

func (u upstreamLegs) closeIdle() { u.c.CloseIdle() }

// netHTTPLegs is legClient on net/http, set up as router/upstream is: no
// proxy, redirect, compression or HTTP/2; the same idle limits. net/http
// replays a POST only when nothing of it was written; which error a
// backend's close after the request is, httptrace tells.
type netHTTPLegs struct {
	tr *http.Transport
	c  *http.Client
}

func newNetHTTPLegs(cfg Config) *netHTTPLegs {
	tr := &http.Transport{
		DialContext:         (&net.Dialer{Timeout: cfg.ConnectTimeout, KeepAlive: 30 * time.Second}).DialContext,
		MaxIdleConnsPerHost: 1024,
		IdleConnTimeout:     upstreamIdleTimeout,
		DisableCompression:  true,
	}
	return &netHTTPLegs{tr: tr, c: &http.Client{Transport: tr,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}}
}

func (n *netHTTPLegs) post(ctx context.Context, b *backend, path string, hdr, body []byte) (legAnswer, error) {
	var wrote, answered atomic.Bool
	ctx = httptrace.WithClientTrace(ctx, &httptrace.ClientTrace{
		WroteRequest:         func(info httptrace.WroteRequestInfo) { wrote.Store(info.Err == nil) },
		GotFirstResponseByte: func() { answered.Store(true) },
	})
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, b.base+path, bytes.NewReader(body))
	if err != nil {
		return legAnswer{}, errors.New("bad backend URL")
	}
	for line := range bytes.Lines(hdr) {
		name, value, _ := bytes.Cut(bytes.TrimRight(line, "\r\n"), []byte(": "))
		req.Header.Add(string(name), string(value))
	}
	resp, err := n.c.Do(req)
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err // the URL may hold credentials; the leg names the backend
		}
		if wrote.Load() && !answered.Load() && ctx.Err() == nil && !isTimeout(err) {
			err = fmt.Errorf("%w: %w", upstream.ErrUnanswered, err)
		}
		return legAnswer{}, err
	}
	return legAnswer{status: resp.StatusCode, ctype: resp.Header.Get("Content-Type"), length: resp.ContentLength, body: resp.Body}, nil
}

// closeIdleTo closes every idle connection: net/http has no per-host
// close, and a backend leaving is rare enough for the others to re-dial.
func (n *netHTTPLegs) closeIdleTo(*backend) { n.tr.CloseIdleConnections() }

func (n *netHTTPLegs) closeIdle() { n.tr.CloseIdleConnections() }
