package router

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httptrace"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"
)

// Tests of the router's HTTP port against hostile input (issue 12, items
// 8-11): each one failed on the code before its fix.

// postCtx posts body and returns the status and the body, failing the
// test when ctx ends first.
func postCtx(t *testing.T, ctx context.Context, url, body string) (int, string) {
	t.Helper()
	status, answer, err := postErr(ctx, url, body)
	require.NoError(t, err, "no answer before the deadline")
	return status, answer
}

// postErr posts a JSON body and reads the answer whole (safe off the
// test's goroutine: it fails nothing itself).
func postErr(ctx context.Context, url, body string) (int, string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, strings.NewReader(body))
	if err != nil {
		return 0, "", err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(data), err
}

// nestedPrompt is a body whose prompt is depth nested arrays around a
// string padded to about size bytes: the shape that made the old
// recursive check re-scan the rest of the body at every level.
func nestedPrompt(depth, size int) string {
	pad := max(size-2*depth-40, 1)
	return `{"model":"m","prompt":` + strings.Repeat("[", depth) + `"` + strings.Repeat("x", pad) + `"` +
		strings.Repeat("]", depth) + `}`
}

// A deeply nested prompt is answered 400 in the OpenAI shape at once: the
// check is one linear pass, not a recursion that re-parses every level
// (the old code took about a second per 20 KB level-scan and minutes for
// the 1 MB body, so the deadline below was never met).
func TestNestedPromptRejectedInLinearTime(t *testing.T) {
	h := startRouter(t, []*fakeVLLM{newFake(nil)}, []*fakeVLLM{newFake(nil)}, nil, nil)
	cases := []struct{ name, path, body string }{
		{"20KB of [[[[", "/v1/completions", `{"model":"m","prompt":` + strings.Repeat("[", 9_990) + strings.Repeat("]", 9_990) + `}`},
		{"1MB, 9000 levels", "/v1/completions", nestedPrompt(9000, 1<<20)},
		{"1MB of [[[[ past the JSON depth limit", "/v1/completions", `{"model":"m","prompt":` + strings.Repeat("[", 1<<19) + strings.Repeat("]", 1<<19) + `}`},
		{"nested messages", "/v1/chat/completions", `{"model":"m","messages":` + strings.Repeat("[", 9000) + strings.Repeat("]", 9000) + `}`},
		{"[[\"s\"]] is no OpenAI shape", "/v1/completions", `{"model":"m","prompt":[["s"]]}`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			status, answer := postCtx(t, ctx, h.url+tc.path, tc.body)
			require.Equal(t, http.StatusBadRequest, status, answer)
			var e struct {
				Error struct{ Message, Type string } `json:"error"`
			}
			require.NoError(t, json.Unmarshal([]byte(answer), &e), answer)
			require.Equal(t, "invalid_request_error", e.Error.Type)
			require.NotEmpty(t, e.Error.Message)
		})
	}
}

// BenchmarkCheckPromptNested shows the work per byte stays flat however
// deep the nesting (ns/op grows linearly with the body, not with its
// square).
func BenchmarkCheckPromptNested(b *testing.B) {
	for _, size := range []int{20 << 10, 1 << 20} {
		body := []byte(nestedPrompt(9000, size))
		b.Run(byteSizeFlag{p: ptr(int64(size))}.String(), func(b *testing.B) {
			b.SetBytes(int64(len(body)))
			for b.Loop() {
				if _, err := parseRequest(body, false); err == nil {
					b.Fatal("nested prompt accepted")
				}
			}
		})
	}
}

func ptr[T any](v T) *T { return &v }

// syncBuffer collects log output from concurrent handlers.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// withCreds puts user:password@ into a backend URL.
func withCreds(raw, user, pass string) string {
	return strings.Replace(raw, "http://", "http://"+user+":"+pass+"@", 1)
}

