package peer

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"time"
)

// The peer port carries gRPC (the control plane) and the validated stream.
// portMux accepts every connection, bounds how many are open at once, reads
// the first bytes (within sniffTimeout) and hands the connection to the
// stream server or, replaying those bytes, to gRPC through grpcListener.
// Nothing is read from a connection beyond those bytes before its protocol
// authenticates it (gRPC: the token in the stream's headers, InTapHandle).

// MaxConns bounds the peer port's open connections, both protocols and
// the not yet sniffed together; a connection beyond it is closed at once.
const MaxConns = 512

// sniffTimeout bounds how long a connection may stay silent before its
// first bytes say its protocol.
const sniffTimeout = 10 * time.Second

type portMux struct {
	lis    net.Listener
	slots  chan struct{}
	grpc   *grpcListener
	stream func(net.Conn)
	wg     sync.WaitGroup
}

func newPortMux(lis net.Listener, stream func(net.Conn)) *portMux {
	return &portMux{lis: lis, slots: make(chan struct{}, MaxConns), stream: stream,
		grpc: &grpcListener{addr: lis.Addr(), conns: make(chan net.Conn), done: make(chan struct{})}}
}

// serve accepts until the listener closes.
func (m *portMux) serve() error {
	defer m.grpc.close()
	for {
		c, err := m.lis.Accept()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return err
		}
		select {
		case m.slots <- struct{}{}:
		default:
			_ = c.Close() // over MaxConns
			continue
		}
		c = &slotConn{Conn: c, release: func() { <-m.slots }}
		m.wg.Go(func() { m.route(c) })
	}
}

func (m *portMux) route(c net.Conn) {
	_ = c.SetReadDeadline(time.Now().Add(sniffTimeout))
	head := make([]byte, len(streamMagic))
	if _, err := io.ReadFull(c, head); err != nil {
		_ = c.Close()
		return
	}
	_ = c.SetReadDeadline(time.Time{})
	if bytes.Equal(head, []byte(streamMagic)) {
		m.stream(c)
		return
	}
	if !m.grpc.deliver(&replayConn{Conn: c, head: head}) {
		_ = c.Close()
	}
}

// close stops accepting; connections already handed on are their
// servers' to close.
func (m *portMux) close() {
	_ = m.lis.Close()
	m.grpc.close()
}

// slotConn gives its slot back once, on Close.
type slotConn struct {
	net.Conn
	once    sync.Once
	release func()
}

func (c *slotConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(c.release)
	return err
}

// NetConn is the accepted connection itself: writing net.Buffers to it
// (not to the wrapper, which hides its writev) sends them in one syscall.
func (c *slotConn) NetConn() net.Conn { return c.Conn }

// replayConn reads head before the rest of the connection.
type replayConn struct {
	net.Conn
	head []byte
}

func (c *replayConn) Read(p []byte) (int, error) {
	if len(c.head) > 0 {
		n := copy(p, c.head)
		c.head = c.head[n:]
		return n, nil
	}
	return c.Conn.Read(p)
}

// grpcListener is the net.Listener gRPC serves: the connections portMux
// found to be gRPC.
type grpcListener struct {
	addr  net.Addr
	conns chan net.Conn
	once  sync.Once
	done  chan struct{}
}

func (l *grpcListener) deliver(c net.Conn) bool {
	select {
	case l.conns <- c:
		return true
	case <-l.done:
		return false
	}
}

func (l *grpcListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *grpcListener) close()         { l.once.Do(func() { close(l.done) }) }
func (l *grpcListener) Close() error   { l.close(); return nil }
func (l *grpcListener) Addr() net.Addr { return l.addr }

// afterDeadline makes c's blocked reads and writes return once ctx ends;
// the returned stop must be called before c is used again.
func afterDeadline(ctx context.Context, c net.Conn) (stop func() bool) {
	if d, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(d)
	}
	return context.AfterFunc(ctx, func() { _ = c.SetDeadline(time.Unix(1, 0)) })
}
