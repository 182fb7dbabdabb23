package upstream

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func target(t *testing.T, raw string) *Target {
	t.Helper()
	u, err := url.Parse(raw)
	require.NoError(t, err)
	tg, err := NewTarget(u)
	require.NoError(t, err)
	return tg
}

func header(t *testing.T, kv ...string) []byte {
	t.Helper()
	var h []byte
	var err error
	for i := 0; i < len(kv); i += 2 {
		h, err = AppendHeader(h, kv[i], kv[i+1])
		require.NoError(t, err)
	}
	return h
}

// countingServer is a net/http server that counts the connections it
// accepted.
func countingServer(t *testing.T, h http.HandlerFunc) (*httptest.Server, *atomic.Int64) {
	var conns atomic.Int64
	s := httptest.NewUnstartedServer(h)
	s.Config.ConnState = func(_ net.Conn, st http.ConnState) {
		if st == http.StateNew {
			conns.Add(1)
		}
	}
	s.Start()
	t.Cleanup(s.Close)
	return s, &conns
}

func readAll(t *testing.T, resp *Response) string {
	t.Helper()
	data, err := io.ReadAll(resp)
	require.NoError(t, err)
	require.NoError(t, resp.Close())
	return string(data)
}

func TestPostRoundTripAndReuse(t *testing.T) {
	s, conns := countingServer(t, func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write([]byte(r.URL.Path + "|" + r.Header.Get("X-Request-Id") + "|" + string(body)))
	})
	c := New(Config{})
	defer c.CloseIdle()
	tg := target(t, s.URL+"/v1/completions")
	for i := range 5 {
		resp, err := c.Post(context.Background(), &Request{Target: tg, Header: header(t, "X-Request-Id", "r1"), Body: []byte(`{"n":1}`)})
		require.NoError(t, err, i)
		require.Equal(t, http.StatusOK, resp.StatusCode)
		require.Equal(t, "application/json", resp.ContentType)
		require.EqualValues(t, len(`/v1/completions|r1|{"n":1}`), resp.ContentLength)
		require.Equal(t, `/v1/completions|r1|{"n":1}`, readAll(t, resp))
	}
	require.EqualValues(t, 1, conns.Load(), "one kept-alive connection for sequential requests")
}

// A chunked stream is handed on event by event: Read returns what has
// arrived without waiting for the next chunk.
func TestChunkedStreamIsNotHeldBack(t *testing.T) {
	next := make(chan struct{})
	s, conns := countingServer(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		for i := range 3 {
			_, _ = io.WriteString(w, "data: "+strings.Repeat("x", i+1)+"\n\n")
			w.(http.Flusher).Flush()
			<-next
		}
		_, _ = io.WriteString(w, "data: [DONE]\n\n")
	})
	c := New(Config{})
	defer c.CloseIdle()
	tg := target(t, s.URL+"/v1/completions")
	for range 2 {
		resp, err := c.Post(context.Background(), &Request{Target: tg, Body: []byte("{}")})
		require.NoError(t, err)
		require.EqualValues(t, -1, resp.ContentLength)
		buf := make([]byte, 32<<10)
		for i := range 3 {
			n, err := resp.Read(buf)
			require.NoError(t, err)
			require.Equal(t, "data: "+strings.Repeat("x", i+1)+"\n\n", string(buf[:n]))
			next <- struct{}{}
		}
		require.Equal(t, "data: [DONE]\n\n", readAll(t, resp))
	}
	require.EqualValues(t, 1, conns.Load())
}

// scriptedServer answers the requests it receives, on whichever
// connection, with the scripts in turn: it reads one request head and
// body, then writes the answer. hangup closes the connection after it.
type script struct {
	answer string
	hangup bool
	hang   bool // never answer (until the test ends)
	// tail is written tailAfter after answer.
	tail      string
	tailAfter time.Duration
}

func scriptedServer(t *testing.T, scripts ...script) (string, *atomic.Int64) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	var accepted, served atomic.Int64
	done := make(chan struct{})
	var wg sync.WaitGroup
	t.Cleanup(func() { close(done); ln.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			nc, err := ln.Accept()
			if err != nil {
				return
			}
			accepted.Add(1)
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer nc.Close()
				go func() { <-done; nc.Close() }()
				br := bufio.NewReader(nc)
				for {
					req, err := http.ReadRequest(br)
					if err != nil {
						return
					}
					_, _ = io.Copy(io.Discard, req.Body)
					k := int(served.Add(1)) - 1
					if k >= len(scripts) {
						return
					}
					sc := scripts[k]
					if sc.hang {
						<-done
						return
					}
					_, _ = io.WriteString(nc, sc.answer)
					if sc.tail != "" {
						time.Sleep(sc.tailAfter)
						_, _ = io.WriteString(nc, sc.tail)
					}
					if sc.hangup {
						return
					}
				}
			}()
		}
	}()
	return "http://" + ln.Addr().String(), &accepted
}

