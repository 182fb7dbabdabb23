package router

import (
	"bytes"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"testing/iotest"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"
)

func newTestBudget(limit int64) *answerBudget {
	return &answerBudget{limit: limit, gauge: prometheus.NewGauge(prometheus.GaugeOpts{Name: "g"}),
		refused: prometheus.NewCounter(prometheus.CounterOpts{Name: "c"})}
}

// Every byte an answer holds is granted first and given back on release;
// a body read in chunks is never held twice.
func TestAnswerBudgetRead(t *testing.T) {
	cases := []struct {
		name        string
		size, hint  int
		limit       int64
		budget      int64
		want        error
		wantHeldMax int64 // most the answer may hold
	}{
		{name: "small, length known", size: 100, hint: 100, limit: 1 << 20, budget: 1 << 20, wantHeldMax: 100},
		{name: "small, chunked", size: 100, hint: -1, limit: 1 << 20, budget: 1 << 20, wantHeldMax: firstChunk},
		{name: "empty", size: 0, hint: -1, limit: 1 << 20, budget: 1 << 20, wantHeldMax: firstChunk},
		{name: "large, chunked", size: 3 << 20, hint: -1, limit: 8 << 20, budget: 8 << 20, wantHeldMax: 2*(3<<20) + firstChunk},
		{name: "longer than declared", size: 200, hint: 100, limit: 1 << 20, budget: 1 << 20, wantHeldMax: 100 + firstChunk},
		{name: "cut at the limit", size: 5000, hint: -1, limit: 4096, budget: 1 << 20, wantHeldMax: 4096},
		{name: "length known, over the budget", size: 2 << 20, hint: 2 << 20, limit: 8 << 20, budget: 1 << 20, want: errAnswerTooLarge},
		{name: "chunked, over the budget", size: 2 << 20, hint: -1, limit: 8 << 20, budget: 1 << 20, want: errAnswerTooLarge},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			b := newTestBudget(tc.budget)
			body := bytes.Repeat([]byte("x"), tc.size)
			a, err := b.read(iotest.HalfReader(bytes.NewReader(body)), int64(tc.hint), tc.limit)
			require.LessOrEqual(t, b.peak.Load(), tc.budget)
			if tc.want != nil {
				require.ErrorIs(t, err, tc.want)
				require.Zero(t, b.used.Load(), "a refused answer gives its bytes back")
				require.Equal(t, 1.0, testutil.ToFloat64(b.refused))
				return
			}
			require.NoError(t, err)
			require.LessOrEqual(t, a.held, tc.wantHeldMax)
			require.Equal(t, a.held, b.used.Load())
			got, err := a.bytes()
			require.NoError(t, err)
			require.Equal(t, body[:min(int64(tc.size), tc.limit)], got)
			a.release()
			a.release()
			require.Zero(t, b.used.Load())
			require.Zero(t, testutil.ToFloat64(b.gauge))
		})
	}
	t.Run("busy", func(t *testing.T) {
		b := newTestBudget(1 << 20)
		held, err := b.read(bytes.NewReader(make([]byte, 600<<10)), 600<<10, 1<<20)
		require.NoError(t, err)
		_, err = b.read(bytes.NewReader(make([]byte, 600<<10)), 600<<10, 1<<20)
		require.ErrorIs(t, err, errBusy, "fits alone, not beside the other")
		held.release()
		again, err := b.read(bytes.NewReader(make([]byte, 600<<10)), 600<<10, 1<<20)
		require.NoError(t, err)
		again.release()
		require.Zero(t, b.used.Load())
	})
}

