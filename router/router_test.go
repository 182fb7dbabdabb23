package router

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/labstack/echo/v4"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"
)

type harness struct {
	r    *Router
	url  string
	reg  *prometheus.Registry
	srv  *http.Server
	stop context.CancelFunc
}

func startRouter(t *testing.T, p, d []*fakeVLLM, mutate func(*Config), kv KVReadySource) *harness {
	t.Helper()
	return startRouterDeps(t, p, d, mutate, Deps{KVReady: kv})
}

// startRouterDeps is startRouter with the router's collaborators given
// (a logger, say); the metrics registry is always the harness's own.
func startRouterDeps(t *testing.T, p, d []*fakeVLLM, mutate func(*Config), deps Deps) *harness {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	cfg := DefaultConfig()
	for _, f := range p {
		cfg.Prefill = append(cfg.Prefill, f.srv.URL)
	}
	for _, f := range d {
		cfg.Decode = append(cfg.Decode, f.srv.URL+"/")
	}
	cfg.ListenAddr = lis.Addr().String()
	cfg.KVReadyTimeout = 2 * time.Second
	cfg.RetryBackoff = time.Millisecond
	cfg.HealthInterval = 0
	cfg.UpstreamClient = UpstreamClient(*legClientFlag)
	if mutate != nil {
		mutate(&cfg)
	}
	reg := prometheus.NewRegistry()
	deps.Registerer = reg
	r, err := New(cfg, deps)
	require.NoError(t, err)
	e := echo.New()
	r.Register(e)
	srv := &http.Server{Handler: e}
	go srv.Serve(lis)
	ctx, cancel := context.WithCancel(context.Background())
	go r.Run(ctx)
	h := &harness{r: r, url: "http://" + lis.Addr().String(), reg: reg, srv: srv, stop: cancel}
	t.Cleanup(func() {
		cancel()
		srv.Close()
		r.Close()
		for _, f := range append(p, d...) {
			f.Close()
		}
	})
	return h
}

func post(t *testing.T, url, body string, hdr ...string) (*http.Response, string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, url, strings.NewReader(body))
	require.NoError(t, err)
	req.Header.Set("Content-Type", "application/json")
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	data, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	resp.Body.Close()
	return resp, string(data)
}

// sseText joins the content of every data event and reports whether the
// stream ended with [DONE].
func sseText(t *testing.T, body string, chat bool) (string, bool) {
	t.Helper()
	var text strings.Builder
	done := false
	for _, line := range strings.Split(body, "\n") {
		data, ok := strings.CutPrefix(line, "data: ")
		if !ok {
			continue
		}
		if data == "[DONE]" {
			done = true
			continue
		}
		var chunk struct {
			Choices []struct {
				Text  string `json:"text"`
				Delta struct {
					Content string `json:"content"`
				} `json:"delta"`
			} `json:"choices"`
		}
		require.NoError(t, json.Unmarshal([]byte(data), &chunk), data)
		for _, c := range chunk.Choices {
			text.WriteString(c.Text + c.Delta.Content)
		}
	}
	return text.String(), done
}

const completionBody = `{"model":"tiny","prompt":"Say hello","max_tokens":16,"stream":true,"stream_options":{"include_usage":true}}`