// Credentials in backend URLs reach the backends and nothing else: not
// /metrics, /health, error answers nor logs (the old code showed the URL
// as given everywhere).
func TestBackendCredentialsNeverShown(t *testing.T) {
	secrets := []string{"alice", "s3cret", "bob", "t0psecret"}
	requireClean := func(t *testing.T, what, text string) {
		t.Helper()
		for _, s := range secrets {
			require.NotContains(t, text, s, "%s shows a credential", what)
		}
	}
	var logs syncBuffer
	logger := slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	p := newFake(nil)
	d := newFake(func(f *fakeVLLM) { f.failWith.Store(500); f.failN.Store(1) })
	dead := newFake(nil)
	dead.srv.Close()
	h := startRouterDeps(t, []*fakeVLLM{p}, []*fakeVLLM{d}, func(c *Config) {
		c.Prefill = []string{withCreds(p.srv.URL, "alice", "s3cret"), withCreds(dead.srv.URL, "bob", "t0psecret")}
		c.Decode = []string{withCreds(d.srv.URL, "alice", "s3cret")}
		c.DecodeAttempts, c.PrefillAttempts, c.FailThreshold = 1, 1, 1
	}, Deps{Logger: logger})

	// Round-robin: the first request prefills on the live P and fails on
	// D (500), the second tries the dead P (connection refused).
	resp, body := post(t, h.url+"/v1/completions", completionBody)
	require.Equal(t, http.StatusBadGateway, resp.StatusCode, body)
	require.Contains(t, body, "decode backend http://xxxxx@"+strings.TrimPrefix(d.srv.URL, "http://")+" answered 500")
	requireClean(t, "a 502 from D", body)
	resp, body = post(t, h.url+"/v1/completions", completionBody)
	require.Equal(t, http.StatusBadGateway, resp.StatusCode, body)
	require.Contains(t, body, "prefill backend http://xxxxx@"+strings.TrimPrefix(dead.srv.URL, "http://"))
	requireClean(t, "a 502 from a dead P", body)

	// The backend still got the credentials (no client Authorization).
	require.Equal(t, "Basic "+base64.StdEncoding.EncodeToString([]byte("alice:s3cret")), d.requestHeaders()[0].Get("Authorization"))

	rec := httptest.NewRecorder()
	promhttp.HandlerFor(h.reg, promhttp.HandlerOpts{}).ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/metrics", nil))
	require.Contains(t, rec.Body.String(), `backend="http://xxxxx@`)
	requireClean(t, "/metrics", rec.Body.String())

	_, detail := h.r.Healthy()
	health, err := json.Marshal(detail)
	require.NoError(t, err)
	require.Contains(t, string(health), "http://xxxxx@")
	requireClean(t, "/health", string(health))

	require.Contains(t, logs.String(), "backend ejected")
	requireClean(t, "the log", logs.String())

	err = Config{Prefill: []string{"http://alice:s3cret@h:1", "http://alice:s3cret@h:1"}, Decode: []string{"http://bob:t0psecret@h:2?q"}}.Validate()
	require.ErrorContains(t, err, "given twice")
	requireClean(t, "a config error", err.Error())
}

func TestRedactURL(t *testing.T) {
	for in, want := range map[string]string{
		"http://h:1":         "http://h:1",
		"http://u:p@h:1/x":   "http://xxxxx@h:1/x",
		"https://token@h":    "https://xxxxx@h",
		"http://u:p@h:1/%zz": "http://xxxxx@h:1/%zz", // does not parse
		"u:p@h:1/%zz":        "xxxxx@h:1/%zz",
	} {
		require.Equal(t, want, redactURL(in), in)
	}
	err := redactURLError(&url.Error{Op: "Post", URL: "http://u:***@h/v1", Err: context.DeadlineExceeded})
	require.Equal(t, `Post "http://xxxxx@h/v1": context deadline exceeded`, err.Error())
	require.ErrorIs(t, err, context.DeadlineExceeded)
}

