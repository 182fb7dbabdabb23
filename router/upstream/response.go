package upstream

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"time"
)

// Response is a backend's answer: its status and the header fields the
// router reads, and its body as an io.Reader. It is owned by one
// goroutine; Close it when done (the connection goes back to the pool
// when the body was read to its end).
type Response struct {
	StatusCode int
	// ContentType is the Content-Type field ("" none).
	ContentType string
	// ContentLength is the body's declared length, -1 when not declared
	// (chunked, or up to the connection's end).
	ContentLength int64

	cn   *conn
	ctx  context.Context
	stop func() bool // stops the context's abort; nil without one

	mode       bodyMode
	remain     int64 // length: bytes left; chunked: bytes left in this chunk
	inChunk    bool  // chunked: the CRLF after a chunk's data is still to read
	closeAfter bool  // the connection cannot carry another request
	err        error // sticky; io.EOF once the body ended
	closed     bool
}

type bodyMode uint8

const (
	bodyNone    bodyMode = iota // 1xx, 204, 304
	bodyLength                  // Content-Length
	bodyChunked                 // Transfer-Encoding: chunked
	bodyToClose                 // neither: up to the connection's end
)

// Read reads the body. The last bytes may come with io.EOF.
func (r *Response) Read(p []byte) (int, error) {
	if r.err != nil {
		return 0, r.err
	}
	if len(p) == 0 {
		return 0, nil
	}
	var n int
	var err error
	switch r.mode {
	case bodyNone:
		err = io.EOF
	case bodyLength:
		n, err = r.readLength(p)
	case bodyChunked:
		n, err = r.readChunked(p)
	case bodyToClose:
		n, err = r.cn.br.Read(p)
	}
	if err != nil {
		if err != io.EOF {
			err = r.failure(err)
		}
		r.err = err
	}
	return n, err
}

// failure is what a failed read returns: the context's cause when the
// context ended (it aborted the connection), else err, with an early EOF
// made io.ErrUnexpectedEOF.
func (r *Response) failure(err error) error {
	if r.ctx.Err() != nil {
		return context.Cause(r.ctx)
	}
	if errors.Is(err, io.EOF) {
		return io.ErrUnexpectedEOF
	}
	return err
}

// lateDrain bounds the wait, off the caller's path, for the end of a body
// the caller stopped reading: a stream's last chunk follows its
// data: [DONE] by microseconds, and catching it keeps the connection.
const (
	lateDrain      = 100 * time.Millisecond
	lateDrainBytes = 64 << 10
)

// Close ends the response; it never blocks. A body not read to its end
// is drained on another goroutine, for up to lateDrain and
// lateDrainBytes: the connection goes back to the pool when the end is
// reached, and is closed otherwise. (Draining only what is already
// buffered would need a read that cannot wait, and a timed-out read can
// leave the framing half-parsed.) The Response must not be used after
// Close.
func (r *Response) Close() error {
	if r.closed {
		return nil
	}
	r.closed = true
	cn := r.cn
	if !r.stopAbort() || r.closeAfter {
		cn.close()
		return nil
	}
	if r.err == nil && r.mode != bodyToClose {
		go func() {
			r.drain(time.Now().Add(lateDrain), lateDrainBytes)
			r.release()
		}()
		return nil
	}
	r.release()
	return nil
}

// release pools the connection when the body ended, else closes it.
func (r *Response) release() {
	cn := r.cn
	if r.err == io.EOF && cn.drained() && cn.nc.SetDeadline(time.Time{}) == nil {
		cn.client.put(cn)
		return
	}
	cn.close()
}

// stopAbort stops the context's abort; false when it ran (or runs): then
// the connection's deadline is not ours to reset.
func (r *Response) stopAbort() bool {
	return r.stop == nil || r.stop()
}

// drain reads the body on until its end, an error, budget bytes or the
// deadline.
func (r *Response) drain(deadline time.Time, budget int) {
	_ = r.cn.nc.SetReadDeadline(deadline)
	for budget > 0 && r.err == nil {
		n, _ := r.Read(r.cn.scratch[:])
		budget -= n
	}
}