func TestStreamingPDFlowWaitsForKVReady(t *testing.T) {
	cases := []struct {
		name       string
		readyDelay time.Duration
	}{
		{"ready after prefill answer", 100 * time.Millisecond},
		{"ready before prefill answer", -1},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p := newFake(func(f *fakeVLLM) { f.readyDelay = tc.readyDelay })
			d := newFake(nil)
			h := startRouter(t, []*fakeVLLM{p}, []*fakeVLLM{d}, nil, nil)
			resp, body := post(t, h.url+"/v1/completions", completionBody, "X-Request-Id", "req-1", "Authorization", "Bearer client-key")
			require.Equal(t, http.StatusOK, resp.StatusCode, body)
			require.Equal(t, "text/event-stream", resp.Header.Get("Content-Type"))
			text, done := sseText(t, body, false)
			require.Equal(t, "Hello, world!", text)
			require.True(t, done)

			pre := p.requests()[0]
			require.EqualValues(t, 1, pre["max_tokens"].(float64))
			require.Equal(t, false, pre["stream"])
			require.NotContains(t, pre, "stream_options")
			pkv := pre["kv_transfer_params"].(map[string]any)
			require.Equal(t, true, pkv["do_remote_decode"])
			require.NotEmpty(t, pkv["pegaflow_ready_token"])
			require.Equal(t, h.url+"/kv_ready", pkv["pegaflow_ready_url"])

			dec := d.requests()[0]
			require.EqualValues(t, 16, dec["max_tokens"].(float64))
			require.Equal(t, true, dec["stream"])
			dkv := dec["kv_transfer_params"].(map[string]any)
			require.Equal(t, true, dkv["do_remote_prefill"])
			require.Equal(t, pkv["pegaflow_transfer_id"], dkv["pegaflow_transfer_id"])
			require.EqualValues(t, 3, dkv["pegaflow_num_blocks"].(float64), "P's params reach D")
			require.NotContains(t, dkv, "pegaflow_ready_token", "the token stays between router and engine")
			d.mu.Lock()
			require.GreaterOrEqual(t, d.arrived[0].UnixNano(), p.readySent.Load(), "decode starts only after KV ready")
			require.Equal(t, "req-1", d.headers[0].Get("X-Request-Id"))
			require.Equal(t, "Bearer client-key", d.headers[0].Get("Authorization"))
			d.mu.Unlock()
			p.mu.Lock()
			require.Equal(t, "req-1", p.headers[0].Get("X-Request-Id"))
			p.mu.Unlock()
			require.Equal(t, 1.0, testutil.ToFloat64(h.r.m.requests.WithLabelValues("ok")))
			require.Equal(t, 1.0, testutil.ToFloat64(h.r.m.kvReadyWhen.WithLabelValues("callback")))
		})
	}
}

func TestNonStreamingChat(t *testing.T) {
	p, d := newFake(nil), newFake(nil)
	h := startRouter(t, []*fakeVLLM{p}, []*fakeVLLM{d}, nil, nil)
	resp, body := post(t, h.url+"/v1/chat/completions", `{"model":"tiny","messages":[{"role":"user","content":"hi"}],"max_completion_tokens":8}`)
	require.Equal(t, http.StatusOK, resp.StatusCode, body)
	var out struct {
		Choices []struct {
			Message struct{ Content string } `json:"message"`
		} `json:"choices"`
	}
	require.NoError(t, json.Unmarshal([]byte(body), &out))
	require.Equal(t, "Hello, world!", out.Choices[0].Message.Content)
	require.EqualValues(t, 1, p.requests()[0]["max_completion_tokens"].(float64))
	require.EqualValues(t, 8, d.requests()[0]["max_completion_tokens"].(float64))
}