func TestAnswerFraming(t *testing.T) {
	for _, tc := range []struct {
		name, answer string
		status       int
		body, ctype  string
		err          string // from Post, or else from reading the body
		reusable     bool
	}{
		{name: "length", answer: "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello",
			status: 200, body: "hello", ctype: "text/plain", reusable: true},
		{name: "chunked with extension and trailer", answer: "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" +
			"3;x=y\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: 1\r\n\r\n", status: 200, body: "abcde", reusable: true},
		{name: "bare LF lines", answer: "HTTP/1.1 200 OK\nContent-Length: 2\n\nok", status: 200, body: "ok", reusable: true},
		{name: "to close", answer: "HTTP/1.1 200 OK\r\n\r\nuntil the end", status: 200, body: "until the end"},
		{name: "HTTP/1.0", answer: "HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", status: 200, body: "ok"},
		{name: "Connection close", answer: "HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\nContent-Length: 2\r\n\r\nok", status: 200, body: "ok"},
		{name: "1xx skipped", answer: "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: x\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n",
			status: 201, reusable: true},
		{name: "204 has no body", answer: "HTTP/1.1 204 No Content\r\n\r\n", status: 204, reusable: true},
		{name: "error status kept", answer: "HTTP/1.1 503 Busy\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
			status: 503, body: "{}", ctype: "application/json", reusable: true},
		{name: "long unneeded field skipped", answer: "HTTP/1.1 200 OK\r\nX-Big: " + strings.Repeat("b", 10000) + "\r\nContent-Length: 1\r\n\r\n!",
			status: 200, body: "!", reusable: true},
		{name: "chunked beats length, not reused", answer: "HTTP/1.1 200 OK\r\nContent-Length: 99\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nz\r\n0\r\n\r\n",
			status: 200, body: "z"},

		{name: "switching protocols", answer: "HTTP/1.1 101 Switching Protocols\r\n\r\n", err: "switched protocols"},
		{name: "bad status line", answer: "HTTP/2 200\r\n\r\n", err: "malformed answer status line"},
		{name: "not HTTP", answer: "SSH-2.0-OpenSSH\r\n\r\n", err: "malformed answer status line"},
		{name: "conflicting lengths", answer: "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", err: "conflicting Content-Length"},
		{name: "negative length", answer: "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", err: "bad Content-Length"},
		{name: "gzip framing", answer: "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", err: "unsupported Transfer-Encoding"},
		{name: "folded line", answer: "HTTP/1.1 200 OK\r\nX-A: 1\r\n  2\r\n\r\n", err: "obsolete line folding"},
		{name: "header too large", answer: "HTTP/1.1 200 OK\r\n" + strings.Repeat("X-Pad: "+strings.Repeat("p", 1000)+"\r\n", 70) + "\r\n", err: "answer header too large"},
		{name: "long Content-Type", answer: "HTTP/1.1 200 OK\r\nContent-Type: " + strings.Repeat("t", 5000) + "\r\n\r\n", err: `"Content-Type" too long`},
		{name: "bad chunk size", answer: "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", status: 200, err: "bad chunk size"},
		{name: "huge chunk size", answer: "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffff\r\n", status: 200, err: "bad chunk size"},
		{name: "chunk without line end", answer: "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nzX", status: 200, err: "no line end"},
		{name: "truncated body", answer: "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", status: 200, err: "unexpected EOF"},
		{name: "truncated head", answer: "HTTP/1.1 200 OK\r\nContent-Le", err: "unexpected EOF"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			base, accepted := scriptedServer(t, script{answer: tc.answer, hangup: true},
				script{answer: "HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext"})
			c := New(Config{})
			defer c.CloseIdle()
			tg := target(t, base+"/x")
			resp, err := c.Post(context.Background(), &Request{Target: tg, Body: []byte("{}")})
			if err != nil {
				require.NotEmpty(t, tc.err, "unexpected error %v", err)
				require.ErrorContains(t, err, tc.err)
				return
			}
			require.Equal(t, tc.status, resp.StatusCode)
			require.Equal(t, tc.ctype, resp.ContentType)
			data, err := io.ReadAll(resp)
			resp.Close()
			if tc.err != "" {
				require.ErrorContains(t, err, tc.err)
				return
			}
			require.NoError(t, err)
			require.Equal(t, tc.body, string(data))
			c.mu.Lock()
			idle := len(c.idle[tg.key])
			c.mu.Unlock()
			if tc.reusable {
				require.Equal(t, 1, idle, "kept for the next request")
			} else {
				require.Zero(t, idle, "not kept")
			}
			// The server hung up after the first answer either way: a
			// kept connection is found closed when taken, and the next
			// request goes on a new one.
			resp, err = c.Post(context.Background(), &Request{Target: tg, Body: []byte("{}")})
			require.NoError(t, err)
			require.Equal(t, "next", readAll(t, resp))
			require.EqualValues(t, 2, accepted.Load())
		})
	}
}

