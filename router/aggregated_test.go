package router

import (
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"
)

// startAggregated serves a router in aggregated mode (--backend) in front
// of backends.
func startAggregated(t *testing.T, backends []*fakeVLLM, mutate func(*Config)) *harness {
	t.Helper()
	t.Cleanup(func() {
		for _, f := range backends {
			f.Close()
		}
	})
	return startRouter(t, nil, nil, func(c *Config) {
		for _, f := range backends {
			c.Backends = append(c.Backends, f.srv.URL)
		}
		if mutate != nil {
			mutate(c)
		}
	}, nil)
}

func TestAggregatedRoundRobinPassesBodyThrough(t *testing.T) {
	a, b := newFake(nil), newFake(nil)
	h := startAggregated(t, []*fakeVLLM{a, b}, nil)
	for i := 0; i < 4; i++ {
		resp, body := post(t, h.url+"/v1/completions", completionBody, "X-Request-Id", "agg-1", "Authorization", "Bearer k")
		require.Equal(t, http.StatusOK, resp.StatusCode, body)
		text, done := sseText(t, body, false)
		require.Equal(t, "Hello, world!", text)
		require.True(t, done)
	}
	require.Len(t, a.requests(), 2, "round-robin alternates")
	require.Len(t, b.requests(), 2, "round-robin alternates")
	var want map[string]any
	require.NoError(t, json.Unmarshal([]byte(completionBody), &want))
	require.Equal(t, want, a.requests()[0], "the body goes through unchanged: no prefill leg, no router kv_transfer_params")
	a.mu.Lock()
	require.Equal(t, "agg-1", a.headers[0].Get("X-Request-Id"))
	require.Equal(t, "Bearer k", a.headers[0].Get("Authorization"))
	a.mu.Unlock()

	// Non-streaming, and what P/D rejects (n>1) is the backend's to judge.
	resp, body := post(t, h.url+"/v1/chat/completions", `{"model":"tiny","messages":[{"role":"user","content":"hi"}],"n":2}`)
	require.Equal(t, http.StatusOK, resp.StatusCode, body)
	require.Contains(t, body, "Hello, world!")

	require.Equal(t, 5.0, testutil.ToFloat64(h.r.m.requests.WithLabelValues(outcomeOK)))
	require.Zero(t, testutil.ToFloat64(h.r.m.retries.WithLabelValues(roleAggregated)))
	metrics, err := h.reg.Gather()
	require.NoError(t, err)
	var sawTTFT bool
	for _, mf := range metrics {
		for _, m := range mf.GetMetric() {
			labels := map[string]string{}
			for _, l := range m.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			require.Equal(t, modeAggregated, labels["mode"], mf.GetName())
			if mf.GetName() == "pegaflow_router_phase_seconds" {
				require.NotContains(t, []string{"prefill", "kv_ready_wait", "decode_first_byte"}, labels["phase"])
				sawTTFT = sawTTFT || (labels["phase"] == "ttft" && m.GetHistogram().GetSampleCount() == 4)
			}
		}
	}
	require.True(t, sawTTFT, "ttft observed for every stream")
}

func TestAggregatedRetriesBeforeFirstByte(t *testing.T) {
	bad := newFake(func(f *fakeVLLM) { f.failWith.Store(503); f.failN.Store(100) })
	good := newFake(nil)
	h := startAggregated(t, []*fakeVLLM{bad, good}, func(c *Config) { c.FailThreshold = 100 })
	for i := 0; i < 4; i++ {
		resp, body := post(t, h.url+"/v1/completions", completionBody)
		require.Equal(t, http.StatusOK, resp.StatusCode, body)
		text, done := sseText(t, body, false)
		require.Equal(t, "Hello, world!", text)
		require.True(t, done)
	}
	require.Len(t, good.requests(), 4)
	require.Positive(t, testutil.ToFloat64(h.r.m.retries.WithLabelValues(roleAggregated)))
}