func TestKVReadyNeverArrives(t *testing.T) {
	t.Run("decode-anyway", func(t *testing.T) {
		p := newFake(func(f *fakeVLLM) { f.readyState = "none" })
		d := newFake(nil)
		h := startRouter(t, []*fakeVLLM{p}, []*fakeVLLM{d}, func(c *Config) { c.KVReadyTimeout = 150 * time.Millisecond }, nil)
		start := time.Now()
		resp, body := post(t, h.url+"/v1/completions", completionBody)
		require.Equal(t, http.StatusOK, resp.StatusCode)
		text, _ := sseText(t, body, false)
		require.Equal(t, "Hello, world!", text)
		require.GreaterOrEqual(t, time.Since(start), 150*time.Millisecond)
		require.Equal(t, 1.0, testutil.ToFloat64(h.r.m.kvTimeouts))
	})
	t.Run("fail", func(t *testing.T) {
		p := newFake(func(f *fakeVLLM) { f.readyState = "none" })
		d := newFake(nil)
		h := startRouter(t, []*fakeVLLM{p}, []*fakeVLLM{d}, func(c *Config) {
			c.KVReadyTimeout = 100 * time.Millisecond
			c.OnKVTimeout = OnKVTimeoutFail
		}, nil)
		resp, body := post(t, h.url+"/v1/completions", completionBody)
		require.Equal(t, http.StatusGatewayTimeout, resp.StatusCode)
		require.Contains(t, body, `"type":"timeout_error"`)
		require.Empty(t, d.requests(), "decode never called")
	})
	t.Run("failed report applies the policy at once", func(t *testing.T) {
		p := newFake(func(f *fakeVLLM) { f.readyState = "failed" })
		d := newFake(nil)
		h := startRouter(t, []*fakeVLLM{p}, []*fakeVLLM{d}, func(c *Config) {
			c.KVReadyTimeout = 10 * time.Second
			c.OnKVTimeout = OnKVTimeoutFail
		}, nil)
		start := time.Now()
		resp, _ := post(t, h.url+"/v1/completions", completionBody)
		require.Equal(t, http.StatusGatewayTimeout, resp.StatusCode)
		require.Less(t, time.Since(start), 5*time.Second)
	})
}

// engineStub behaves like engine.AwaitTransfer/ReleaseTransfer: ready after
// a delay, and records releases.
type engineStub struct {
	delay    time.Duration
	fail     bool
	released sync.Map
}

