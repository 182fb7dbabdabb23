package upstream

import (
	"bufio"
	"context"
	"errors"
	"net"
	"os"
	"strconv"
	"syscall"
	"time"
)

// errNoAnswer: the backend closed the connection before a byte of an
// answer.
var errNoAnswer = errors.New("connection closed before a byte of answer")

// conn is one connection to a backend, used by one request at a time:
// the goroutine that holds it (between get and put or close) is the only
// one that reads or writes it; abort, run by a request's context, only
// sets its deadline.
type conn struct {
	client *Client
	key    string
	nc     net.Conn
	raw    syscall.RawConn // the TCP socket, for the idle check; nil if none
	br     *bufio.Reader
	bw     *bufio.Writer // writes through cn.Write, which counts
	// records tracks the TLS record framing of what the socket gave
	// tls.Conn (nil for plain http).
	records *tlsRecords

	idleSince time.Time
	reused    bool  // this request got it from the pool
	gotBytes  bool  // this request's answer has begun
	written   int64 // bytes of this request the socket (or tls.Conn) accepted

	abortFn func()                // cn.abort, bound once (no allocation per request)
	peekFn  func(fd uintptr) bool // cn.peek, bound once
	peekOK  bool
	peekBuf [1]byte
	num     [20]byte
	scratch [512]byte // drain target
}

func newConn(c *Client, key string, nc net.Conn, sc syscall.Conn, records *tlsRecords) *conn {
	cn := &conn{client: c, key: key, nc: nc, records: records, br: bufio.NewReaderSize(nc, 4<<10)}
	cn.bw = bufio.NewWriterSize(cn, 4<<10)
	if sc != nil {
		cn.raw, _ = sc.SyscallConn()
	}
	cn.abortFn, cn.peekFn = cn.abort, cn.peek
	return cn
}

// abort fails pending and later I/O on cn at once (a deadline long past).
func (cn *conn) abort() { _ = cn.nc.SetDeadline(time.Unix(1, 0)) }

func (cn *conn) close() { _ = cn.nc.Close() }

// Write is the bufio.Writer's way out: it counts what the connection
// accepted, so Post knows whether the backend can have seen the request.
func (cn *conn) Write(p []byte) (int, error) {
	n, err := cn.nc.Write(p)
	cn.written += int64(n)
	return n, err
}

// drained reports whether cn holds no unread byte after an answer's end:
// none in its bufio.Reader and, for TLS, none inside tls.Conn, neither
// decrypted nor as (part of) a record read off the socket. Such bytes
// came unasked after the answer; on a reused connection they would pass
// for the next request's answer. The socket itself is checked when the
// connection is taken again (alive). tls.Conn shows what it holds only
// to a read: one that cannot wait (a deadline long past) returns its
// buffered data, or fails at once without poisoning the connection
// (tls.Conn keeps no timeout as its error); a record cut off by the
// socket's read boundary is what records sees.
func (cn *conn) drained() bool {
	if cn.br.Buffered() > 0 {
		return false
	}
	if cn.records == nil {
		return true
	}
	if cn.nc.SetReadDeadline(time.Unix(1, 0)) != nil {
		return false
	}
	n, err := cn.nc.Read(cn.peekBuf[:])
	if n > 0 || !errors.Is(err, os.ErrDeadlineExceeded) {
		return false
	}
	return cn.records.atBoundary() && cn.nc.SetReadDeadline(time.Time{}) == nil
}

// alive reports whether an idle connection is still usable: the backend
// has not closed it and has sent nothing unasked. net/http learns this
// from a reader goroutine per connection; one non-blocking peek per reuse
// is cheaper.
func (cn *conn) alive() bool {
	if cn.br.Buffered() > 0 {
		return false
	}
	if cn.raw == nil {
		return true
	}
	cn.peekOK = false
	if err := cn.raw.Read(cn.peekFn); err != nil {
		return false
	}
	return cn.peekOK
}

// peek runs inside RawConn.Read: it never asks to wait (returns true).
func (cn *conn) peek(fd uintptr) bool {
	for {
		_, _, err := syscall.Recvfrom(int(fd), cn.peekBuf[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		switch {
		case err == syscall.EINTR:
			continue
		case err == syscall.EAGAIN:
			cn.peekOK = true // open, nothing to read
		}
		return true // EOF, unasked bytes or an error: not reusable
	}
}

// roundTrip writes req and reads the answer's head. On error the caller
// closes cn.
func (cn *conn) roundTrip(ctx context.Context, req *Request) (*Response, error) {
	cn.gotBytes, cn.written = false, 0
	var stop func() bool
	if ctx.Done() != nil {
		stop = context.AfterFunc(ctx, cn.abortFn)
	}
	resp := &Response{cn: cn, ctx: ctx, stop: stop}
	if err := cn.write(req); err != nil {
		resp.stopAbort()
		return nil, &writeError{err: err}
	}
	if err := resp.readHead(); err != nil {
		resp.stopAbort()
		return nil, err
	}
	return resp, nil
}

func (cn *conn) write(req *Request) error {
	bw := cn.bw
	_, _ = bw.WriteString(req.Target.head)
	_, _ = bw.WriteString("Content-Length: ")
	_, _ = bw.Write(strconv.AppendInt(cn.num[:0], int64(len(req.Body)), 10))
	_, _ = bw.WriteString("\r\n")
	_, _ = bw.Write(req.Header)
	_, _ = bw.WriteString("\r\n")
	_, _ = bw.Write(req.Body)
	return bw.Flush() // bufio's errors are sticky: the first one comes out here
}

// writeError: writing the request failed, so the backend cannot have it
// whole.
type writeError struct{ err error }

func (e *writeError) Error() string { return "writing the request: " + e.err.Error() }
func (e *writeError) Unwrap() error { return e.err }

// tlsRecords sits under tls.Conn and follows the TLS record framing of
// the bytes it reads: tls.Conn reads the socket in as large pieces as it
// can, so the bytes after an answer's last record may already be inside
// it, as a whole record (a read returns it) or as a part of one (only
// the framing shows). Used by one goroutine at a time, as its conn.
type tlsRecords struct {
	net.Conn
	hdr  [5]byte // a record header being read
	hdrN int
	left int // bytes of the current record's body not yet read
}

func (t *tlsRecords) Read(p []byte) (int, error) {
	n, err := t.Conn.Read(p)
	for b := p[:n]; len(b) > 0; {
		if t.left > 0 {
			k := min(t.left, len(b))
			t.left, b = t.left-k, b[k:]
			continue
		}
		k := copy(t.hdr[t.hdrN:], b)
		t.hdrN, b = t.hdrN+k, b[k:]
		if t.hdrN == len(t.hdr) {
			t.left, t.hdrN = int(t.hdr[3])<<8|int(t.hdr[4]), 0
		}
	}
	return n, err
}

// atBoundary: every record read began was read whole.
func (t *tlsRecords) atBoundary() bool { return t.hdrN == 0 && t.left == 0 }
