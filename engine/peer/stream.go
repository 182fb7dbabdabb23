package peer

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/pegaflow/pegaflow/engine"
)

// The validated stream (engine.PeerTransportTCP) shares the peer port with
// the gRPC control plane (listener.go tells them apart by the first bytes).
// All integers are little-endian.
//
//	reader -> engine  magic "PFSTRM01", reader nonce (32)
//	engine -> reader  engine nonce (32), HMAC(token, "server" | rn | en) (32)
//	reader -> engine  HMAC(token, "client" | rn | en) (32)
//	engine -> reader  the verdict, headAlign bytes: first 0 accepted, else
//	                  refused (and closed)
//
// then, any number of times, one request and its answer:
//
//	reader -> engine  u32 handle length (<= maxHandle), the handle,
//	                  u32 extent count (1..engine.MaxPeerReadExtents),
//	                  extents of {u32 pool, u64 offset, u64 length}
//	engine -> reader  u32 status, u32 message length (<= maxMessage), the
//	                  message, zeros up to a multiple of headAlign; on
//	                  statusOK the extents' bytes, in order
//
// Everything the engine sends before a share is a multiple of headAlign
// bytes, so the shares keep, in the kernel's socket buffers, the cache-line
// alignment they have in the pool: `rep movsb` copies between buffers
// misaligned to each other at about half speed, and an 8-byte head took
// the fetch from ~0.85 to ~0.65 of a bare transfer (docs/multi-host.md).
//
// Both sides prove they hold the token without sending it, so a reader
// that dialled a wrong address learns nothing of the token and is sent no
// bytes it could take for KV. The stream is not encrypted: like the
// control plane, it belongs on the KV network (docs/security.md).

const streamMagic = "PFSTRM01"

const (
	headAlign  = 64
	nonceLen   = 32
	macLen     = sha256.Size
	maxHandle  = 64
	maxMessage = 1024
	extentLen  = 20
)

// Answer statuses.
const (
	statusOK       = 0
	statusInvalid  = 1
	statusNotFound = 2
	statusFailed   = 3
)

func streamMAC(token []byte, role string, readerNonce, engineNonce []byte) []byte {
	m := hmac.New(sha256.New, token)
	m.Write([]byte("pegaflow-peer-stream-v1 " + role))
	m.Write(readerNonce)
	m.Write(engineNonce)
	return m.Sum(nil)
}

func newNonce() []byte {
	n := make([]byte, nonceLen)
	_, _ = rand.Read(n) // never fails (crypto/rand)
	return n
}

// errRefused is a stream handshake that failed the token check.
var errRefused = errors.New("peer stream refused: the peer token does not match")

// readRequest is a parsed request.
type readRequest struct {
	handle string
	exts   []engine.PeerExtent
}

// encodeRequest appends the request for handle and the reads' extents.
func encodeRequest(buf []byte, handle string, reads []engine.PeerShareRead) []byte {
	buf = binary.LittleEndian.AppendUint32(buf, uint32(len(handle)))
	buf = append(buf, handle...)
	buf = binary.LittleEndian.AppendUint32(buf, uint32(len(reads)))
	for _, r := range reads {
		buf = binary.LittleEndian.AppendUint32(buf, r.Ext.Pool)
		buf = binary.LittleEndian.AppendUint64(buf, r.Ext.Offset)
		buf = binary.LittleEndian.AppendUint64(buf, r.Ext.Len)
	}
	return buf
}

// decodeRequest reads one request, refusing lengths over the bounds before
// allocating for them. io.EOF (clean) when the reader sent nothing more.
func decodeRequest(r io.Reader) (*readRequest, error) {
	var hdr [4]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, err
	}
	hl := binary.LittleEndian.Uint32(hdr[:])
	if hl == 0 || hl > maxHandle {
		return nil, fmt.Errorf("%w: handle of %d bytes, want 1..%d", engine.ErrInvalid, hl, maxHandle)
	}
	h := make([]byte, hl+4)
	if _, err := io.ReadFull(r, h); err != nil {
		return nil, noEOF(err)
	}
	n := binary.LittleEndian.Uint32(h[hl:])
	if n == 0 || n > engine.MaxPeerReadExtents {
		return nil, fmt.Errorf("%w: %d extents in one read, want 1..%d", engine.ErrInvalid, n, engine.MaxPeerReadExtents)
	}
	raw := make([]byte, int(n)*extentLen)
	if _, err := io.ReadFull(r, raw); err != nil {
		return nil, noEOF(err)
	}
	req := &readRequest{handle: string(h[:hl]), exts: make([]engine.PeerExtent, n)}
	for i := range req.exts {
		b := raw[i*extentLen:]
		req.exts[i] = engine.PeerExtent{Pool: binary.LittleEndian.Uint32(b), Offset: binary.LittleEndian.Uint64(b[4:]),
			Len: binary.LittleEndian.Uint64(b[12:])}
	}
	return req, nil
}

// noEOF turns a clean EOF inside a message into a truncation.
func noEOF(err error) error {
	if errors.Is(err, io.EOF) {
		return io.ErrUnexpectedEOF
	}
	return err
}

// verdict is the token exchange's last message.
func verdict(v byte) []byte {
	b := make([]byte, headAlign)
	b[0] = v
	return b
}

// encodeStatus is an answer's head, padded to a multiple of headAlign.
func encodeStatus(code uint32, msg string) []byte {
	if len(msg) > maxMessage {
		msg = msg[:maxMessage]
	}
	n := 8 + len(msg)
	b := binary.LittleEndian.AppendUint32(make([]byte, 0, n+headPad(n)), code)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(msg)))
	b = append(b, msg...)
	return append(b, make([]byte, headPad(n))...)
}

// headPad is how many zeros make n bytes a multiple of headAlign.
func headPad(n int) int { return (headAlign - n%headAlign) % headAlign }

// decodeStatus reads an answer's head. answered is true once the head was
// read whole; a status other than OK is then an error of the engine's
// kinds.
func decodeStatus(r io.Reader, addr string) (answered bool, err error) {
	var hdr [8]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return false, err
	}
	code, ml := binary.LittleEndian.Uint32(hdr[:]), binary.LittleEndian.Uint32(hdr[4:])
	if ml > maxMessage {
		return false, fmt.Errorf("answer message of %d bytes, max %d", ml, maxMessage)
	}
	msg := make([]byte, int(ml)+headPad(8+int(ml)))
	if _, err := io.ReadFull(r, msg); err != nil {
		return false, noEOF(err)
	}
	msg = msg[:ml]
	var kind error
	switch code {
	case statusOK:
		return true, nil
	case statusInvalid:
		kind = engine.ErrInvalid
	case statusNotFound:
		kind = engine.ErrNotFound
	default:
		kind = engine.ErrPeerUnavailable
	}
	return true, fmt.Errorf("%w: peer %s read: %s", kind, addr, msg)
}

// statusOf maps a refused read to its status.
func statusOf(err error) uint32 {
	switch {
	case errors.Is(err, engine.ErrInvalid):
		return statusInvalid
	case errors.Is(err, engine.ErrNotFound):
		return statusNotFound
	}
	return statusFailed
}
