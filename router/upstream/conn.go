package upstream

import (
	"bufio"
	"context"
	"errors"
	"net"
	"strconv"
	"syscall"
	"time"
)

// errNoAnswer: the backend closed the connection before a byte of an
// answer (on a reused connection: its idle timeout raced the request).
var errNoAnswer = errors.New("backend closed the connection before answering")

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
	bw     *bufio.Writer

	idleSince time.Time
	reused    bool // this request got it from the pool
	gotBytes  bool // this request's answer has begun

	abortFn func()                // cn.abort, bound once (no allocation per request)
	peekFn  func(fd uintptr) bool // cn.peek, bound once
	peekOK  bool
	peekBuf [1]byte
	num     [20]byte
	scratch [512]byte // drain target
}

func newConn(c *Client, key string, nc net.Conn, sc syscall.Conn) *conn {
	cn := &conn{client: c, key: key, nc: nc,
		br: bufio.NewReaderSize(nc, 4<<10), bw: bufio.NewWriterSize(nc, 4<<10)}
	if sc != nil {
		cn.raw, _ = sc.SyscallConn()
	}
	cn.abortFn, cn.peekFn = cn.abort, cn.peek
	return cn
}

// abort fails pending and later I/O on cn at once (a deadline long past).
func (cn *conn) abort() { _ = cn.nc.SetDeadline(time.Unix(1, 0)) }

func (cn *conn) close() { _ = cn.nc.Close() }

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
	cn.gotBytes = false
	var stop func() bool
	if ctx.Done() != nil {
		stop = context.AfterFunc(ctx, cn.abortFn)
	}
	resp := &Response{cn: cn, ctx: ctx, stop: stop}
	if err := cn.write(req); err != nil {
		resp.stopAbort()
		return nil, err
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