// Many clients whose large answers arrive together: the router holds at
// most --max-buffered-bytes of them; the others get 503 with Retry-After
// (counted), not a 2 GB router. The backend declares each answer's length
// and holds the rest of the body until the test lets it go, so which
// answers are held at once does not depend on timing.
func TestBufferedAnswersStayWithinBudget(t *testing.T) {
	const (
		clients    = 8
		answerSize = 1536 << 10 // 1.5 MiB: two fit in 4 MiB, three do not
		budget     = 4 << 20
		fit        = budget / answerSize
	)
	answer := []byte(`{"choices":[{"text":"` + strings.Repeat("x", answerSize-len(`{"choices":[{"text":""}]}`)) + `"}]}`)
	require.Len(t, answer, answerSize)
	release := make(chan struct{})
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Content-Length", strconv.Itoa(len(answer)))
		_, _ = w.Write(answer[:1])
		w.(http.Flusher).Flush()
		<-release
		_, _ = w.Write(answer[1:])
	}))
	defer backend.Close()
	var once sync.Once
	letGo := func() { once.Do(func() { close(release) }) }
	defer letGo() // before backend.Close, which waits for the handlers
	h := startRouter(t, nil, nil, func(c *Config) {
		c.Backends = []string{backend.URL}
		c.MaxBufferedBytes = budget
	}, nil)

	type result struct {
		status     int
		retryAfter string
		body       []byte
		err        error
	}
	results := make(chan result, clients)
	var wg sync.WaitGroup
	for range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, err := http.Post(h.url+"/v1/completions", "application/json", strings.NewReader(`{"model":"m","prompt":"hi"}`))
			if err != nil {
				results <- result{err: err}
				return
			}
			defer resp.Body.Close()
			body, err := io.ReadAll(resp.Body)
			results <- result{status: resp.StatusCode, retryAfter: resp.Header.Get("Retry-After"), body: body, err: err}
		}()
	}
	var refused []result
	for range clients - fit {
		select { // only the refused can answer before release
		case res := <-results:
			require.NoError(t, res.err)
			refused = append(refused, res)
		case <-time.After(30 * time.Second):
			t.Fatalf("%d of %d clients answered while %d answers were held: the router buffers past its budget", len(refused), clients-fit, fit)
		}
	}
	require.Equal(t, float64(clients-fit), testutil.ToFloat64(h.r.m.bufferRefusals))
	require.Equal(t, int64(fit*answerSize), h.r.budget.used.Load(), "the answers held are granted in full")
	require.Equal(t, float64(fit*answerSize), testutil.ToFloat64(h.r.m.bufferedBytes))
	letGo()
	wg.Wait()
	close(results)

	for _, res := range refused {
		require.Equal(t, http.StatusServiceUnavailable, res.status, "%s", res.body)
		require.Equal(t, retryAfterBusy, res.retryAfter)
		require.Contains(t, string(res.body), `"message":"the router's buffered answers are at --max-buffered-bytes: retry later"`)
		require.Contains(t, string(res.body), `"type":"service_unavailable"`)
	}
	ok := 0
	for res := range results {
		require.NoError(t, res.err)
		require.Equal(t, http.StatusOK, res.status)
		require.Equal(t, answer, res.body)
		ok++
	}
	require.Equal(t, fit, ok)
	require.LessOrEqual(t, h.r.budget.peak.Load(), int64(budget))
	require.Zero(t, h.r.budget.used.Load())
	require.Zero(t, testutil.ToFloat64(h.r.m.bufferedBytes))
	require.Zero(t, testutil.ToFloat64(h.r.m.retries.WithLabelValues(roleAggregated)), "a refusal is no backend's fault: not retried")
}

// One answer larger than the whole budget can never be buffered: 502,
// whether its length is declared or it comes chunked.
func TestAnswerLargerThanBudget(t *testing.T) {
	for _, declared := range []bool{true, false} {
		t.Run("declared="+strconv.FormatBool(declared), func(t *testing.T) {
			big := bytes.Repeat([]byte("y"), 3<<20)
			backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if declared {
					w.Header().Set("Content-Length", strconv.Itoa(len(big)))
				}
				_, _ = w.Write(big)
			}))
			defer backend.Close()
			h := startRouter(t, nil, nil, func(c *Config) {
				c.Backends = []string{backend.URL}
				c.MaxBufferedBytes = 1 << 20
			}, nil)
			resp, body := post(t, h.url+"/v1/completions", `{"model":"m","prompt":"hi"}`)
			require.Equal(t, http.StatusBadGateway, resp.StatusCode, body)
			require.Contains(t, body, "larger than the router's --max-buffered-bytes")
			require.Empty(t, resp.Header.Get("Retry-After"))
			require.Zero(t, h.r.budget.used.Load())
		})
	}
}

// P's answer is under the same budget: one larger than all of it fails the
// request (502) without a retry on another P or a decode.
func TestPrefillAnswerUnderBudget(t *testing.T) {
	big := []byte(`{"kv_transfer_params":{},"x":"` + strings.Repeat("z", 2<<20) + `"}`)
	p := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = w.Write(big) // chunked: no declared length
	}))
	defer p.Close()
	d := newFake(nil)
	h := startRouter(t, nil, []*fakeVLLM{d}, func(c *Config) {
		c.Prefill = []string{p.URL}
		c.MaxBufferedBytes = 1 << 20
	}, nil)
	defer d.Close()
	resp, body := post(t, h.url+"/v1/completions", completionBody)
	require.Equal(t, http.StatusBadGateway, resp.StatusCode, body)
	require.Contains(t, body, "larger than the router's --max-buffered-bytes")
	require.Empty(t, d.requests(), "no decode leg")
	require.Zero(t, testutil.ToFloat64(h.r.m.retries.WithLabelValues(rolePrefill)))
	require.Equal(t, 1.0, testutil.ToFloat64(h.r.m.bufferRefusals))
	require.Zero(t, h.r.budget.used.Load())
}