// A P without the PegaFlow connector (no pegaflow_transfer_id in its
// kv_transfer_params) costs no KV-ready wait: D is called at once, the
// answer is counted and the warning logged once per backend; a malformed
// kv_transfer_params is a 502 at once. The old code waited the whole
// --kv-ready-timeout (30 s here) for each, past the 5 s deadline.
func TestPrefillWithoutPegaFlowParams(t *testing.T) {
	start := func(t *testing.T, raw string, policy OnKVTimeout) (*harness, *fakeVLLM, *fakeVLLM, *syncBuffer) {
		var logs syncBuffer
		p := newFake(func(f *fakeVLLM) { f.rawParams, f.readyState = raw, "none" })
		d := newFake(nil)
		h := startRouterDeps(t, []*fakeVLLM{p}, []*fakeVLLM{d}, func(c *Config) {
			c.KVReadyTimeout = 30 * time.Second
			c.OnKVTimeout = policy
		}, Deps{Logger: slog.New(slog.NewTextHandler(&logs, nil))})
		return h, p, d, &logs
	}
	for _, raw := range []string{"-", "null", `{"do_remote_prefill":true,"remote_block_ids":[1]}`} {
		t.Run("decode at once: "+raw, func(t *testing.T) {
			h, p, d, logs := start(t, raw, OnKVTimeoutDecodeAnyway)
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			for i := 0; i < 2; i++ {
				status, body := postCtx(t, ctx, h.url+"/v1/completions", completionBody)
				require.Equal(t, http.StatusOK, status, body)
				text, done := sseText(t, body, false)
				require.Equal(t, "Hello, world!", text)
				require.True(t, done)
			}
			name := h.r.prefill.backends()[0].name
			require.Equal(t, 2.0, testutil.ToFloat64(h.r.m.noKVParams.WithLabelValues(name)))
			require.Zero(t, testutil.ToFloat64(h.r.m.kvTimeouts), "no wait, so no wait expired")
			require.Equal(t, 1, strings.Count(logs.String(), "without PegaFlow kv_transfer_params"), "warned once per backend: %s", logs)
			kv := d.requests()[0]["kv_transfer_params"].(map[string]any)
			require.Equal(t, true, kv["do_remote_prefill"])
			require.Equal(t, p.requests()[0]["kv_transfer_params"].(map[string]any)["pegaflow_transfer_id"], kv["pegaflow_transfer_id"])
			require.Zero(t, h.r.transfers.liveCount())
		})
	}
	failures := []struct {
		name, raw string
		policy    OnKVTimeout
		status    int
		msg       string
	}{
		{"--on-kv-timeout fail answers 504 at once", "-", OnKVTimeoutFail, http.StatusGatewayTimeout, "returned no pegaflow_transfer_id"},
		{"malformed kv_transfer_params: 502 at once: [1]", `[1]`, OnKVTimeoutDecodeAnyway, http.StatusBadGateway, "not a JSON object"},
		{"malformed kv_transfer_params: 502 at once: string", `"x"`, OnKVTimeoutDecodeAnyway, http.StatusBadGateway, "not a JSON object"},
		{"malformed kv_transfer_params: 502 at once: number", `7`, OnKVTimeoutFail, http.StatusBadGateway, "not a JSON object"},
	}
	for _, tc := range failures {
		t.Run(tc.name, func(t *testing.T) {
			h, _, d, _ := start(t, tc.raw, tc.policy)
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			status, body := postCtx(t, ctx, h.url+"/v1/completions", completionBody)
			require.Equal(t, tc.status, status, body)
			require.Contains(t, body, tc.msg)
			require.Empty(t, d.requests(), "D never called")
		})
	}
}

// dialNoRead opens a connection with a tiny receive buffer, sends one
// request and never reads the answer: a client that stopped reading.
func dialNoRead(t *testing.T, addr, path, body string) net.Conn {
	t.Helper()
	d := net.Dialer{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) { serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096) })
		return errors.Join(err, serr)
	}}
	conn, err := d.Dial("tcp", addr)
	require.NoError(t, err)
	t.Cleanup(func() { conn.Close() })
	_, err = fmt.Fprintf(conn, "POST %s HTTP/1.1\r\nHost: router\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", path, len(body), body)
	require.NoError(t, err)
	return conn
}

// A client that never reads is cut after --client-write-timeout, although
// --idle-stream-timeout and --decode-timeout are far off: the handler
// ends (counted as client_stalled), D's request is cancelled, in-flight
// is back to 0 and the transfer released. The old code sat in Write for
// as long as the client kept the connection open.
func TestClientThatStopsReadingIsCut(t *testing.T) {
	cases := []struct {
		name string
		d    func(*fakeVLLM)
		body string
	}{
		{"stream", func(f *fakeVLLM) { f.flood = 32 << 10 }, completionBody},
		// A non-streaming answer is written in pieces, each under its own
		// deadline: this one is far larger than the socket buffers.
		{"non-streaming", func(f *fakeVLLM) { f.tokens = []string{strings.Repeat("x", 32<<20)} }, `{"model":"m","prompt":"x"}`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p, d := newFake(nil), newFake(tc.d)
			kv := &engineStub{delay: time.Millisecond}
			h := startRouter(t, []*fakeVLLM{p}, []*fakeVLLM{d}, func(c *Config) {
				c.ClientWriteTimeout = 300 * time.Millisecond
			}, kv)
			dialNoRead(t, strings.TrimPrefix(h.url, "http://"), "/v1/completions", tc.body)
			require.Eventually(t, func() bool {
				return testutil.ToFloat64(h.r.m.requests.WithLabelValues(outcomeStalled)) == 1
			}, 15*time.Second, 10*time.Millisecond, "handler ended, the request counted as client_stalled")
			dName := h.r.decode.backends()[0].name
			require.Zero(t, testutil.ToFloat64(h.r.m.inflight.WithLabelValues(roleDecode, dName)), "decode in-flight back to 0")
			require.Zero(t, h.r.transfers.liveCount())
			transfer := p.requests()[0]["kv_transfer_params"].(map[string]any)["pegaflow_transfer_id"].(string)
			_, released := kv.released.Load(transfer)
			require.True(t, released, "transfer released in the engine")
			if tc.name == "stream" {
				require.Eventually(t, d.floodCut.Load, 5*time.Second, 10*time.Millisecond, "D's request cancelled")
			}
		})
	}
}

