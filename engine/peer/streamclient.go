package peer

import (
	"bufio"
	"context"
	"crypto/hmac"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"syscall"
	"time"

	"github.com/pegaflow/pegaflow/engine"
)

// maxIdleStreams bounds the idle stream connections kept per peer; a
// fetch reads its chunks in parallel, one connection each.
const maxIdleStreams = 16

// streams are a Client's idle stream connections per peer address.
type streams struct {
	token []byte

	mu   sync.Mutex // guards idle
	idle map[string][]*streamConn
}

type streamConn struct {
	c  net.Conn
	br *bufio.Reader
}

// get returns an idle connection to addr or dials and authenticates one.
// get returns an idle connection to addr (kept is then true) or dials and
// authenticates one.
// A kept connection is checked before it is reused (idleAlive): one
// whose peer closed it while it sat idle (the peer engine restarted, or
// dropped it) is closed, never sent a request.
func (s *streams) get(ctx context.Context, addr string) (*streamConn, error) {
	for {
		s.mu.Lock()
		l := s.idle[addr]
		if len(l) == 0 {
			s.mu.Unlock()
			return s.dial(ctx, addr)
		}
		sc := l[len(l)-1]
		s.idle[addr] = l[:len(l)-1]
		s.mu.Unlock()
		if idleAlive(sc) {
			return sc, nil
		}
		_ = sc.c.Close()
	}
}

// idleAlive reports whether an idle connection is still open with nothing
// to read: one non-blocking MSG_PEEK (EOF, unasked bytes or an error: not
// reusable).
func idleAlive(sc *streamConn) bool {
	if sc.br.Buffered() > 0 {
		return false
	}
	sysc, ok := sc.c.(syscall.Conn)
	if !ok {
		return true
	}
	rc, err := sysc.SyscallConn()
	if err != nil {
		return false
	}
	alive := false
	var b [1]byte
	if err := rc.Read(func(fd uintptr) bool {
		for {
			_, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
			if err == syscall.EINTR {
				continue
			}
			alive = err == syscall.EAGAIN
			return true // never wait
		}
	}); err != nil {
		return false
	}
	return alive
}

// dial opens and authenticates a connection to addr.
func (s *streams) dial(ctx context.Context, addr string) (*streamConn, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("%w: peer %s stream: %w", engine.ErrPeerUnavailable, addr, err)
	}
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetNoDelay(true)
	}
	sc := &streamConn{c: c, br: bufio.NewReaderSize(c, 64<<10)}
	stop := afterDeadline(ctx, c)
	err = sc.handshake(s.token)
	if !stop() || err != nil {
		_ = c.Close()
		if ctx.Err() != nil {
			return nil, context.Cause(ctx)
		}
		if errors.Is(err, errRefused) {
			return nil, fmt.Errorf("%w: peer %s: %w", engine.ErrPermission, addr, err)
		}
		return nil, fmt.Errorf("%w: peer %s stream handshake: %w", engine.ErrPeerUnavailable, addr, err)
	}
	return sc, nil
}

// handshake proves the token to the engine and checks the engine proves it.
func (sc *streamConn) handshake(token []byte) error {
	rn := newNonce()
	if _, err := sc.c.Write(append([]byte(streamMagic), rn...)); err != nil {
		return err
	}
	hello := make([]byte, nonceLen+macLen)
	if _, err := io.ReadFull(sc.br, hello); err != nil {
		return err
	}
	en := hello[:nonceLen]
	if !hmac.Equal(hello[nonceLen:], streamMAC(token, "server", rn, en)) {
		return errRefused // never prove ours to an engine that does not hold it
	}
	if _, err := sc.c.Write(streamMAC(token, "client", rn, en)); err != nil {
		return err
	}
	v := make([]byte, headAlign)
	if _, err := io.ReadFull(sc.br, v); err != nil {
		return err
	}
	if v[0] != 0 {
		return errRefused
	}
	return nil
}

// put keeps a connection whose last answer was read whole.
func (s *streams) put(addr string, sc *streamConn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.idle == nil || len(s.idle[addr]) >= maxIdleStreams {
		_ = sc.c.Close()
		return
	}
	s.idle[addr] = append(s.idle[addr], sc)
}

// close closes every idle connection.
func (s *streams) close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, l := range s.idle {
		for _, sc := range l {
			_ = sc.c.Close()
		}
	}
	s.idle = nil
}

// read sends one request and reads its answer into the reads' Dst. It
// returns only once nothing more can be written into any Dst: the bytes
// land synchronously, and a connection that failed is closed first.
func (s *streams) read(ctx context.Context, addr, handle string, reads []engine.PeerShareRead) error {
	if len(reads) == 0 {
		return nil
	}
	sc, err := s.get(ctx, addr)
	if err != nil {
		return err
	}
	stop := afterDeadline(ctx, sc.c)
	whole, err := sc.exchange(addr, handle, reads)
	if !stop() {
		whole, err = false, context.Cause(ctx)
	}
	if whole {
		// The answer was read to its end (an error answer carries no
		// bytes): the connection can serve the next request.
		_ = sc.c.SetDeadline(time.Time{})
		s.put(addr, sc)
		return err
	}
	_ = sc.c.Close()
	if ctx.Err() != nil {
		return context.Cause(ctx)
	}
	return fmt.Errorf("%w: peer %s: %w", engine.ErrPeerConnection, addr, err)
}

// exchange sends the request and reads the answer. whole is true when the
// answer was read to its end, err then being the peer's refusal, if any.
func (sc *streamConn) exchange(addr, handle string, reads []engine.PeerShareRead) (whole bool, err error) {
	if _, err := sc.c.Write(encodeRequest(make([]byte, 0, 8+len(handle)+extentLen*len(reads)), handle, reads)); err != nil {
		return false, err
	}
	answered, err := decodeStatus(sc.br, addr)
	if err != nil {
		return answered, err
	}
	for _, dst := range coalesce(reads) {
		if _, err := io.ReadFull(sc.br, dst); err != nil {
			return false, noEOF(err)
		}
	}
	return true, nil
}

// coalesce joins the reads' Dst that follow each other in one backing
// array (a fetch's fresh extents mostly do), so a chunk is read with a few
// large reads, straight into the pool (bufio copies only reads smaller
// than its buffer), instead of one or more per share.
func coalesce(reads []engine.PeerShareRead) [][]byte {
	out := make([][]byte, 0, len(reads))
	for _, r := range reads {
		if n := len(out); n > 0 && adjacent(out[n-1], r.Dst) {
			out[n-1] = out[n-1][:len(out[n-1])+len(r.Dst)]
			continue
		}
		out = append(out, r.Dst)
	}
	return out
}

// adjacent reports whether b starts where a ends, in a's backing array
// (so a can be resliced over b without unsafe).
func adjacent(a, b []byte) bool {
	return len(b) > 0 && cap(a)-len(a) >= len(b) && &a[:len(a)+1][len(a)] == &b[0]
}
