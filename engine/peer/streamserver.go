package peer

import (
	"bufio"
	"crypto/hmac"
	"errors"
	"io"
	"log/slog"
	"net"
	"time"

	"github.com/pegaflow/pegaflow/engine"
)

// Deadlines of the stream server: a reader must finish the token exchange
// and each request's head promptly, may stay idle between requests for
// streamIdle, and must take an answer at streamMinRate at least (else its
// pins would be held by a reader that does not read).
const (
	streamAuthTimeout = 10 * time.Second
	streamIdle        = 90 * time.Second
	streamWriteBase   = 10 * time.Second
	streamMinRate     = 8 << 20 // bytes per second
)

// streamServer serves validated reads of one engine's open transfers.
type streamServer struct {
	eng   *engine.Engine
	token []byte // empty: insecure loopback (the MAC is then keyed by nothing)
	log   *slog.Logger
	m     *streamMetrics
}

// serve runs one connection (its magic already read) until it ends.
func (s *streamServer) serve(c net.Conn) {
	defer c.Close()
	if err := s.authenticate(c); err != nil {
		s.m.refused.Inc()
		s.log.Debug("peer stream refused", "remote", c.RemoteAddr().String(), "err", err)
		return
	}
	s.m.conns.Inc()
	br := bufio.NewReaderSize(c, 4096)
	for {
		_ = c.SetReadDeadline(time.Now().Add(streamIdle))
		if _, err := br.Peek(1); err != nil {
			return // idle past the limit, or closed by the reader
		}
		_ = c.SetReadDeadline(time.Now().Add(streamAuthTimeout))
		req, err := decodeRequest(br)
		if err != nil {
			if errors.Is(err, engine.ErrInvalid) {
				s.m.invalid.Inc()
				_, _ = c.Write(encodeStatus(statusInvalid, err.Error()))
			}
			return // a malformed or truncated request ends the connection
		}
		if !s.answer(c, req) {
			return
		}
	}
}

// authenticate runs the token exchange of stream.go after the magic.
func (s *streamServer) authenticate(c net.Conn) error {
	_ = c.SetDeadline(time.Now().Add(streamAuthTimeout))
	defer c.SetDeadline(time.Time{})
	rn := make([]byte, nonceLen)
	if _, err := io.ReadFull(c, rn); err != nil {
		return err
	}
	en := newNonce()
	if _, err := c.Write(append(en, streamMAC(s.token, "server", rn, en)...)); err != nil {
		return err
	}
	mac := make([]byte, macLen)
	if _, err := io.ReadFull(c, mac); err != nil {
		return err
	}
	if !hmac.Equal(mac, streamMAC(s.token, "client", rn, en)) {
		_, _ = c.Write(verdict(1))
		return errRefused
	}
	_, err := c.Write(verdict(0))
	return err
}

// answer serves one request; false when the connection must end.
func (s *streamServer) answer(c net.Conn, req *readRequest) bool {
	rd, err := s.eng.OpenPeerRead(req.handle, req.exts)
	if err != nil {
		if errors.Is(err, engine.ErrInvalid) {
			s.m.invalid.Inc()
		}
		_ = c.SetWriteDeadline(time.Now().Add(streamAuthTimeout))
		_, werr := c.Write(encodeStatus(statusOf(err), err.Error()))
		return werr == nil
	}
	defer rd.Done()
	var total int64
	for _, b := range rd.Src {
		total += int64(len(b))
	}
	_ = c.SetWriteDeadline(time.Now().Add(streamWriteBase + time.Duration(total/streamMinRate)*time.Second))
	bufs := append(net.Buffers{encodeStatus(statusOK, "")}, rd.Src...)
	n, err := bufs.WriteTo(rawConn(c))
	s.m.bytes.Add(float64(max(0, n-8)))
	return err == nil
}

// rawConn is the connection beneath portMux's wrapper, if any: net.Buffers
// uses writev only on a *net.TCPConn, else it writes buffer by buffer (a
// syscall, and with small shares a segment, per share).
func rawConn(c net.Conn) net.Conn {
	if u, ok := c.(interface{ NetConn() net.Conn }); ok {
		return u.NetConn()
	}
	return c
}