// The write deadline is the connection's: a keep-alive connection that
// idled past --client-write-timeout still answers its next request, on a
// router route or any other (here echo's 404).
func TestWriteDeadlineSurvivesKeepAlive(t *testing.T) {
	h := startRouter(t, []*fakeVLLM{newFake(nil)}, []*fakeVLLM{newFake(nil)}, func(c *Config) {
		c.ClientWriteTimeout = 50 * time.Millisecond
	}, nil)
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 1}}
	defer client.CloseIdleConnections()
	for i, path := range []string{"/v1/completions", "/v1/completions", "/no-such-route"} {
		reused := false
		trace := &httptrace.ClientTrace{GotConn: func(info httptrace.GotConnInfo) { reused = info.Reused }}
		req, err := http.NewRequestWithContext(httptrace.WithClientTrace(context.Background(), trace), http.MethodPost, h.url+path, strings.NewReader(completionBody))
		require.NoError(t, err)
		resp, err := client.Do(req)
		require.NoError(t, err, path)
		_, err = io.ReadAll(resp.Body)
		require.NoError(t, err)
		resp.Body.Close()
		require.Equal(t, i > 0, reused, "request %d on the kept-alive connection", i)
		if path == "/no-such-route" {
			require.Equal(t, http.StatusNotFound, resp.StatusCode)
		} else {
			require.Equal(t, http.StatusOK, resp.StatusCode)
		}
		time.Sleep(150 * time.Millisecond) // past the last deadline
	}
}

// checkPrompt agrees with a decode-everything reference on every
// well-formed JSON value (as parseRequest hands it one).
func FuzzCheckPrompt(f *testing.F) {
	for _, s := range []string{`"s"`, `""`, `[1,-2]`, `[]`, `["a"]`, `["a","b"]`, `[[1]]`, `[[]]`, `[["s"]]`, `[1.5]`,
		`[ [ 1 , 2 ] ]`, `["\"]"]`, `null`, `{"a":1}`, `[[1],[2]]`, `[99999999999999999999]`, `[1,"a"]`} {
		f.Add([]byte(s))
	}
	isIDs := func(v any) bool {
		list, ok := v.([]any)
		if !ok || len(list) == 0 {
			return false
		}
		for _, e := range list {
			n, ok := e.(json.Number)
			if !ok {
				return false
			}
			if _, err := strconv.ParseInt(n.String(), 10, 64); err != nil {
				return false
			}
		}
		return true
	}
	isText := func(v any) bool { s, ok := v.(string); return ok && s != "" }
	f.Fuzz(func(t *testing.T, raw []byte) {
		if !json.Valid(raw) {
			return
		}
		dec := json.NewDecoder(bytes.NewReader(raw))
		dec.UseNumber()
		var v any
		if dec.Decode(&v) != nil {
			return // deeper than encoding/json goes: parseRequest never gets here
		}
		list, _ := v.([]any)
		want := isText(v) || isIDs(v) || len(list) == 1 && (isText(list[0]) || isIDs(list[0]))
		err := checkPrompt(raw)
		require.Equal(t, want, err == nil, "%s: %v", raw, err)
	})
}

// A client that sends the headers and half its body, then stalls, holds
// the handler no longer than --client-read-timeout: it gets 408 (and the
// connection closes), on the completion route and on /kv_ready alike.
func TestStalledBodyIsCutByReadTimeout(t *testing.T) {
	h := startRouter(t, []*fakeVLLM{newFake(nil)}, []*fakeVLLM{newFake(nil)},
		func(c *Config) { c.ClientReadTimeout = 200 * time.Millisecond }, nil)
	for _, path := range []string{"/v1/completions", "/kv_ready"} {
		t.Run(path, func(t *testing.T) {
			conn, err := net.Dial("tcp", strings.TrimPrefix(h.url, "http://"))
			require.NoError(t, err)
			defer conn.Close()
			body := completionBody
			_, err = fmt.Fprintf(conn, "POST %s HTTP/1.1\r\nHost: r\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s",
				path, len(body), body[:len(body)/2])
			require.NoError(t, err)
			t0 := time.Now()
			require.NoError(t, conn.SetReadDeadline(time.Now().Add(5*time.Second)))
			answer, _ := io.ReadAll(conn) // until the router closes the connection
			require.Less(t, time.Since(t0), 3*time.Second, "cut within the read timeout, not held")
			require.True(t, strings.HasPrefix(string(answer), "HTTP/1.1 408"), "answer: %q", answer)
			require.Contains(t, string(answer), "--client-read-timeout")
		})
	}
	// A whole body in time still streams for as long as it takes: the
	// deadline is the body's alone.
	resp, body := post(t, h.url+"/v1/completions", completionBody)
	require.Equal(t, http.StatusOK, resp.StatusCode, body)
}