func (s *engineStub) AwaitTransfer(ctx context.Context, id string) error {
	select {
	case <-time.After(s.delay):
		if s.fail {
			return errors.New("transfer failed: pool exhausted")
		}
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (s *engineStub) ReleaseTransfer(id string) { s.released.Store(id, true) }

func TestInProcessEngineReady(t *testing.T) {
	p := newFake(func(f *fakeVLLM) { f.readyState = "none" })
	d := newFake(nil)
	kv := &engineStub{delay: 20 * time.Millisecond}
	h := startRouter(t, []*fakeVLLM{p}, []*fakeVLLM{d}, nil, kv)
	resp, body := post(t, h.url+"/v1/completions", completionBody)
	require.Equal(t, http.StatusOK, resp.StatusCode, body)
	require.Equal(t, 1.0, testutil.ToFloat64(h.r.m.kvReadyWhen.WithLabelValues("engine")))
	require.Zero(t, testutil.ToFloat64(h.r.m.kvTimeouts))
}

func TestClientCancelStopsBothLegsAndReleases(t *testing.T) {
	p := newFake(nil)
	d := newFake(func(f *fakeVLLM) {
		f.gap = 200 * time.Millisecond
		f.tokens = strings.Split(strings.Repeat("x", 50), "")
	})
	kv := &engineStub{delay: time.Millisecond}
	h := startRouter(t, []*fakeVLLM{p}, []*fakeVLLM{d}, nil, kv)
	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, h.url+"/v1/completions", strings.NewReader(completionBody))
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	_, err = bufio.NewReader(resp.Body).ReadString('\n')
	require.NoError(t, err)
	cancel()
	resp.Body.Close()
	require.Eventually(t, func() bool {
		return testutil.ToFloat64(h.r.m.requests.WithLabelValues("client_cancelled")) == 1
	}, 5*time.Second, 10*time.Millisecond)
	transfer := p.requests()[0]["kv_transfer_params"].(map[string]any)["pegaflow_transfer_id"].(string)
	_, released := kv.released.Load(transfer)
	require.True(t, released, "transfer released in the engine")
	require.Eventually(t, func() bool { return h.r.decode.backends()[0].inflight.Load() == 0 }, 5*time.Second, 10*time.Millisecond,
		"decode leg cancelled")
}

func TestPrefillRetriesAndClientErrors(t *testing.T) {
	t.Run("503 then another P", func(t *testing.T) {
		bad := newFake(func(f *fakeVLLM) { f.failWith.Store(503); f.failN.Store(100) })
		good := newFake(nil)
		d := newFake(nil)
		h := startRouter(t, []*fakeVLLM{bad, good}, []*fakeVLLM{d}, nil, nil)
		for i := 0; i < 4; i++ {
			resp, body := post(t, h.url+"/v1/completions", completionBody)
			require.Equal(t, http.StatusOK, resp.StatusCode, body)
		}
		require.Positive(t, testutil.ToFloat64(h.r.m.retries.WithLabelValues("prefill")))
	})
	t.Run("connection refused then another P", func(t *testing.T) {
		dead := newFake(nil)
		dead.srv.Close()
		good := newFake(nil)
		h := startRouter(t, []*fakeVLLM{dead, good}, []*fakeVLLM{newFake(nil)}, nil, nil)
		for i := 0; i < 3; i++ {
			resp, _ := post(t, h.url+"/v1/completions", completionBody)
			require.Equal(t, http.StatusOK, resp.StatusCode)
		}
	})
	t.Run("4xx goes back unchanged", func(t *testing.T) {
		p := newFake(func(f *fakeVLLM) { f.failWith.Store(400); f.failN.Store(1) })
		h := startRouter(t, []*fakeVLLM{p, newFake(nil)}, []*fakeVLLM{newFake(nil)}, func(c *Config) { c.LB = LBLeastInflight }, nil)
		// With two P's the 400 may land on either; send until the faulty one answered.
		for i := 0; i < 10 && p.failN.Load() > 0; i++ {
			resp, body := post(t, h.url+"/v1/completions", completionBody)
			if resp.StatusCode == http.StatusBadRequest {
				require.Contains(t, body, "injected 400")
				require.Zero(t, testutil.ToFloat64(h.r.m.retries.WithLabelValues("prefill")), "4xx is not retried")
				return
			}
		}
		t.Fatal("the 400 never reached the client")
	})
	t.Run("all P down is 503 and ejects", func(t *testing.T) {
		p := newFake(func(f *fakeVLLM) { f.failWith.Store(500); f.failN.Store(100) })
		h := startRouter(t, []*fakeVLLM{p}, []*fakeVLLM{newFake(nil)}, func(c *Config) { c.FailThreshold = 2 }, nil)
		resp, body := post(t, h.url+"/v1/completions", completionBody)
		require.Equal(t, http.StatusBadGateway, resp.StatusCode, body)
		post(t, h.url+"/v1/completions", completionBody)
		resp, body = post(t, h.url+"/v1/completions", completionBody)
		require.Equal(t, http.StatusServiceUnavailable, resp.StatusCode)
		require.Contains(t, body, "no healthy prefill backend")
		ok, _ := h.r.Healthy()
		require.False(t, ok)
	})
}

func TestDecodeFailures(t *testing.T) {
	t.Run("before first byte: retried on another D", func(t *testing.T) {
		bad := newFake(func(f *fakeVLLM) { f.failWith.Store(502); f.failN.Store(100) })
		good := newFake(nil)
		h := startRouter(t, []*fakeVLLM{newFake(nil)}, []*fakeVLLM{bad, good}, nil, nil)
		for i := 0; i < 3; i++ {
			resp, body := post(t, h.url+"/v1/completions", completionBody)
			require.Equal(t, http.StatusOK, resp.StatusCode)
			text, done := sseText(t, body, false)
			require.Equal(t, "Hello, world!", text)
			require.True(t, done)
		}
		require.Positive(t, testutil.ToFloat64(h.r.m.retries.WithLabelValues("decode")))
	})
	t.Run("after first byte: error event, never silent", func(t *testing.T) {
		d := newFake(func(f *fakeVLLM) { f.breakAfter = 2 })
		h := startRouter(t, []*fakeVLLM{newFake(nil)}, []*fakeVLLM{d}, nil, nil)
		resp, body := post(t, h.url+"/v1/chat/completions", `{"model":"tiny","messages":[{"role":"user","content":"hi"}],"stream":true}`)
		require.Equal(t, http.StatusOK, resp.StatusCode)
		require.Contains(t, body, `"error":`)
		require.True(t, strings.HasSuffix(body, "data: [DONE]\n\n"))
		require.Equal(t, 1.0, testutil.ToFloat64(h.r.m.requests.WithLabelValues("failed")))
	})
	t.Run("stall before first byte hits the idle timeout", func(t *testing.T) {
		slow := newFake(func(f *fakeVLLM) { f.gap = time.Second; f.tokens = []string{"a", "b"} })
		h := startRouter(t, []*fakeVLLM{newFake(nil)}, []*fakeVLLM{slow}, func(c *Config) { c.IdleStreamTimeout = 100 * time.Millisecond }, nil)
		resp, body := post(t, h.url+"/v1/completions", completionBody)
		require.Equal(t, http.StatusOK, resp.StatusCode)
		require.Contains(t, body, `"error":`, "a stalled stream ends with an error event")
	})
}

// A D stream that ends with D's own error event (vLLM's in-band error
// after some tokens, then [DONE]) is relayed as sent and counted failed,
// not ok; a token whose text merely says "error" is still ok.
func TestDecodeInBandErrorCountsFailed(t *testing.T) {
	cases := []struct {
		name, event string
		tokens      []string
		want        string
	}{
		{"error member", `{"error":{"message":"engine died","type":"InternalServerError","code":500}}`, nil, outcomeFailed},
		{"object error", `{"object":"error","message":"engine died","type":"InternalServerError","code":500}`, nil, outcomeFailed},
		{"spaced keys", `{ "error" : { "message" : "x" } }`, nil, outcomeFailed},
		{"null error is none", `{"choices":[],"error":null}`, nil, outcomeOK},
		{"token text says error", "", []string{`{"error":`, `"object":"error"`}, outcomeOK},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			d := newFake(func(f *fakeVLLM) {
				f.errorEvent = tc.event
				if tc.tokens != nil {
					f.tokens = tc.tokens
				}
			})
			h := startRouter(t, []*fakeVLLM{newFake(nil)}, []*fakeVLLM{d}, nil, nil)
			resp, body := post(t, h.url+"/v1/completions", completionBody)
			require.Equal(t, http.StatusOK, resp.StatusCode)
			require.Equal(t, 1, strings.Count(body, "data: [DONE]"), "D's stream relayed as sent, nothing appended:\n%s", body)
			if tc.event != "" {
				require.Contains(t, body, "data: "+tc.event+"\n\n")
			}
			for _, o := range []string{outcomeOK, outcomeFailed} {
				want := 0.0
				if o == tc.want {
					want = 1
				}
				require.Equal(t, want, testutil.ToFloat64(h.r.m.requests.WithLabelValues(o)), "outcome %s", o)
			}
			ok, detail := h.r.Healthy()
			require.True(t, ok, "a live backend's error event does not eject it: %v", detail)
		})
	}
}

