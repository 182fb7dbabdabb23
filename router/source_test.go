package router

import (
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestSourceEngineReachesDecode: where the KV is (the /kv_ready report's
// source_engine, else P's pegaflow_source_engine) reaches D as
// pegaflow_source_engine; a value the client sent never does.
func TestSourceEngineReachesDecode(t *testing.T) {
	clientParams := `,"kv_transfer_params":{"pegaflow_source_engine":"client:1","x":1}`
	cases := []struct {
		name                      string
		readySource, paramsSource string
		readyDelay                time.Duration
		want                      string // "": no such key at D
	}{
		{"report's value", "10.0.0.7:7100", "", 50 * time.Millisecond, "10.0.0.7:7100"},
		{"report's value, reported before P answered", "p-engine-0.pegaflow:7100", "", -1, "p-engine-0.pegaflow:7100"},
		{"report wins over P's params", "[fd00::7]:7100", "10.0.0.9:7100", 50 * time.Millisecond, "[fd00::7]:7100"},
		{"P's params when the report has none", "", "10.0.0.9:7100", 50 * time.Millisecond, "10.0.0.9:7100"},
		{"P's params when it reported first", "", "p:7100", -1, "p:7100"},
		{"P's malformed value is dropped", "", "not a host", 0, ""},
		{"absent: same host, no key", "", "", 0, ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p := newFake(func(f *fakeVLLM) {
				f.readySource, f.paramsSource, f.readyDelay = tc.readySource, tc.paramsSource, tc.readyDelay
			})
			d := newFake(nil)
			h := startRouter(t, []*fakeVLLM{p}, []*fakeVLLM{d}, nil, nil)
			body := strings.TrimSuffix(completionBody, "}") + clientParams + "}"
			resp, out := post(t, h.url+"/v1/completions", body)
			require.Equal(t, http.StatusOK, resp.StatusCode, out)
			_, done := sseText(t, out, false)
			require.True(t, done)
			reqs := d.requests()
			require.Len(t, reqs, 1)
			kv, _ := reqs[0]["kv_transfer_params"].(map[string]any)
			require.NotNil(t, kv)
			require.NotContains(t, kv, "x", "the client's params never reach D")
			if tc.want == "" {
				require.NotContains(t, kv, kvSourceEngine)
				return
			}
			require.Equal(t, tc.want, kv[kvSourceEngine])
			require.Equal(t, true, kv["do_remote_prefill"])
		})
	}
}

func TestKVReadySourceEngineValidation(t *testing.T) {
	h := startRouter(t, []*fakeVLLM{newFake(nil)}, []*fakeVLLM{newFake(nil)}, nil, nil)
	h.r.transfers.register("t-1", "secret")
	report := func(source string) string {
		return `{"transfer_id":"t-1","token":"secret","status":"ready","source_engine":` + source + `}`
	}
	for _, bad := range []string{`"p1"`, `"p1:"`, `":7100"`, `"p1:0"`, `"p1:65536"`, `"p1:+80"`, `"p1:http"`,
		`"http://p1:7100"`, `"p 1:7100"`, `"p1/x:7100"`, `"user@p1:7100"`, `"::1:7100"`, `7100`, `{}`,
		`"` + strings.Repeat("a", 300) + `:7100"`} {
		resp, body := post(t, h.url+"/kv_ready", report(bad))
		require.Equal(t, http.StatusBadRequest, resp.StatusCode, "%s: %s", bad, body)
	}
	select {
	case <-h.r.transfers.live["t-1"].done:
		t.Fatal("a rejected report settled the transfer")
	default:
	}
	for _, good := range []string{`"10.0.0.7:7100"`, `"[fd00::1]:7100"`, `"p-0.prefill.ns.svc.cluster.local:7100"`, `null`} {
		resp, body := post(t, h.url+"/kv_ready", report(good))
		require.Equal(t, http.StatusOK, resp.StatusCode, "%s: %s", good, body)
	}
	require.Equal(t, "10.0.0.7:7100", h.r.transfers.live["t-1"].reportedSource(), "the first accepted report's source counts")
}