// Aggregated mode passes the client's body through, but not the
// kv_transfer_params keys only the router may set: a client's
// pegaflow_ready_url would make the backend's connector POST where the
// client chose, its do_remote_* make vLLM wait for or hold KV nobody sends.
func TestAggregatedDropsRouterOnlyKVParams(t *testing.T) {
	cases := []struct{ name, in, want string }{
		{"none", `{"prompt":"x"}`, `{"prompt":"x"}`},
		{"only others", `{"kv_transfer_params":{"mine":1}}`, `{"kv_transfer_params":{"mine":1}}`},
		{"not an object", `{"kv_transfer_params":"pegaflow_ready_url"}`, `{"kv_transfer_params":"pegaflow_ready_url"}`},
		{"router keys", `{"prompt":"x","kv_transfer_params":{"pegaflow_ready_url":"http://evil/","mine":1,"do_remote_prefill":true,` +
			`"pegaflow_transfer_id":"t","do_remote_decode":true,"pegaflow_ready_token":"k","pegaflow_source_engine":"e:1"},"n":1}`,
			`{"prompt":"x","kv_transfer_params":{"mine":1},"n":1}`},
		{"escaped key", `{"kv_transfer_params":{"\u0070egaflow_ready_url":"http://evil/"}}`, `{"kv_transfer_params":{}}`},
		{"escaped top key", `{"kv_transfer_p\u0061rams":{"do_remote_decode":true, "a" : [1]}}`, `{"kv_transfer_p\u0061rams":{"a" : [1]}}`},
		{"every duplicate", `{"kv_transfer_params":{"do_remote_decode":true},"kv_transfer_params":{"pegaflow_x":1,"b":2}}`,
			`{"kv_transfer_params":{},"kv_transfer_params":{"b":2}}`},
		{"space around", " \n{ \"kv_transfer_params\" : { \"pegaflow_ready_url\" : \"u\" , \"m\" : 2 } } ", `{"kv_transfer_params" : {"m" : 2}}`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := parseAggregated([]byte(tc.in))
			require.NoError(t, err)
			got := aggregatedBody([]byte(tc.in))
			require.True(t, json.Valid(got), "%s", got)
			require.Equal(t, tc.want, strings.TrimSpace(string(got)))
		})
	}

	a := newFake(nil)
	h := startAggregated(t, []*fakeVLLM{a}, nil)
	resp, body := post(t, h.url+"/v1/completions", `{"model":"tiny","prompt":"hi","max_tokens":2,"kv_transfer_params":`+
		`{"pegaflow_ready_url":"http://169.254.169.254/latest","pegaflow_ready_token":"t","pegaflow_transfer_id":"x",`+
		`"do_remote_decode":true,"do_remote_prefill":true,"client_key":"kept"}}`)
	require.Equal(t, http.StatusOK, resp.StatusCode, body)
	require.Len(t, a.requests(), 1)
	require.Equal(t, map[string]any{"client_key": "kept"}, a.requests()[0]["kv_transfer_params"])
}

