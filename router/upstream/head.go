package upstream

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"

	"golang.org/x/net/http/httpguts"
)

var errHeaderTooLarge = errors.New("answer header too large")

// head is what the router needs from an answer's header fields.
type head struct {
	contentLength int64 // -1 none
	chunked       bool
	close         bool
	contentType   string
	http10        bool // the status line's version
}

// readHead reads the status line and header, skipping 1xx answers, and
// sets r's status, fields and body framing.
func (r *Response) readHead() error {
	cn := r.cn
	limit := cn.client.cfg.MaxHeaderBytes
	for informational := 0; ; informational++ {
		line, long, err := cn.readLine(&limit)
		switch {
		case err == io.EOF && !cn.gotBytes:
			return errNoAnswer
		case err == io.EOF:
			return io.ErrUnexpectedEOF
		case err != nil:
			return err
		case long:
			return errors.New("answer status line too long")
		}
		code, http10, err := parseStatusLine(line)
		if err != nil {
			return err
		}
		h := head{contentLength: -1, http10: http10}
		if err := r.readFields(&limit, &h); err != nil {
			return err
		}
		if code < 200 {
			if code == 101 {
				return errors.New("backend switched protocols (101)")
			}
			if informational == 4 {
				return errors.New("more than 4 informational (1xx) answers")
			}
			continue
		}
		r.StatusCode, r.ContentType, r.ContentLength = code, h.contentType, -1
		switch {
		case code == 204 || code == 304:
			r.mode, r.ContentLength = bodyNone, 0
		case h.chunked:
			// Content-Length beside chunked is how requests are smuggled:
			// chunked wins (RFC 9112 6.3) and the connection is not reused.
			r.mode, r.closeAfter = bodyChunked, h.contentLength >= 0
		case h.contentLength >= 0:
			r.mode, r.remain, r.ContentLength = bodyLength, h.contentLength, h.contentLength
		default:
			r.mode, r.closeAfter = bodyToClose, true
		}
		r.closeAfter = r.closeAfter || h.close || http10
		return nil
	}
}

// readFields reads header fields up to the blank line; h nil reads and
// drops them (a chunked body's trailer). Lines longer than the read
// buffer are skipped, unless they are a field h needs.
func (r *Response) readFields(limit *int, h *head) error {
	cn := r.cn
	for {
		line, long, err := cn.readLine(limit)
		if err != nil {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return err
		}
		if long {
			if h != nil && neededField(line) {
				return fmt.Errorf("answer header field %q too long", fieldName(line))
			}
			if _, _, err := splitField(line); err != nil {
				return err
			}
			if err := cn.skipRest(limit); err != nil {
				return err
			}
			continue
		}
		if len(line) == 0 {
			return nil
		}
		if line[0] == ' ' || line[0] == '\t' {
			return errors.New("answer header uses obsolete line folding")
		}
		name, value, err := splitField(line)
		if err != nil {
			return err
		}
		if h == nil {
			continue
		}
		if err := h.field(name, value); err != nil {
			return err
		}
	}
}

// splitField splits a field line into its name and value, refusing what
// net/http's reader refuses: no colon, a name that is not a token (a
// space before the colon would hide "Content-Length" from a reader that
// skips bad names), control bytes in the value.
func splitField(line []byte) (name, value []byte, err error) {
	i := bytes.IndexByte(line, ':')
	if i <= 0 {
		return nil, nil, fmt.Errorf("malformed answer header line %q", truncate(line))
	}
	name, value = line[:i], line[i+1:]
	for _, c := range name {
		if c == ' ' {
			return nil, nil, fmt.Errorf("answer header field name %q holds a space", truncate(name))
		}
		if !httpguts.IsTokenRune(rune(c)) {
			return nil, nil, fmt.Errorf("malformed answer header line %q", truncate(line))
		}
	}
	if !validValue(value) {
		return nil, nil, fmt.Errorf("malformed answer header line %q", truncate(line))
	}
	return name, bytes.Trim(value, " \t"), nil
}

// validValue: value holds no control byte but HTAB (obs-text, 0x80 and
// up, is allowed), as RFC 9110 5.5 and net/http have it.
func validValue(value []byte) bool {
	for _, c := range value {
		if (c < 0x20 && c != '\t') || c == 0x7f {
			return false
		}
	}
	return true
}

