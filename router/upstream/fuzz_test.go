package upstream

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"
)

// readUpstream reads data as router/upstream reads a backend's answer.
func readUpstream(data []byte) (status int, body []byte, err error) {
	cn := &conn{client: New(Config{}), br: bufio.NewReaderSize(bytes.NewReader(data), 4<<10)}
	r := &Response{cn: cn, ctx: context.Background()}
	if err := r.readHead(); err != nil {
		return 0, nil, err
	}
	body, err = io.ReadAll(r)
	return r.StatusCode, body, err
}

// readNetHTTP reads data with net/http's response reader, skipping 1xx
// answers as http.Transport does (101 and more than 4 refused, as
// upstream does: a proxy leg neither upgrades nor waits on hints).
func readNetHTTP(data []byte) (status int, body []byte, err error) {
	br := bufio.NewReader(bytes.NewReader(data))
	for informational := 0; ; informational++ {
		resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodPost})
		switch {
		case err != nil:
			return 0, nil, err
		case resp.StatusCode == http.StatusSwitchingProtocols:
			return 0, nil, errors.New("101")
		case resp.StatusCode < 200 && informational == 4:
			return 0, nil, errors.New("too many 1xx")
		case resp.StatusCode < 200:
			continue
		}
		body, err = io.ReadAll(resp.Body)
		return resp.StatusCode, body, err
	}
}

// FuzzUpstreamResponse feeds any bytes a backend may send to
// router/upstream's reader and to net/http's: both must accept (a head
// and a body read to its end) or both refuse, and where both accept, see
// the same status and body. Where upstream is deliberately stricter, the
// input is let through by stricter (each case says why); upstream is
// never laxer.
func FuzzUpstreamResponse(f *testing.F) {
	for _, tc := range framingCases {
		f.Add([]byte(tc.answer))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		status, body, err := readUpstream(data)
		nstatus, nbody, nerr := readNetHTTP(data)
		switch {
		case err == nil && nerr == nil:
			if status != nstatus || !bytes.Equal(body, nbody) {
				t.Fatalf("%q: upstream %d %q, net/http %d %q", cut(data), status, cut(body), nstatus, cut(nbody))
			}
		case err != nil && nerr != nil:
		case err == nil:
			t.Fatalf("%q: upstream accepts what net/http refuses (%v)", cut(data), nerr)
		default:
			if why := stricter(err); why == "" {
				t.Fatalf("%q: upstream refuses (%v) what net/http accepts (%d %q)", cut(data), err, nstatus, cut(nbody))
			}
		}
	})
}

// deliberate are the refusals where upstream is stricter than net/http
// on purpose: a piece of its error message, and why.
var deliberate = []struct{ msg, why string }{
	{"answer header too large", "a head over MaxHeaderBytes: http.ReadResponse has no bound"},
	{"too long", "a status line, needed field or chunk size line longer than the 4 KiB read buffer"},
	{"obsolete line folding", "obs-fold refused, as RFC 9112 5.2 allows: folded lines are how fields are hidden"},
	{"malformed answer status line", "only HTTP/1.0 and HTTP/1.1, one space, a code from 100: net/http takes any HTTP/x.y, extra spaces and 000-099"},
	{"holds a space", "a space in a field name (RFC 9112 5.1: before the colon it hides a field from one reader and not another): net/http ignores the field"},
	{"in an HTTP/1.0 answer", "Transfer-Encoding in HTTP/1.0: RFC 9112 6.1 calls the framing faulty; net/http ignores the field and reads to the close"},
	{"chunk size over 15 hex digits", "a chunk's size is bounded to 15 hex digits (net/http: 16)"},
	{"trailer ends with a bare LF", "an empty trailer ended by a bare LF: net/http takes it only when more bytes follow (at the stream's end it refuses); every bare LF of the chunked framing is refused"},
}

// stricter says why upstream may refuse what net/http accepts, "" when
// it may not.
func stricter(err error) string {
	for _, d := range deliberate {
		if strings.Contains(err.Error(), d.msg) {
			return d.why
		}
	}
	return ""
}

// cut shortens b for a failure message.
func cut(b []byte) []byte {
	if len(b) > 300 {
		return append(b[:300:300], "..."...)
	}
	return b
}