func TestAggregatedFailures(t *testing.T) {
	t.Run("a 4xx goes back unchanged", func(t *testing.T) {
		a := newFake(func(f *fakeVLLM) { f.failWith.Store(422); f.failN.Store(1) })
		h := startAggregated(t, []*fakeVLLM{a}, nil)
		resp, body := post(t, h.url+"/v1/completions", completionBody)
		require.Equal(t, 422, resp.StatusCode)
		require.Contains(t, body, "injected 422")
	})
	t.Run("the backend's message reaches the client", func(t *testing.T) {
		a := newFake(func(f *fakeVLLM) { f.failWith.Store(500); f.failN.Store(100) })
		h := startAggregated(t, []*fakeVLLM{a}, nil)
		resp, body := post(t, h.url+"/v1/completions", completionBody)
		require.Equal(t, http.StatusBadGateway, resp.StatusCode)
		require.Contains(t, body, "aggregated backend "+a.srv.URL+" answered 500: injected 500")
	})
	t.Run("after the first byte: error event and [DONE]", func(t *testing.T) {
		a := newFake(func(f *fakeVLLM) { f.breakAfter = 2 })
		h := startAggregated(t, []*fakeVLLM{a}, nil)
		resp, body := post(t, h.url+"/v1/completions", completionBody)
		require.Equal(t, http.StatusOK, resp.StatusCode)
		require.Contains(t, body, `"error":`)
		require.True(t, strings.HasSuffix(body, "data: [DONE]\n\n"))
	})
	t.Run("nothing healthy is 503", func(t *testing.T) {
		a := newFake(nil)
		h := startAggregated(t, []*fakeVLLM{a}, nil)
		a.unhealthy.Store(true)
		h.r.checker.checkAll(t.Context())
		ok, detail := h.r.Healthy()
		require.False(t, ok)
		require.Equal(t, map[string]bool{a.srv.URL: false}, detail[roleAggregated])
		resp, body := post(t, h.url+"/v1/completions", completionBody)
		require.Equal(t, http.StatusServiceUnavailable, resp.StatusCode)
		require.Contains(t, body, "no healthy aggregated backend")
	})
	t.Run("bad input is 400, batches are passed on", func(t *testing.T) {
		a := newFake(nil)
		h := startAggregated(t, []*fakeVLLM{a}, nil)
		resp, _ := post(t, h.url+"/v1/completions", `[1]`)
		require.Equal(t, http.StatusBadRequest, resp.StatusCode)
		resp, _ = post(t, h.url+"/v1/completions", `{"model":"m","prompt":"x","stream":"yes"}`)
		require.Equal(t, http.StatusBadRequest, resp.StatusCode)
		resp, _ = post(t, h.url+"/v1/completions", `{"model":"m","prompt":["a","b"]}`)
		require.Equal(t, http.StatusOK, resp.StatusCode)
	})
}

func TestAggregatedModelsAndNoKVReady(t *testing.T) {
	a := newFake(nil)
	h := startAggregated(t, []*fakeVLLM{a}, nil)
	resp, err := http.Get(h.url + "/v1/models")
	require.NoError(t, err)
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Contains(t, string(body), `"tiny"`)
	resp, _ = post(t, h.url+"/kv_ready", `{"transfer_id":"t","token":"x","status":"ready"}`)
	require.NotEqual(t, http.StatusOK, resp.StatusCode, "no transfers in aggregated mode")
}

func TestConfigAggregated(t *testing.T) {
	cases := []struct {
		name     string
		p, d, b  []string
		enabled  bool
		errParts []string
	}{
		{name: "backends only", b: []string{"http://a:1", "http://b:2"}, enabled: true},
		{name: "with prefill", p: []string{"http://p:1"}, b: []string{"http://a:1"}, enabled: true,
			errParts: []string{"--backend (aggregated mode) cannot be combined with --prefill/--decode"}},
		{name: "with decode", d: []string{"http://d:1"}, b: []string{"http://a:1"}, enabled: true,
			errParts: []string{"cannot be combined"}},
		{name: "bad backend", b: []string{"ftp://a"}, enabled: true, errParts: []string{`--backend "ftp://a"`}},
		{name: "twice", b: []string{"http://a:1", "http://a:1/"}, enabled: true, errParts: []string{"given twice"}},
		{name: "none", enabled: false, errParts: []string{"--prefill"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := DefaultConfig()
			c.Prefill, c.Decode, c.Backends = tc.p, tc.d, tc.b
			require.Equal(t, tc.enabled, c.Enabled())
			err := c.Validate()
			if len(tc.errParts) == 0 {
				require.NoError(t, err)
				return
			}
			for _, part := range tc.errParts {
				require.ErrorContains(t, err, part)
			}
		})
	}
}