// A kept connection the backend closed without answering (its idle
// timeout racing the request) is replaced once; a new connection that
// does the same is the backend's failure.
func TestClosedWithoutAnswer(t *testing.T) {
	ok := "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
	t.Run("reused connection: retried on a new one", func(t *testing.T) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		require.NoError(t, err)
		defer ln.Close()
		var accepted atomic.Int64
		go func() {
			for {
				nc, err := ln.Accept()
				if err != nil {
					return
				}
				n := accepted.Add(1)
				go func() {
					defer nc.Close()
					br := bufio.NewReader(nc)
					req, err := http.ReadRequest(br)
					if err != nil {
						return
					}
					_, _ = io.Copy(io.Discard, req.Body)
					_, _ = io.WriteString(nc, ok)
					if n == 1 { // read the second request, then hang up unanswered
						if req, err = http.ReadRequest(br); err == nil {
							_, _ = io.Copy(io.Discard, req.Body)
						}
						return
					}
				}()
			}
		}()
		c := New(Config{})
		defer c.CloseIdle()
		tg := target(t, "http://"+ln.Addr().String()+"/x")
		for range 2 {
			resp, err := c.Post(context.Background(), &Request{Target: tg, Body: []byte("{}")})
			require.NoError(t, err)
			require.Equal(t, "ok", readAll(t, resp))
		}
		require.EqualValues(t, 2, accepted.Load())
	})
	t.Run("new connection: an error", func(t *testing.T) {
		base, accepted := scriptedServer(t, script{answer: "", hangup: true})
		c := New(Config{})
		_, err := c.Post(context.Background(), &Request{Target: target(t, base+"/x"), Body: []byte("{}")})
		require.ErrorIs(t, err, errNoAnswer)
		require.EqualValues(t, 1, accepted.Load(), "not retried")
	})
}

func TestContextEndsTheRequest(t *testing.T) {
	cause := errors.New("the router's own limit")
	t.Run("before the answer", func(t *testing.T) {
		base, _ := scriptedServer(t, script{hang: true})
		c := New(Config{})
		ctx, cancel := context.WithCancelCause(context.Background())
		time.AfterFunc(50*time.Millisecond, func() { cancel(cause) })
		_, err := c.Post(ctx, &Request{Target: target(t, base+"/x"), Body: []byte("{}")})
		require.ErrorIs(t, err, cause)
	})
	t.Run("mid-stream", func(t *testing.T) {
		release := make(chan struct{})
		defer close(release)
		s, conns := countingServer(t, func(w http.ResponseWriter, r *http.Request) {
			_, _ = io.WriteString(w, "data: 1\n\n")
			w.(http.Flusher).Flush()
			select {
			case <-release:
			case <-r.Context().Done():
			}
		})
		c := New(Config{})
		defer c.CloseIdle()
		tg := target(t, s.URL+"/x")
		ctx, cancel := context.WithCancelCause(context.Background())
		resp, err := c.Post(ctx, &Request{Target: tg, Body: []byte("{}")})
		require.NoError(t, err)
		buf := make([]byte, 1024)
		n, err := resp.Read(buf)
		require.NoError(t, err)
		require.Equal(t, "data: 1\n\n", string(buf[:n]))
		time.AfterFunc(50*time.Millisecond, func() { cancel(cause) })
		_, err = resp.Read(buf)
		require.ErrorIs(t, err, cause)
		resp.Close()
		c.mu.Lock()
		require.Empty(t, c.idle[tg.key], "an aborted connection is not kept")
		c.mu.Unlock()
		resp, err = c.Post(context.Background(), &Request{Target: tg, Body: []byte("{}")})
		require.NoError(t, err)
		resp.Close()
		require.EqualValues(t, 2, conns.Load())
	})
}