func TestKVReadyEndpoint(t *testing.T) {
	h := startRouter(t, []*fakeVLLM{newFake(nil)}, []*fakeVLLM{newFake(nil)}, nil, nil)
	h.r.transfers.register("t-1", "secret")
	cases := []struct {
		name, body string
		status     int
	}{
		{"not json", `{`, 400},
		{"bad status", `{"transfer_id":"t-1","token":"secret","status":"maybe"}`, 400},
		{"unknown transfer", `{"transfer_id":"t-9","token":"secret","status":"ready"}`, 404},
		{"wrong token", `{"transfer_id":"t-1","token":"guess","status":"ready"}`, 403},
		{"ok", `{"transfer_id":"t-1","token":"secret","status":"ready"}`, 200},
		{"idempotent", `{"transfer_id":"t-1","token":"secret","status":"ready"}`, 200},
	}
	for _, tc := range cases {
		resp, body := post(t, h.url+"/kv_ready", tc.body)
		require.Equal(t, tc.status, resp.StatusCode, "%s: %s", tc.name, body)
	}
	require.Equal(t, 1.0, testutil.ToFloat64(h.r.m.kvRejected.WithLabelValues("bad_token")))
	require.Equal(t, 1.0, testutil.ToFloat64(h.r.m.kvRejected.WithLabelValues("unknown_transfer")))
}

