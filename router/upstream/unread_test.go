package upstream

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// heldConn collects what is written to it while held, so that several
// TLS records leave in one TCP write (and arrive in one read).
type heldConn struct {
	net.Conn
	held []byte
	hold bool
}

func (h *heldConn) Write(p []byte) (int, error) {
	if h.hold {
		h.held = append(h.held, p...)
		return len(p), nil
	}
	return h.Conn.Write(p)
}

// take ends the hold and returns what was held.
func (h *heldConn) take() []byte {
	b := h.held
	h.held, h.hold = nil, false
	return b
}

const extraAnswer = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nextra"

// extraTLSBackend is an https backend that answers request k (counted
// over all connections) with "answer k"; after the first answer it sends
// extraAnswer unasked, as mode says:
//   - "own record": in a TLS record of its own, in the same TCP write;
//   - "same record": in the answer's record, the answer padded to 4 KiB
//     (the client's bufio.Reader takes it exactly, tls.Conn keeps the
//     rest decrypted);
//   - "split record": in its own record, cut short: the record's end
//     comes only with the next answer on that connection.
func extraTLSBackend(t *testing.T, mode string) (string, *x509.CertPool) {
	t.Helper()
	s := httptest.NewUnstartedServer(http.NotFoundHandler())
	s.StartTLS()
	cfg := s.TLS.Clone()
	cfg.DynamicRecordSizingDisabled = true // records as large as the writes
	pool := x509.NewCertPool()
	pool.AddCert(s.Certificate())
	s.Close()
	var served atomic.Int64
	addr, _ := serveConns(t, func(nc net.Conn, _ <-chan struct{}) {
		_ = nc.SetDeadline(time.Now().Add(10 * time.Second))
		hc := &heldConn{Conn: nc}
		tc := tls.Server(hc, cfg)
		br := bufio.NewReader(tc)
		var pending []byte
		for {
			req, err := http.ReadRequest(br)
			if err != nil {
				return
			}
			_, _ = io.Copy(io.Discard, req.Body)
			k := served.Add(1)
			body := fmt.Sprintf("answer %d", k)
			head := "HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n"
			if k == 1 && mode == "same record" {
				n := 4096 - len(fmt.Sprintf(head, 4096))
				body += strings.Repeat(" ", n-len(body))
			}
			answer := fmt.Sprintf(head, len(body)) + body
			hc.hold = true
			switch {
			case k != 1:
				_, _ = tc.Write([]byte(answer))
				_, _ = nc.Write(append(pending, hc.take()...))
				continue
			case mode == "same record":
				_, _ = tc.Write([]byte(answer + extraAnswer))
			default:
				_, _ = tc.Write([]byte(answer))
				_, _ = tc.Write([]byte(extraAnswer))
			}
			out := hc.take()
			if mode == "split record" {
				out, pending = out[:len(out)-10], out[len(out)-10:]
			}
			_, _ = nc.Write(out)
		}
	})
	return "https://" + addr, pool
}

// Bytes an https backend sent after its answer, held inside tls.Conn
// (decrypted, as a whole record or as part of one), never pass for the
// next request's answer: that connection is not reused.
func TestTLSUnreadBytesAreNotTheNextAnswer(t *testing.T) {
	for _, mode := range []string{"own record", "same record", "split record"} {
		t.Run(mode, func(t *testing.T) {
			base, pool := extraTLSBackend(t, mode)
			c := New(Config{TLS: &tls.Config{RootCAs: pool}})
			defer c.CloseIdle()
			tg := target(t, base+"/x")
			resp, err := c.Post(context.Background(), &Request{Target: tg, Body: []byte("{}")})
			require.NoError(t, err)
			require.Equal(t, "answer 1", strings.TrimRight(readAll(t, resp), " "))
			resp, err = c.Post(context.Background(), &Request{Target: tg, Body: []byte("{}")})
			require.NoError(t, err)
			require.Equal(t, "answer 2", readAll(t, resp), "the second request gets its own answer")
		})
	}
}

// A clean https answer keeps its connection (the check costs no reuse).
func TestTLSCleanAnswerIsReused(t *testing.T) {
	s, conns := startCounting(t, func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, "secure")
	}, true)
	pool := x509.NewCertPool()
	pool.AddCert(s.Certificate())
	c := New(Config{TLS: &tls.Config{RootCAs: pool}})
	defer c.CloseIdle()
	for range 3 {
		resp, err := c.Post(context.Background(), &Request{Target: target(t, s.URL+"/x"), Body: []byte("{}")})
		require.NoError(t, err)
		require.Equal(t, "secure", readAll(t, resp))
	}
	require.EqualValues(t, 1, conns.Load())
}

// closingServer counts the connections it accepted and those that closed.
func closingServer(t *testing.T) (tg *Target, opened, closed *atomic.Int64) {
	t.Helper()
	opened, closed = new(atomic.Int64), new(atomic.Int64)
	s := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	s.Config.ConnState = func(_ net.Conn, st http.ConnState) {
		switch st {
		case http.StateNew:
			opened.Add(1)
		case http.StateClosed:
			closed.Add(1)
		}
	}
	s.Start()
	t.Cleanup(s.Close)
	return target(t, s.URL+"/x"), opened, closed
}

// openIdle leaves n idle connections to tg in c.
func openIdle(t *testing.T, c *Client, tg *Target, n int) {
	t.Helper()
	var resps []*Response
	for range n {
		resp, err := c.Post(context.Background(), &Request{Target: tg})
		require.NoError(t, err)
		resps = append(resps, resp)
	}
	for _, r := range resps {
		readAll(t, r)
	}
}

// Idle connections are closed once idle past IdleTimeout by the reaper,
// with no later request to notice them; those of a target that left are
// closed at once (CloseIdleTo), the others' kept.
func TestIdleConnectionsAreClosed(t *testing.T) {
	t.Run("reaped on a timer", func(t *testing.T) {
		tg, opened, closed := closingServer(t)
		c := New(Config{IdleTimeout: 20 * time.Millisecond})
		openIdle(t, c, tg, 3)
		require.EqualValues(t, 3, opened.Load())
		require.Eventually(t, func() bool { return closed.Load() == 3 }, 10*time.Second, time.Millisecond)
		c.mu.Lock()
		require.Empty(t, c.idle)
		require.False(t, c.armed, "nothing idle: the reaper rests")
		c.mu.Unlock()
		openIdle(t, c, tg, 1) // and it wakes for the next
		require.Eventually(t, func() bool { return closed.Load() == 4 }, 10*time.Second, time.Millisecond)
	})
	t.Run("a target that left", func(t *testing.T) {
		gone, _, goneClosed := closingServer(t)
		kept, _, keptClosed := closingServer(t)
		c := New(Config{IdleTimeout: time.Hour})
		defer c.CloseIdle()
		openIdle(t, c, gone, 3)
		openIdle(t, c, kept, 2)
		c.CloseIdleTo(gone)
		require.Eventually(t, func() bool { return goneClosed.Load() == 3 }, 10*time.Second, time.Millisecond)
		c.mu.Lock()
		require.NotContains(t, c.idle, gone.key)
		require.Len(t, c.idle[kept.key], 2)
		c.mu.Unlock()
		require.Zero(t, keptClosed.Load())
	})
}
