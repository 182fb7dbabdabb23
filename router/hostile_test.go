package router

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
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
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, strings.NewReader(body))
	require.NoError(t, err)
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err, "no answer before the deadline")
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return resp.StatusCode, string(data)
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
	start := func(t *testing.T, raw string, policy string) (*harness, *fakeVLLM, *fakeVLLM, *syncBuffer) {
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
			name := h.r.prefill.backends[0].name
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
		name, raw, policy string
		status            int
		msg               string
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