func TestInputValidation(t *testing.T) {
	h := startRouter(t, []*fakeVLLM{newFake(nil)}, []*fakeVLLM{newFake(nil)}, func(c *Config) { c.MaxBodyBytes = 2048 }, nil)
	cases := []struct {
		name, path, body string
		status           int
	}{
		{"not json", "/v1/completions", `hello`, 400},
		{"missing model", "/v1/completions", `{"prompt":"x"}`, 400},
		{"missing prompt", "/v1/completions", `{"model":"m"}`, 400},
		{"batched prompts", "/v1/completions", `{"model":"m","prompt":["a","b"]}`, 400},
		{"n>1", "/v1/completions", `{"model":"m","prompt":"a","n":2}`, 400},
		{"empty messages", "/v1/chat/completions", `{"model":"m","messages":[]}`, 400},
		{"too large", "/v1/completions", `{"model":"m","prompt":"` + strings.Repeat("x", 4096) + `"}`, 413},
	}
	for _, tc := range cases {
		resp, body := post(t, h.url+tc.path, tc.body)
		require.Equal(t, tc.status, resp.StatusCode, "%s: %s", tc.name, body)
		var e struct {
			Error struct{ Message string } `json:"error"`
		}
		require.NoError(t, json.Unmarshal([]byte(body), &e), tc.name)
		require.NotEmpty(t, e.Error.Message, tc.name)
	}
	// Token-id prompts are one prompt, not a batch.
	resp, _ := post(t, h.url+"/v1/completions", `{"model":"m","prompt":[1,2,3]}`)
	require.Equal(t, http.StatusOK, resp.StatusCode)
}

func TestAPIKey(t *testing.T) {
	h := startRouter(t, []*fakeVLLM{newFake(nil)}, []*fakeVLLM{newFake(nil)}, func(c *Config) { c.APIKey = "k" }, nil)
	resp, _ := post(t, h.url+"/v1/completions", completionBody)
	require.Equal(t, http.StatusUnauthorized, resp.StatusCode)
	resp, _ = post(t, h.url+"/v1/completions", completionBody, "Authorization", "Bearer k")
	require.Equal(t, http.StatusOK, resp.StatusCode)
}

func TestSyncHandoffPassesParamsThrough(t *testing.T) {
	p, d := newFake(func(f *fakeVLLM) { f.readyState = "none" }), newFake(nil)
	h := startRouter(t, []*fakeVLLM{p}, []*fakeVLLM{d}, func(c *Config) { c.Handoff = HandoffSync }, nil)
	resp, _ := post(t, h.url+"/v1/completions", completionBody)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	dkv := d.requests()[0]["kv_transfer_params"].(map[string]any)
	require.Equal(t, map[string]any{"do_remote_prefill": true, "do_remote_decode": false,
		"pegaflow_transfer_id": p.requests()[0]["kv_transfer_params"].(map[string]any)["pegaflow_transfer_id"],
		"pegaflow_num_blocks":  3.0}, dkv)
}

