// Package upstream is the router's HTTP/1.1 client for its backends: it
// POSTs a body it holds whole and hands back the answer as a stream, one
// request at a time per connection, connections kept per backend and
// reused.
//
// It exists beside net/http because a proxy leg is the router's hot path
// and http.Transport costs ~40 heap objects per round trip (a background
// read and write goroutine per connection, channels, header maps, contexts
// per request); a leg here costs about three. It does only what a leg
// needs: no HTTP/2, proxies, redirects, compression, cookies or
// 100-continue, and of the answer's header only what the router reads
// (status, Content-Type, Content-Length, framing, Connection). The router's
// health checks and GET /v1/models stay on net/http.
//
// A request is sent once. It is sent again, on a new connection, only
// when the backend provably never had it: a kept connection found closed
// before the write (an idle check), or one whose write failed before a
// byte was accepted. A backend that closes or resets the connection after
// the request was written and before answering may have run it: Post
// returns an error matching ErrUnanswered and leaves a retry to the
// caller, who can count it and, for a prefill, give it a new transfer.
//
// No byte a backend sent unasked is ever read as another request's
// answer: a connection with anything unread after an answer (in its
// bufio.Reader, inside tls.Conn, on the socket) is closed, not reused.
// Idle connections are closed after IdleTimeout by a timer, and at once
// for a backend that left (CloseIdleTo).
//
// Concurrency: a Client is safe for concurrent use; a Response is owned by
// one goroutine. Every read and write of a request is bounded by its
// context: when the context ends, the connection is unblocked at once and
// the error is the context's cause.
//
// Files: client.go (Client, Target, the pool), conn.go (one connection:
// writing, the idle and unread-byte checks), head.go (status line and
// header), response.go (the body).
package upstream

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/net/http/httpguts"
)

// Config sets a Client's limits. Zero values take the defaults noted.
type Config struct {
	// DialTimeout bounds a new connection's connect and TLS handshake
	// (default 5 s; the request's context bounds it too).
	DialTimeout time.Duration
	// KeepAlive is the TCP keep-alive period (default 30 s).
	KeepAlive time.Duration
	// IdleTimeout is how long an idle connection is kept (default 4 s:
	// below the 5 s keep-alive of uvicorn, which vLLM serves with, so the
	// router, not the backend, ends an idle connection and a request
	// seldom meets a close in flight).
	IdleTimeout time.Duration
	// MaxIdlePerHost bounds the idle connections kept per backend
	// address (default 1024).
	MaxIdlePerHost int
	// MaxHeaderBytes bounds an answer's status line and header, and a
	// chunked body's trailer (default 64 KiB).
	MaxHeaderBytes int
	// TLS is the client configuration for https targets (nil: defaults).
	TLS *tls.Config
}

func (c Config) withDefaults() Config {
	if c.DialTimeout <= 0 {
		c.DialTimeout = 5 * time.Second
	}
	if c.KeepAlive == 0 {
		c.KeepAlive = 30 * time.Second
	}
	if c.IdleTimeout <= 0 {
		c.IdleTimeout = 4 * time.Second
	}
	if c.MaxIdlePerHost <= 0 {
		c.MaxIdlePerHost = 1024
	}
	if c.MaxHeaderBytes <= 0 {
		c.MaxHeaderBytes = 64 << 10
	}
	return c
}

// Target is one backend endpoint, parsed once.
type Target struct {
	key        string // pool key: scheme and address
	addr       string // host:port to dial
	tls        bool
	serverName string
	// head is the request line and Host header, written as they are.
	head string
}

// NewTarget parses an http or https URL (its userinfo is the caller's to
// turn into a header; its fragment is dropped).
func NewTarget(u *url.URL) (*Target, error) {
	if u.Scheme != "http" && u.Scheme != "https" {
		return nil, fmt.Errorf("upstream: scheme %q: want http or https", u.Scheme)
	}
	host := u.Hostname()
	if host == "" {
		return nil, errors.New("upstream: URL has no host")
	}
	port := u.Port()
	switch {
	case port != "":
	case u.Scheme == "https":
		port = "443"
	default:
		port = "80"
	}
	target := u.RequestURI()
	if strings.ContainsAny(target, " \r\n") || strings.ContainsAny(u.Host, " \r\n") {
		return nil, errors.New("upstream: URL has a space or line break")
	}
	addr := net.JoinHostPort(host, port)
	return &Target{
		key: u.Scheme + "://" + addr, addr: addr, tls: u.Scheme == "https", serverName: host,
		head: "POST " + target + " HTTP/1.1\r\nHost: " + u.Host + "\r\n",
	}, nil
}