func (h *head) field(name, value []byte) error {
	switch {
	case bytes.EqualFold(name, []byte("Content-Length")):
		n, ok := parseLength(value)
		if !ok {
			return fmt.Errorf("bad Content-Length %q", truncate(value))
		}
		if h.contentLength >= 0 && h.contentLength != n {
			return errors.New("conflicting Content-Length fields")
		}
		h.contentLength = n
	case bytes.EqualFold(name, []byte("Transfer-Encoding")):
		if h.http10 {
			// RFC 9112 6.1: its framing is faulty (net/http ignores it).
			return errors.New("Transfer-Encoding in an HTTP/1.0 answer")
		}
		if !bytes.EqualFold(value, []byte("chunked")) {
			return fmt.Errorf("unsupported Transfer-Encoding %q", truncate(value))
		}
		h.chunked = true
	case bytes.EqualFold(name, []byte("Connection")):
		h.close = h.close || hasToken(value, "close")
	case bytes.EqualFold(name, []byte("Content-Type")):
		h.contentType = internType(value)
	}
	return nil
}

func fieldName(line []byte) []byte {
	if i := bytes.IndexByte(line, ':'); i >= 0 {
		return truncate(line[:i])
	}
	return truncate(line)
}

func neededField(line []byte) bool {
	name := fieldName(line)
	for _, f := range []string{"Content-Length", "Transfer-Encoding", "Connection", "Content-Type"} {
		if bytes.EqualFold(name, []byte(f)) {
			return true
		}
	}
	return false
}

// readLine returns the next line without its line end. long: the line
// did not fit the read buffer; line is its start and the rest is unread
// (skipRest). limit is what the header may still spend.
func (cn *conn) readLine(limit *int) (line []byte, long bool, err error) {
	line, long, _, err = cn.readLineEnd(limit)
	return line, long, err
}

// readLineEnd is readLine that also says whether the line ended in CRLF
// (a chunk-size line must: net/http refuses a bare LF there).
func (cn *conn) readLineEnd(limit *int) (line []byte, long, crlf bool, err error) {
	line, err = cn.br.ReadSlice('\n')
	if len(line) > 0 {
		cn.gotBytes = true
	}
	if *limit -= len(line); *limit < 0 {
		return nil, false, false, errHeaderTooLarge
	}
	switch {
	case err == bufio.ErrBufferFull:
		return line, true, false, nil
	case err != nil:
		return nil, false, false, err
	}
	line = line[:len(line)-1]
	if n := len(line); n > 0 && line[n-1] == '\r' {
		line, crlf = line[:n-1], true
	}
	return line, false, crlf, nil
}

func (cn *conn) skipRest(limit *int) error {
	for {
		part, err := cn.br.ReadSlice('\n')
		if *limit -= len(part); *limit < 0 {
			return errHeaderTooLarge
		}
		if !validValue(bytes.TrimRight(part, "\r\n")) {
			return errors.New("malformed answer header line: a control byte in a long field")
		}
		switch {
		case err == nil:
			return nil
		case err == io.EOF:
			return io.ErrUnexpectedEOF
		case err != bufio.ErrBufferFull:
			return err
		}
	}
}

// parseStatusLine parses "HTTP/1.x SSS reason".
func parseStatusLine(line []byte) (code int, http10 bool, err error) {
	if len(line) < 12 || !bytes.HasPrefix(line, []byte("HTTP/1.")) || (line[7] != '0' && line[7] != '1') ||
		line[8] != ' ' || (len(line) > 12 && line[12] != ' ') {
		return 0, false, fmt.Errorf("malformed answer status line %q", truncate(line))
	}
	for _, c := range line[9:12] {
		if c < '0' || c > '9' {
			return 0, false, fmt.Errorf("malformed answer status line %q", truncate(line))
		}
		code = code*10 + int(c-'0')
	}
	if code < 100 {
		return 0, false, fmt.Errorf("malformed answer status line %q", truncate(line))
	}
	return code, line[7] == '0', nil
}

// parseLength parses a Content-Length value: digits only, below 2^62.
func parseLength(v []byte) (int64, bool) {
	if len(v) == 0 || len(v) > 18 {
		return 0, false
	}
	var n int64
	for _, c := range v {
		if c < '0' || c > '9' {
			return 0, false
		}
		n = n*10 + int64(c-'0')
	}
	return n, true
}

// hasToken: value, a comma-separated list, holds token (any case).
func hasToken(value []byte, token string) bool {
	for len(value) > 0 {
		var part []byte
		part, value, _ = bytes.Cut(value, []byte(","))
		if bytes.EqualFold(bytes.Trim(part, " \t"), []byte(token)) {
			return true
		}
	}
	return false
}

// internType returns the Content-Types vLLM and its fronts send as
// constants, so the common answer allocates no string for its type.
func internType(v []byte) string {
	switch string(v) { // compiled without a conversion
	case "application/json":
		return "application/json"
	case "text/event-stream":
		return "text/event-stream"
	case "text/event-stream; charset=utf-8":
		return "text/event-stream; charset=utf-8"
	case "application/json; charset=utf-8":
		return "application/json; charset=utf-8"
	}
	return string(v)
}