// Close keeps the connection when the rest of the body has arrived (a
// stream's end after data: [DONE]) or arrives soon after, and never waits
// for it itself.
func TestCloseDrainsTheEnd(t *testing.T) {
	chunked := "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
	base, accepted := scriptedServer(t,
		script{answer: chunked + "6\r\nevent1\r\n6\r\nevent2\r\n0\r\n\r\n"},
		script{answer: chunked + "6\r\nevent3\r\n", tail: "6\r\nevent4\r\n0\r\n\r\n", tailAfter: 30 * time.Millisecond},
		script{answer: chunked + "6\r\nevent5\r\n", tail: "0\r\n\r\n", tailAfter: 3 * lateDrain}, // too late
		script{answer: "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"})
	c := New(Config{})
	defer c.CloseIdle()
	tg := target(t, base+"/x")
	for i, want := range []string{"event1", "event3", "event5"} {
		resp, err := c.Post(context.Background(), &Request{Target: tg, Body: []byte("{}")})
		require.NoError(t, err)
		buf := make([]byte, 6)
		_, err = io.ReadFull(resp, buf)
		require.NoError(t, err)
		require.Equal(t, want, string(buf))
		closed := make(chan struct{})
		go func() { resp.Close(); close(closed) }()
		select {
		case <-closed:
		case <-time.After(lateDrain / 2):
			t.Fatal("Close waited")
		}
		require.EqualValues(t, 1, accepted.Load(), "request %d on the kept connection", i)
		require.Eventually(t, func() bool {
			c.mu.Lock()
			defer c.mu.Unlock()
			return len(c.idle[tg.key]) == 1 || want == "event5"
		}, 2*lateDrain, time.Millisecond, "the connection is back once the end arrived")
	}
	time.Sleep(2 * lateDrain)
	resp, err := c.Post(context.Background(), &Request{Target: tg, Body: []byte("{}")})
	require.NoError(t, err)
	require.Equal(t, "ok", readAll(t, resp))
	require.EqualValues(t, 2, accepted.Load(), "the stream whose end came too late lost its connection")
}

func TestRefusedIsECONNREFUSED(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := ln.Addr().String()
	ln.Close()
	_, err = New(Config{}).Post(context.Background(), &Request{Target: target(t, "http://"+addr+"/x")})
	require.ErrorIs(t, err, syscall.ECONNREFUSED)
}

func TestIdleBounds(t *testing.T) {
	s, _ := countingServer(t, func(w http.ResponseWriter, r *http.Request) {})
	c := New(Config{MaxIdlePerHost: 2, IdleTimeout: time.Hour})
	defer c.CloseIdle()
	tg := target(t, s.URL+"/x")
	var resps []*Response
	for range 4 {
		resp, err := c.Post(context.Background(), &Request{Target: tg})
		require.NoError(t, err)
		resps = append(resps, resp)
	}
	for _, r := range resps {
		_, _ = io.ReadAll(r)
		r.Close()
	}
	c.mu.Lock()
	require.Len(t, c.idle[tg.key], 2, "at most MaxIdlePerHost kept")
	c.mu.Unlock()

	c = New(Config{IdleTimeout: time.Nanosecond})
	resp, err := c.Post(context.Background(), &Request{Target: tg})
	require.NoError(t, err)
	readAll(t, resp)
	time.Sleep(time.Millisecond)
	resp, err = c.Post(context.Background(), &Request{Target: tg})
	require.NoError(t, err)
	require.False(t, resp.cn.reused, "a connection idle past IdleTimeout is not reused")
	readAll(t, resp)
}

func TestTLS(t *testing.T) {
	s := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, "secure")
	}))
	defer s.Close()
	pool := x509.NewCertPool()
	pool.AddCert(s.Certificate())
	c := New(Config{TLS: &tls.Config{RootCAs: pool}})
	defer c.CloseIdle()
	for range 2 {
		resp, err := c.Post(context.Background(), &Request{Target: target(t, s.URL+"/x")})
		require.NoError(t, err)
		require.Equal(t, "secure", readAll(t, resp))
	}
	_, err := New(Config{}).Post(context.Background(), &Request{Target: target(t, s.URL+"/x")})
	require.ErrorContains(t, err, "tls handshake")
}

func TestRequestValidation(t *testing.T) {
	for _, bad := range [][2]string{{"X-A", "v\r\nInjected: 1"}, {"X-A", "v\nx"}, {"Bad Name", "v"}, {"", "v"}} {
		_, err := AppendHeader(nil, bad[0], bad[1])
		require.Error(t, err, "%q", bad)
	}
	for _, bad := range []string{"ftp://h/x", "http:///x", "unix:/x"} {
		u, err := url.Parse(bad)
		require.NoError(t, err)
		_, err = NewTarget(u)
		require.Error(t, err, bad)
	}
	tg := target(t, "https://u:p@h.example/base/v1?q=1")
	require.Equal(t, "h.example:443", tg.addr)
	require.Equal(t, "POST /base/v1?q=1 HTTP/1.1\r\nHost: h.example\r\n", tg.head)
}