// Client sends requests to targets over kept-alive connections.
type Client struct {
	cfg    Config
	dialer net.Dialer

	mu   sync.Mutex
	idle map[string][]*conn // per Target.key, most recently used last
	// reaper closes connections idle past IdleTimeout; armed while any
	// connection is idle.
	reaper *time.Timer
	armed  bool
}

// New returns a Client with cfg's limits.
func New(cfg Config) *Client {
	cfg = cfg.withDefaults()
	c := &Client{
		cfg:    cfg,
		dialer: net.Dialer{Timeout: cfg.DialTimeout, KeepAlive: cfg.KeepAlive},
		idle:   map[string][]*conn{},
	}
	c.reaper = time.AfterFunc(time.Hour, c.reap)
	c.reaper.Stop()
	return c
}

// ErrUnanswered matches Post's error when the request was written whole
// and the backend then closed or reset the connection without a byte of
// answer: it may have run the request. Post does not send it again.
var ErrUnanswered = errors.New("backend closed the connection after the request was sent, before answering (it may have run it)")

// Request is one POST. Post writes it whole before it returns: the caller
// may reuse Header and Body as soon as Post returned.
type Request struct {
	Target *Target
	// Header holds extra header lines, each "Name: value\r\n" (AppendHeader
	// builds them); Host and Content-Length are written by Post.
	Header []byte
	Body   []byte
}

// Post sends req and reads the answer's status and header. A 1xx answer
// is skipped. The returned Response must be closed; reading its body to
// the end returns the connection to the pool.
//
// A connection taken from the pool that the backend had closed is found
// so before the write and replaced; one whose write fails before the
// backend accepted a byte is replaced by a new one once: a backend's idle
// timeout is not the backend's failure. A request written whole that
// gets no answer is not sent again (ErrUnanswered). Dial errors come back
// as net.Dial returns them (errors.Is(err, syscall.ECONNREFUSED) works).
func (c *Client) Post(ctx context.Context, req *Request) (*Response, error) {
	if err := ctx.Err(); err != nil {
		return nil, context.Cause(ctx)
	}
	fresh := false
	for {
		cn, err := c.get(ctx, req.Target, fresh)
		if err != nil {
			return nil, err
		}
		resp, err := cn.roundTrip(ctx, req)
		if err == nil {
			return resp, nil
		}
		cn.close()
		if ctx.Err() != nil {
			return nil, context.Cause(ctx)
		}
		var werr *writeError
		switch {
		case cn.gotBytes:
		case errors.As(err, &werr):
			// Not one byte accepted: the backend cannot have read it.
			if cn.written == 0 && cn.reused && !fresh && connGone(err) {
				fresh = true
				continue
			}
		case connGone(err):
			return nil, fmt.Errorf("%w: %w", ErrUnanswered, err)
		}
		return nil, err
	}
}

// connGone: err is how a write or read fails on a connection the peer
// closed.
func connGone(err error) bool {
	return errors.Is(err, errNoAnswer) || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) ||
		errors.Is(err, net.ErrClosed)
}

// CloseIdle closes every idle connection and stops the idle timer.
// Connections in use are not touched: when their requests end they go
// back to the pool as usual (re-arming the timer) and are closed after
// IdleTimeout, or by the next CloseIdle. Later requests dial anew.
func (c *Client) CloseIdle() {
	c.mu.Lock()
	idle := c.idle
	c.idle = map[string][]*conn{}
	c.reaper.Stop()
	c.armed = false
	c.mu.Unlock()
	for _, list := range idle {
		closeAll(list)
	}
}

// CloseIdleTo closes the idle connections to t's address (a backend that
// left); those in use are kept until their requests end, then reaped.
func (c *Client) CloseIdleTo(t *Target) {
	c.mu.Lock()
	list := c.idle[t.key]
	delete(c.idle, t.key)
	c.mu.Unlock()
	closeAll(list)
}

func closeAll(list []*conn) {
	for _, cn := range list {
		cn.close()
	}
}