func TestModelsAndActiveHealth(t *testing.T) {
	d := newFake(nil)
	h := startRouter(t, []*fakeVLLM{newFake(nil)}, []*fakeVLLM{d}, func(c *Config) { c.HealthInterval = 20 * time.Millisecond }, nil)
	resp, err := http.Get(h.url + "/v1/models")
	require.NoError(t, err)
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	require.Contains(t, string(body), `"tiny"`)
	d.unhealthy.Store(true)
	require.Eventually(t, func() bool { ok, _ := h.r.Healthy(); return !ok }, 5*time.Second, 10*time.Millisecond)
	r2, body2 := post(t, h.url+"/v1/completions", completionBody)
	require.Equal(t, http.StatusServiceUnavailable, r2.StatusCode)
	require.Contains(t, body2, "no healthy decode backend")
	d.unhealthy.Store(false)
	require.Eventually(t, func() bool { ok, _ := h.r.Healthy(); return ok }, 5*time.Second, 10*time.Millisecond)
}

// GET /v1/models runs under the answer leg's policy: another D on a 5xx,
// at most --decode-attempts of them, and no count in retries_total.
func TestModelsRetriesAreCapped(t *testing.T) {
	ds := []*fakeVLLM{newFake(nil), newFake(nil), newFake(nil)}
	for _, d := range ds {
		d.modelsFail.Store(http.StatusServiceUnavailable)
	}
	h := startRouter(t, []*fakeVLLM{newFake(nil)}, ds, func(c *Config) { c.DecodeAttempts = 2 }, nil)
	resp, err := http.Get(h.url + "/v1/models")
	require.NoError(t, err)
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	require.Equal(t, http.StatusBadGateway, resp.StatusCode)
	require.Contains(t, string(body), "injected 503")
	calls := 0
	for _, d := range ds {
		calls += int(d.modelsCalls.Load())
		require.LessOrEqual(t, d.modelsCalls.Load(), int32(1), "each attempt on another D")
	}
	require.Equal(t, 2, calls)
	require.Zero(t, testutil.ToFloat64(h.r.m.retries.WithLabelValues(roleDecode)))

	for _, d := range ds {
		d.modelsFail.Store(http.StatusNotFound)
	}
	resp, err = http.Get(h.url + "/v1/models")
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, http.StatusNotFound, resp.StatusCode, "the backend's 4xx goes back as it is")
	calls = 0
	for _, d := range ds {
		calls += int(d.modelsCalls.Load())
	}
	require.Equal(t, 3, calls, "a 4xx is not retried")
}

func TestConcurrentRequests(t *testing.T) {
	ps := []*fakeVLLM{newFake(nil), newFake(nil)}
	ds := []*fakeVLLM{newFake(nil), newFake(nil)}
	h := startRouter(t, ps, ds, func(c *Config) { c.LB = LBLeastInflight }, &engineStub{delay: time.Millisecond})
	var wg sync.WaitGroup
	var ok atomic.Int32
	for i := 0; i < 40; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, err := http.Post(h.url+"/v1/completions", "application/json", strings.NewReader(completionBody))
			if err != nil {
				return
			}
			data, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == 200 && strings.Contains(string(data), "[DONE]") {
				ok.Add(1)
			}
		}()
	}
	wg.Wait()
	require.EqualValues(t, 40, ok.Load())
	for _, f := range append(ps, ds...) {
		require.NotEmpty(t, f.requests(), "load spread over every backend")
	}
}

func TestConfigValidate(t *testing.T) {
	c := DefaultConfig()
	require.ErrorContains(t, c.Validate(), "--prefill")
	c.Prefill, c.Decode = []string{"http://p:1"}, []string{"ftp://d"}
	c.Handoff = "later"
	err := c.Validate()
	require.ErrorContains(t, err, "ftp://d")
	require.ErrorContains(t, err, "--handoff")
	c.Decode, c.Handoff = []string{"http://d:2"}, HandoffSync
	require.NoError(t, c.Validate())
	c.ListenAddr = "0.0.0.0:8080"
	require.Equal(t, "http://127.0.0.1:8080/kv_ready", c.readyURL())
	c.InternalAddr = "10.0.0.5:9000"
	require.Equal(t, "http://10.0.0.5:9000/kv_ready", c.readyURL())
}

var _ = fmt.Sprintf