func (r *Response) readLength(p []byte) (int, error) {
	if r.remain == 0 {
		return 0, io.EOF
	}
	if int64(len(p)) > r.remain {
		p = p[:r.remain]
	}
	n, err := r.cn.br.Read(p)
	r.remain -= int64(n)
	switch {
	case err == io.EOF && r.remain > 0:
		err = io.ErrUnexpectedEOF
	case err == nil && r.remain == 0:
		err = io.EOF
	}
	return n, err
}

// readChunked fills p from as many chunks as have arrived, waiting on
// the network only while it holds nothing (an SSE event is relayed as
// soon as its chunk is in).
func (r *Response) readChunked(p []byte) (int, error) {
	br := r.cn.br
	n := 0
	for n < len(p) {
		if r.remain == 0 {
			if r.inChunk {
				if n > 0 && br.Buffered() < 2 {
					return n, nil
				}
				if err := expectCRLF(br); err != nil {
					return n, err
				}
				r.inChunk = false
			}
			if n > 0 && !lineBuffered(br) {
				return n, nil
			}
			size, err := r.readChunkSize()
			if err != nil {
				return n, err
			}
			if size == 0 {
				if b, err := br.Peek(1); err == nil && b[0] == '\n' {
					// net/http takes this only when more bytes follow it
					// (at the stream's end it refuses): refuse it always,
					// as every other bare LF of the chunked framing.
					return n, errors.New("chunked body: trailer ends with a bare LF")
				}
				limit := r.cn.client.cfg.MaxHeaderBytes
				if err := r.readFields(&limit, nil); err != nil { // the trailer, ignored
					return n, err
				}
				return n, io.EOF
			}
			r.remain, r.inChunk = size, true
		}
		if n > 0 && br.Buffered() == 0 {
			return n, nil
		}
		want := min(int64(len(p)-n), r.remain)
		k, err := br.Read(p[n : n+int(want)])
		n += k
		r.remain -= int64(k)
		if err != nil {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return n, err
		}
	}
	return n, nil
}

// expectCRLF reads the CRLF after a chunk's data: exactly those two
// bytes, as net/http requires.
func expectCRLF(br *bufio.Reader) error {
	for _, want := range []byte("\r\n") {
		b, err := br.ReadByte()
		switch {
		case err == io.EOF:
			return io.ErrUnexpectedEOF
		case err != nil:
			return err
		case b != want:
			return errors.New("chunked body: no line end (CRLF) after a chunk")
		}
	}
	return nil
}

// lineBuffered: a whole line is already buffered.
func lineBuffered(br *bufio.Reader) bool {
	b, _ := br.Peek(br.Buffered())
	return bytes.IndexByte(b, '\n') >= 0
}

// maxChunkSize bounds one chunk's declared size (15 hex digits).
const maxChunkSize = 1 << 60

func (r *Response) readChunkSize() (int64, error) {
	limit := 4 << 10
	line, long, crlf, err := r.cn.readLineEnd(&limit)
	if err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return 0, err
	}
	if long {
		return 0, errors.New("chunked body: chunk size line too long")
	}
	if !crlf {
		// As net/http: a bare LF could end the line for us and not for
		// a proxy in front of us (request smuggling's classic split).
		return 0, errors.New("chunked body: chunk size line ends with a bare LF")
	}
	if i := bytes.IndexByte(line, ';'); i >= 0 {
		line = line[:i] // chunk extensions, ignored
	}
	line = bytes.TrimRight(line, " \t")
	switch {
	case len(line) == 0:
		return 0, errors.New("chunked body: bad chunk size \"\"")
	case len(line) > 15:
		return 0, errors.New("chunked body: chunk size over 15 hex digits")
	}
	var size int64
	for _, c := range line {
		var d byte
		switch {
		case '0' <= c && c <= '9':
			d = c - '0'
		case 'a' <= c && c <= 'f':
			d = c - 'a' + 10
		case 'A' <= c && c <= 'F':
			d = c - 'A' + 10
		default:
			return 0, fmt.Errorf("chunked body: bad chunk size %q", truncate(line))
		}
		size = size<<4 | int64(d)
	}
	if size > maxChunkSize {
		return 0, errors.New("chunked body: chunk too large")
	}
	return size, nil
}

func truncate(b []byte) []byte {
	if len(b) > 32 {
		return b[:32]
	}
	return b
}