// reap closes the connections idle past IdleTimeout and re-arms the
// reaper for the oldest one left.
func (c *Client) reap() {
	var drop []*conn
	now := time.Now()
	c.mu.Lock()
	var oldest time.Time
	for key, list := range c.idle {
		n := 0
		for n < len(list) && now.Sub(list[n].idleSince) >= c.cfg.IdleTimeout {
			n++
		}
		drop = append(drop, list[:n]...)
		if n == len(list) {
			delete(c.idle, key)
			continue
		}
		if n > 0 {
			rest := append(list[:0], list[n:]...)
			clear(list[len(rest):])
			c.idle[key] = rest
		}
		if first := c.idle[key][0].idleSince; oldest.IsZero() || first.Before(oldest) {
			oldest = first
		}
	}
	c.armed = !oldest.IsZero()
	if c.armed {
		c.reaper.Reset(max(oldest.Add(c.cfg.IdleTimeout).Sub(now), time.Millisecond))
	}
	c.mu.Unlock()
	closeAll(drop)
}

// get returns an idle connection to t that is still open, or dials one.
func (c *Client) get(ctx context.Context, t *Target, fresh bool) (*conn, error) {
	if !fresh {
		for {
			cn := c.takeIdle(t.key)
			if cn == nil {
				break
			}
			if time.Since(cn.idleSince) < c.cfg.IdleTimeout && cn.alive() {
				cn.reused = true
				return cn, nil
			}
			cn.close()
		}
	}
	return c.dial(ctx, t)
}

func (c *Client) takeIdle(key string) *conn {
	c.mu.Lock()
	defer c.mu.Unlock()
	list := c.idle[key]
	if len(list) == 0 {
		return nil
	}
	cn := list[len(list)-1]
	list[len(list)-1] = nil
	if list = list[:len(list)-1]; len(list) == 0 {
		delete(c.idle, key) // targets come and go (dns://): no empty entries left behind
	} else {
		c.idle[key] = list
	}
	return cn
}

// put returns cn to the pool, closing it when the pool is full, and
// closes connections idle past IdleTimeout (the oldest are first).
func (c *Client) put(cn *conn) {
	cn.idleSince = time.Now()
	var drop []*conn
	c.mu.Lock()
	list := c.idle[cn.key]
	n := 0
	for n < len(list) && cn.idleSince.Sub(list[n].idleSince) >= c.cfg.IdleTimeout {
		n++
	}
	if n > 0 {
		drop = append(drop, list[:n]...)
		list = append(list[:0], list[n:]...)
	}
	if len(list) < c.cfg.MaxIdlePerHost {
		c.idle[cn.key] = append(list, cn)
	} else {
		c.idle[cn.key] = list
		drop = append(drop, cn)
	}
	if !c.armed {
		c.armed = true
		c.reaper.Reset(c.cfg.IdleTimeout)
	}
	c.mu.Unlock()
	closeAll(drop)
}

func (c *Client) dial(ctx context.Context, t *Target) (*conn, error) {
	nc, err := c.dialer.DialContext(ctx, "tcp", t.addr)
	if err != nil {
		return nil, err
	}
	raw, _ := nc.(syscall.Conn)
	var records *tlsRecords
	if t.tls {
		cfg := c.cfg.TLS.Clone()
		if cfg == nil {
			cfg = &tls.Config{}
		}
		if cfg.ServerName == "" {
			cfg.ServerName = t.serverName
		}
		cfg.NextProtos = []string{"http/1.1"}
		records = &tlsRecords{Conn: nc}
		tc := tls.Client(records, cfg)
		hctx, cancel := context.WithTimeout(ctx, c.cfg.DialTimeout)
		err := tc.HandshakeContext(hctx)
		cancel()
		if err != nil {
			nc.Close()
			return nil, fmt.Errorf("tls handshake with %s: %w", t.addr, err)
		}
		nc = tc
	}
	return newConn(c, t.key, nc, raw, records), nil
}

// AppendHeader appends the header line "name: value\r\n" to dst, refusing
// a name or value that could end the line or the header early.
func AppendHeader(dst []byte, name, value string) ([]byte, error) {
	if !httpguts.ValidHeaderFieldName(name) || !httpguts.ValidHeaderFieldValue(value) {
		return dst, fmt.Errorf("upstream: invalid header field %q", name)
	}
	dst = append(dst, name...)
	dst = append(dst, ": "...)
	dst = append(dst, value...)
	return append(dst, "\r\n"...), nil
}