// With no other backend to retry on, a refused connection fails at once
// (counted, ejecting); a 5xx keeps the backoff before giving up. Over real
// sockets: a closed port refuses, a fake answers 503.
func TestFailFastWithNothingToRetryOn(t *testing.T) {
	slowRetries := func(c *Config) {
		c.RetryBackoff, c.RetryBackoffMax, c.FailThreshold = 2*time.Second, 2*time.Second, 1
	}
	closedPort := func() *fakeVLLM {
		f := newFake(nil)
		f.srv.Close()
		return f
	}
	cases := []struct {
		name     string
		p, d     *fakeVLLM
		role     string
		fastest  time.Duration // lower bound on the answer's time
		slowest  time.Duration // upper bound
		wantCode int
	}{
		{"refused P", closedPort(), newFake(nil), rolePrefill, 0, time.Second, http.StatusBadGateway},
		{"refused D", newFake(nil), closedPort(), roleDecode, 0, time.Second, http.StatusBadGateway},
		{"503 P keeps the backoff", newFake(func(f *fakeVLLM) { f.failWith.Store(503); f.failN.Store(100) }), newFake(nil), rolePrefill,
			time.Second, 10 * time.Second, http.StatusBadGateway},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			h := startRouter(t, []*fakeVLLM{tc.p}, []*fakeVLLM{tc.d}, slowRetries, nil)
			t0 := time.Now()
			resp, body := post(t, h.url+"/v1/completions", completionBody)
			took := time.Since(t0)
			require.Equal(t, tc.wantCode, resp.StatusCode, body)
			require.GreaterOrEqual(t, took, tc.fastest)
			require.Less(t, took, tc.slowest)
			require.Equal(t, 1.0, testutil.ToFloat64(h.r.m.requests.WithLabelValues(outcomeFailed)), "counted")
			ok, detail := h.r.Healthy()
			require.False(t, ok, "the failure ejects (fail threshold 1): %v", detail)
		})
	}
	t.Run("refused with another P left retries there", func(t *testing.T) {
		h := startRouter(t, []*fakeVLLM{closedPort(), newFake(nil)}, []*fakeVLLM{newFake(nil)},
			func(c *Config) { c.RetryBackoff, c.RetryBackoffMax = time.Millisecond, time.Millisecond }, nil)
		for i := 0; i < 3; i++ {
			resp, body := post(t, h.url+"/v1/completions", completionBody)
			require.Equal(t, http.StatusOK, resp.StatusCode, body)
		}
	})
}

// The legs keep their backend connections alive: sequential prefill legs
// (JSON answers) reuse one connection; decode streams keep theirs too,
// though the next request may overtake a stream's connection on its way
// back to the pool (its last chunk drains off the request's path) and
// dial another.
func TestLegsReuseConnections(t *testing.T) {
	p, d := newFake(nil), newFake(nil)
	h := startRouter(t, []*fakeVLLM{p}, []*fakeVLLM{d}, nil, nil)
	const n = 20
	for i := range n {
		body := completionBody
		if i%2 == 1 {
			body = strings.Replace(completionBody, `"stream":true`, `"stream":false`, 1)
		}
		resp, out := post(t, h.url+"/v1/completions", body)
		require.Equal(t, http.StatusOK, resp.StatusCode, out)
	}
	legs := func(f *fakeVLLM) (total, most int, conns map[string]int) {
		f.mu.Lock()
		conns = maps.Clone(f.legConns)
		f.mu.Unlock()
		for _, c := range conns {
			total += c
			most = max(most, c)
		}
		return total, most, conns
	}
	total, _, conns := legs(p)
	require.Equal(t, n, total)
	require.Len(t, conns, 1, "P: one kept-alive connection for %d sequential legs: %v", n, conns)
	total, most, conns := legs(d)
	require.Equal(t, n, total)
	require.GreaterOrEqual(t, most, n/2, "D: connections kept, not one per request: %v", conns)
}
