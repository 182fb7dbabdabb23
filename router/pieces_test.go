package router

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"

	"github.com/pegaflow/pegaflow/internal/cli"
	"github.com/pegaflow/pegaflow/internal/ids"
)

// The legs' policy from the retry flags: doubled per retry, capped by
// --retry-backoff-max, with equal jitter.
func TestRetryDelayBounds(t *testing.T) {
	cases := []struct {
		name          string
		backoff, maxD time.Duration
		n             int
		lo, hi        time.Duration
	}{
		{"first retry", 50 * time.Millisecond, time.Second, 1, 25 * time.Millisecond, 50 * time.Millisecond},
		{"doubled", 50 * time.Millisecond, time.Second, 2, 50 * time.Millisecond, 100 * time.Millisecond},
		{"doubled twice", 50 * time.Millisecond, time.Second, 3, 100 * time.Millisecond, 200 * time.Millisecond},
		{"capped", 50 * time.Millisecond, time.Second, 10, 500 * time.Millisecond, time.Second},
		{"far past the cap (no overflow)", 50 * time.Millisecond, time.Second, 1000, 500 * time.Millisecond, time.Second},
		{"cap equals backoff", time.Second, time.Second, 5, 500 * time.Millisecond, time.Second},
		{"no backoff", 0, time.Second, 3, 0, 0},
		{"not a retry", 50 * time.Millisecond, time.Second, 0, 0, 0},
		{"1ns", time.Nanosecond, time.Nanosecond, 1, time.Nanosecond, time.Nanosecond},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p := newLegPolicy(Config{RetryBackoff: tc.backoff, RetryBackoffMax: tc.maxD}, nil, 3).policy
			require.Equal(t, 3, p.Attempts)
			for i := 0; i < 200; i++ {
				d := p.Delay(tc.n)
				require.GreaterOrEqual(t, d, tc.lo)
				require.LessOrEqual(t, d, tc.hi)
			}
		})
	}
}

func TestRetryWaitHonoursContext(t *testing.T) {
	p := newLegPolicy(Config{RetryBackoff: time.Hour, RetryBackoffMax: time.Hour}, nil, 3).policy
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	require.ErrorIs(t, p.Wait(ctx, 1), context.Canceled)
	require.NoError(t, newLegPolicy(Config{}, nil, 3).policy.Wait(context.Background(), 1))
}

func TestAttemptError(t *testing.T) {
	b := newBackend(roleDecode, "http://d:1")
	cases := []struct {
		name      string
		err       *attemptError
		retryable bool
		fault     bool
		msg       string
	}{
		{"transport", &attemptError{backend: b, err: errors.New("connection refused")}, true, true,
			"decode backend http://d:1: connection refused"},
		{"500 with OpenAI message", &attemptError{backend: b, status: 500, body: []byte(`{"error":{"message":"CUDA out of memory","code":500}}`)}, true, true,
			"decode backend http://d:1 answered 500: CUDA out of memory"},
		{"503 plain text", &attemptError{backend: b, status: 503, body: []byte("overloaded\n")}, true, true,
			"decode backend http://d:1 answered 503: overloaded"},
		{"502 html", &attemptError{backend: b, status: 502, body: []byte("<html>bad gateway</html>")}, true, true,
			"decode backend http://d:1 answered 502"},
		{"429", &attemptError{backend: b, status: 429}, true, false, "decode backend http://d:1 answered 429"},
		{"400 detail", &attemptError{backend: b, status: 400, body: []byte(`{"detail":"bad prompt"}`)}, false, false,
			"decode backend http://d:1 answered 400: bad prompt"},
		{"404 string error", &attemptError{backend: b, status: 404, body: []byte(`{"error":"no such model"}`)}, false, false,
			"decode backend http://d:1 answered 404: no such model"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			require.Equal(t, tc.retryable, tc.err.retryable())
			require.Equal(t, tc.fault, tc.err.backendFault())
			require.Equal(t, tc.msg, tc.err.Error())
		})
	}
	long := (&attemptError{backend: b, status: 500, body: []byte(strings.Repeat("é", 600))}).Error()
	msg := strings.TrimPrefix(long, "decode backend http://d:1 answered 500: ")
	require.LessOrEqual(t, len(msg), 515, "the backend's message is bounded (internal/openai)")
	require.True(t, strings.HasSuffix(msg, "..."))
	require.True(t, strings.HasPrefix(msg, "é"))
}

func TestPoolSelection(t *testing.T) {
	now := time.Now()
	cases := []struct {
		name    string
		setup   func(p *pool) []*backend // returns exclude
		want    []int                    // acceptable indexes; empty: nil
		p2c     bool
		repeats int
	}{
		{"skips an unhealthy backend", func(p *pool) []*backend { p.backends()[0].activeOK.Store(false); return nil }, []int{1, 2}, false, 10},
		{"skips an ejected backend", func(p *pool) []*backend {
			p.backends()[1].ejectedUntil = now.Add(time.Hour)
			return nil
		}, []int{0, 2}, false, 10},
		{"skips excluded", func(p *pool) []*backend { return []*backend{p.backends()[0], p.backends()[2]} }, []int{1}, false, 10},
		{"nothing left", func(p *pool) []*backend {
			p.backends()[0].activeOK.Store(false)
			return []*backend{p.backends()[1], p.backends()[2]}
		}, nil, false, 3},
		{"p2c takes the less loaded", func(p *pool) []*backend {
			p.backends()[0].inflight.Store(5)
			p.backends()[2].inflight.Store(7)
			return nil
		}, []int{0, 1}, true, 50},
		{"p2c skips excluded", func(p *pool) []*backend { return []*backend{p.backends()[1]} }, []int{0, 2}, true, 20},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			lb := LBRoundRobin
			if tc.p2c {
				lb = LBLeastInflight
			}
			p := newPool(rolePrefill, []string{"http://a:1", "http://b:2/", "http://c:3"}, newSelector(lb, ""))
			require.Equal(t, "http://b:2", p.backends()[1].base)
			exclude := tc.setup(p)
			for i := 0; i < tc.repeats; i++ {
				got := p.pick(exclude, nil)
				if len(tc.want) == 0 {
					require.Nil(t, got)
					continue
				}
				require.NotNil(t, got)
				idx := -1
				for j, b := range p.backends() {
					if b == got {
						idx = j
					}
				}
				require.Contains(t, tc.want, idx)
			}
		})
	}
	t.Run("round-robin alternates", func(t *testing.T) {
		p := newPool(roleDecode, []string{"http://a:1", "http://b:2"}, newSelector(LBRoundRobin, ""))
		var seq []string
		for i := 0; i < 4; i++ {
			seq = append(seq, p.pick(nil, nil).base)
		}
		require.Equal(t, []string{"http://a:1", "http://b:2", "http://a:1", "http://b:2"}, seq)
		require.Equal(t, 2, p.healthyCount())
	})
	t.Run("p2c with two candidates always takes the lesser", func(t *testing.T) {
		p := newPool(roleDecode, []string{"http://a:1", "http://b:2"}, newSelector(LBLeastInflight, ""))
		p.backends()[0].inflight.Store(3)
		for i := 0; i < 20; i++ {
			require.Same(t, p.backends()[1], p.pick(nil, nil))
		}
	})
}

func TestPassiveHealth(t *testing.T) {
	b := newBackend(rolePrefill, "http://p:1")
	b.activeOK.Store(true)
	t0 := time.Now()
	require.False(t, b.report(false, 2, time.Second, t0))
	require.True(t, b.healthy(t0))
	require.True(t, b.report(false, 2, time.Second, t0), "threshold reached: ejected")
	require.False(t, b.healthy(t0))
	require.False(t, b.report(false, 2, time.Second, t0), "already out: no second ejection")
	after := t0.Add(time.Second)
	require.True(t, b.healthy(after), "cool-down over: half-open")
	require.True(t, b.report(false, 2, time.Second, after), "fails again at once: ejected again")
	later := after.Add(time.Second)
	require.False(t, b.report(true, 2, time.Second, later))
	require.False(t, b.report(false, 2, time.Second, later), "a success closed it: the count starts over")
}

// chunkReader returns the given chunks one per Read.
type chunkReader struct{ chunks []string }

func (c *chunkReader) Read(p []byte) (int, error) {
	if len(c.chunks) == 0 {
		return 0, io.EOF
	}
	n := copy(p, c.chunks[0])
	if n < len(c.chunks[0]) {
		c.chunks[0] = c.chunks[0][n:]
	} else {
		c.chunks = c.chunks[1:]
	}
	return n, nil
}

// writeRecorder keeps every Write separately.
type writeRecorder struct{ writes []string }

func (w *writeRecorder) Write(p []byte) (int, error) {
	w.writes = append(w.writes, string(p))
	return len(p), nil
}

func TestRelayEventBoundaries(t *testing.T) {
	const tok1, tok2 = `data: {"choices":[{"text":"a"}]}`, `data: {"choices":[{"text":"b"}]}`
	cases := []struct {
		name    string
		chunks  []string
		writes  []string
		tokens  int
		wantErr error
	}{
		{"one event per read", []string{tok1 + "\n\n", tok2 + "\n\n", "data: [DONE]\n\n"},
			[]string{tok1 + "\n\n", tok2 + "\n\n", "data: [DONE]\n\n"}, 2, nil},
		{"events split mid-line", []string{tok1[:5], tok1[5:] + "\n", "\n" + tok2[:3], tok2[3:] + "\n\ndata: [DONE]\n\n"},
			[]string{tok1 + "\n\n", tok2 + "\n\ndata: [DONE]\n\n"}, 2, nil},
		{"terminator split across reads", []string{tok1 + "\n", "\n", "data: [DONE]\n", "\n"},
			[]string{tok1 + "\n\n", "data: [DONE]\n\n"}, 1, nil},
		{"two events in one read are one write", []string{tok1 + "\n\n" + tok2 + "\n\ndata: [D", "ONE]\n\n"},
			[]string{tok1 + "\n\n" + tok2 + "\n\n", "data: [DONE]\n\n"}, 2, nil},
		{"CRLF terminators", []string{tok1 + "\r\n\r\n", "data: [DONE]\r\n\r\n"},
			[]string{tok1 + "\r\n\r\n", "data: [DONE]\r\n\r\n"}, 1, nil},
		{"CRLF terminator split before its last byte", []string{tok1 + "\r\n\r", "\n", "data: [DONE]\r\n\r\n"},
			[]string{tok1 + "\r\n\r\n", "data: [DONE]\r\n\r\n"}, 1, nil},
		{"incomplete CRLF terminator waits", []string{tok1 + "\r\n\r", "\ndata: [DONE]\r\n\r\n"},
			[]string{tok1 + "\r\n\r\ndata: [DONE]\r\n\r\n"}, 1, nil},
		{"comment and usage are not tokens", []string{": keepalive\n\n", `data: {"choices":[],"usage":{}}` + "\n\n", "data: [DONE]\n\n"},
			[]string{": keepalive\n\n", `data: {"choices":[],"usage":{}}` + "\n\n", "data: [DONE]\n\n"}, 0, nil},
		{"no [DONE]", []string{tok1 + "\n\n"}, []string{tok1 + "\n\n"}, 1, errStreamTruncated},
		{"half an event is never written", []string{tok1 + "\n\n", tok2[:10]}, []string{tok1 + "\n\n"}, 1, errStreamTruncated},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var w writeRecorder
			began := 0
			var kinds []eventKind
			res, err := relaySSE(&w, func() error { return nil }, &chunkReader{chunks: append([]string(nil), tc.chunks...)}, relayHooks{
				begin:   func() { began++ },
				onEvent: func(k eventKind, _ time.Time) { kinds = append(kinds, k) },
			})
			if tc.wantErr != nil {
				require.ErrorIs(t, err, tc.wantErr)
			} else {
				require.NoError(t, err)
				require.True(t, res.done)
				require.Equal(t, eventDone, kinds[len(kinds)-1])
			}
			require.Equal(t, tc.writes, w.writes)
			require.Equal(t, tc.tokens, res.tokens)
			require.Equal(t, 1, began)
			require.True(t, res.wrote)
		})
	}
	t.Run("returns at [DONE] without waiting for EOF", func(t *testing.T) {
		// A backend that keeps the connection open after [DONE]: the relay
		// must not wait for it (a client hanging up then would otherwise
		// cancel an answer that is complete).
		src, hold := io.Pipe()
		defer hold.Close()
		go func() { _, _ = io.WriteString(hold, tok1+"\n\ndata: [DONE]\n\n") }()
		var w writeRecorder
		done := make(chan error, 1)
		var res relayResult
		go func() {
			var err error
			res, err = relaySSE(&w, func() error { return nil }, src, relayHooks{})
			done <- err
		}()
		select {
		case err := <-done:
			require.NoError(t, err)
			require.True(t, res.done)
			require.Equal(t, 1, res.tokens)
		case <-time.After(5 * time.Second):
			t.Fatal("relay waited for EOF after [DONE]")
		}
	})
	t.Run("client write error", func(t *testing.T) {
		_, err := relaySSE(failWriter{}, func() error { return nil }, &chunkReader{chunks: []string{tok1 + "\n\n"}}, relayHooks{})
		var cwe *clientWriteError
		require.ErrorAs(t, err, &cwe)
	})
	t.Run("event too large", func(t *testing.T) {
		big := strings.Repeat("x", maxEventBytes+1)
		var w writeRecorder
		res, err := relaySSE(&w, func() error { return nil }, strings.NewReader("data: "+big), relayHooks{})
		require.ErrorIs(t, err, errEventTooLarge)
		require.False(t, res.wrote)
	})
	t.Run("large event across many reads", func(t *testing.T) {
		big := `data: {"choices":[{"text":"` + strings.Repeat("y", 100<<10) + `"}]}` + "\n\n"
		var w writeRecorder
		res, err := relaySSE(&w, func() error { return nil }, strings.NewReader(big+"data: [DONE]\n\n"), relayHooks{})
		require.NoError(t, err)
		require.Equal(t, 1, res.tokens)
		require.Equal(t, big+"data: [DONE]\n\n", strings.Join(w.writes, ""))
	})
}

type failWriter struct{}

func (failWriter) Write([]byte) (int, error) { return 0, errors.New("broken pipe") }

func TestParseRequest(t *testing.T) {
	cases := []struct {
		name, body string
		chat       bool
		errPart    string
		stream     bool
	}{
		{"completion", `{"model":"m","prompt":"hi","stream":true}`, false, "", true},
		{"token ids", `{"model":"m","prompt":[1,2,3]}`, false, "", false},
		{"one prompt in a list", `{"model":"m","prompt":["hi"]}`, false, "", false},
		{"one token list in a list", `{"model":"m","prompt":[[1,2]]}`, false, "", false},
		{"chat", `{"model":"m","messages":[{"role":"user","content":"x"}],"stream":null}`, true, "", false},
		{"n=1 is fine", `{"model":"m","prompt":"x","n":1}`, false, "", false},
		{"not an object", `[1]`, false, "JSON object", false},
		{"broken JSON", `{"model":`, false, "not valid JSON", false},
		{"no model", `{"prompt":"x"}`, false, "'model'", false},
		{"model not a string", `{"model":3,"prompt":"x"}`, false, "'model'", false},
		{"stream not a bool", `{"model":"m","prompt":"x","stream":"yes"}`, false, "'stream'", false},
		{"n>1", `{"model":"m","prompt":"x","n":2}`, false, "'n' must be 1", false},
		{"best_of>1", `{"model":"m","prompt":"x","best_of":3}`, false, "best_of", false},
		{"no prompt", `{"model":"m"}`, false, "'prompt' is required", false},
		{"empty prompt", `{"model":"m","prompt":""}`, false, "empty", false},
		{"empty token list", `{"model":"m","prompt":[]}`, false, "empty", false},
		{"batch", `{"model":"m","prompt":["a","b"]}`, false, "batched prompts (2)", false},
		{"batch of token lists", `{"model":"m","prompt":[[1],[2]]}`, false, "batched", false},
		{"bad prompt type", `{"model":"m","prompt":{"a":1}}`, false, "must be a string", false},
		{"bad element", `{"model":"m","prompt":[{"a":1}]}`, false, "must be a string", false},
		{"white space in lists", `{"model":"m","prompt": [ [ 1 , -2 ] ] }`, false, "", false},
		{"white space in an id list", `{"model":"m","prompt":[ 1 ,2 ]}`, false, "", false},
		{"escaped quotes", `{"model":"m","prompt":["a\\\"]\"",1]}`, false, "must be a string", false},
		{"one empty string in a list", `{"model":"m","prompt":[""]}`, false, "empty", false},
		{"one empty token list in a list", `{"model":"m","prompt":[[]]}`, false, "empty", false},
		{"nested string list", `{"model":"m","prompt":[["s"]]}`, false, "must be a string", false},
		{"three levels", `{"model":"m","prompt":[[[1]]]}`, false, "must be a string", false},
		{"mixed list", `{"model":"m","prompt":[1,"a"]}`, false, "must be a string", false},
		{"fractional id", `{"model":"m","prompt":[1.5]}`, false, "must be a string", false},
		{"id beyond int64", `{"model":"m","prompt":[99999999999999999999]}`, false, "must be a string", false},
		{"prompt not a value", `{"model":"m","prompt":true}`, false, "must be a string", false},
		{"batch of three", `{"model":"m","prompt":["a","","c"]}`, false, "batched prompts (3)", false},
		{"messages not objects", `{"model":"m","messages":[[{"role":"user"}]]}`, true, "message objects", false},
		{"no messages", `{"model":"m"}`, true, "'messages'", false},
		{"empty messages", `{"model":"m","messages":[]}`, true, "'messages'", false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			req, err := parseRequest([]byte(tc.body), tc.chat)
			if tc.errPart != "" {
				var br *badRequest
				require.ErrorAs(t, err, &br)
				require.ErrorContains(t, err, tc.errPart)
				return
			}
			require.NoError(t, err)
			require.Equal(t, "m", req.model)
			require.Equal(t, tc.stream, req.stream)
		})
	}
}

func TestParseAggregated(t *testing.T) {
	cases := []struct {
		body   string
		stream bool
		ok     bool
	}{
		{`{"model":"m","prompt":["a","b"],"n":3,"stream":true}`, true, true},
		{` {"stream":false}`, false, true},
		{`{"stream":null}`, false, true},
		{`{}`, false, true},
		{`{"stream":"yes"}`, false, false},
		{`[]`, false, false},
		{`{"a":`, false, false},
		{``, false, false},
	}
	for _, tc := range cases {
		stream, err := parseAggregated([]byte(tc.body))
		if !tc.ok {
			require.Error(t, err, tc.body)
			continue
		}
		require.NoError(t, err, tc.body)
		require.Equal(t, tc.stream, stream, tc.body)
	}
}

func TestLegEncoding(t *testing.T) {
	decodeJSON := func(t *testing.T, b []byte) map[string]any {
		t.Helper()
		var m map[string]any
		require.NoError(t, json.Unmarshal(b, &m), string(b))
		return m
	}
	const body = `{"model":"m","prompt":"héllo <b>","max_tokens":64,"stream":true,"stream_options":{"include_usage":true},"kv_transfer_params":{"x":1},"temperature":0}`
	req, err := parseRequest([]byte(body), false)
	require.NoError(t, err)

	var pb, params bytes.Buffer
	req.prefillBody(&pb, prefillParams(&params, "tid-1", "http://r:8080/kv_ready", "tok\"1"))
	pre := decodeJSON(t, pb.Bytes())
	require.Equal(t, map[string]any{
		"model": "m", "prompt": "héllo <b>", "max_tokens": 1.0, "stream": false, "temperature": 0.0,
		"kv_transfer_params": map[string]any{"do_remote_decode": true, "do_remote_prefill": false,
			"pegaflow_transfer_id": "tid-1", "pegaflow_ready_url": "http://r:8080/kv_ready", "pegaflow_ready_token": "tok\"1"},
	}, pre, "max_completion_tokens is not added when absent")
	var again bytes.Buffer
	req.prefillBody(&again, prefillParams(&params, "tid-1", "http://r:8080/kv_ready", "tok\"1"))
	require.Equal(t, pb.String(), again.String(), "deterministic")

	chat, err := parseRequest([]byte(`{"model":"m","messages":[{"role":"user","content":"x"}],"max_completion_tokens":9}`), true)
	require.NoError(t, err)
	var cb bytes.Buffer
	chat.prefillBody(&cb, prefillParams(&params, "t", "", "k"))
	cpre := decodeJSON(t, cb.Bytes())
	require.Equal(t, 1.0, cpre["max_completion_tokens"])
	require.Equal(t, 1.0, cpre["max_tokens"])
	require.NotContains(t, cpre["kv_transfer_params"], kvReadyURL, "no URL when none is known")

	fromP := json.RawMessage(`{"do_remote_prefill":false,"remote_block_ids":[1,2],"pegaflow_ready_token":"leak","pegaflow_ready_url":"u"}`)
	dp := decodeParams(mustPrefillParams(t, fromP), "tid-1", "")
	var db bytes.Buffer
	req.decodeBody(&db, dp)
	dec := decodeJSON(t, db.Bytes())
	require.Equal(t, 64.0, dec["max_tokens"])
	require.Equal(t, true, dec["stream"])
	require.Equal(t, map[string]any{"include_usage": true}, dec["stream_options"])
	require.Equal(t, map[string]any{"do_remote_prefill": true, "do_remote_decode": false, "pegaflow_transfer_id": "tid-1",
		"remote_block_ids": []any{1.0, 2.0}}, dec["kv_transfer_params"], "P's params merged, router's keys win, no token")

	for _, raw := range []json.RawMessage{nil, json.RawMessage("null")} {
		dp := decodeParams(mustPrefillParams(t, raw), "t", "")
		require.JSONEq(t, `{"do_remote_prefill":true,"do_remote_decode":false,"pegaflow_transfer_id":"t"}`, string(dp))
	}
	_, err = parsePrefillParams(json.RawMessage(`[1]`))
	require.Error(t, err)

	var nb bytes.Buffer
	req.decodeBody(&nb, nil)
	require.NotContains(t, decodeJSON(t, nb.Bytes()), "kv_transfer_params")
}

func mustPrefillParams(t *testing.T, raw json.RawMessage) prefillKV {
	t.Helper()
	params, err := parsePrefillParams(raw)
	require.NoError(t, err)
	return params
}

func TestTransfersSettledIdempotency(t *testing.T) {
	now := time.Now()
	ts := newTransfers()
	tr := ts.register("t-1", "secret")
	steps := []struct {
		name  string
		do    func() reportResult
		want  reportResult
		ready bool
	}{
		{"wrong token while live", func() reportResult { return ts.report("t-1", "guess", true, "", "", now) }, reportBadToken, false},
		{"first report settles", func() reportResult { return ts.report("t-1", "secret", true, "", "", now) }, reportAccepted, true},
		{"repeat while live", func() reportResult { return ts.report("t-1", "secret", false, "late failure", "", now) }, reportAccepted, true},
		{"repeat after finish", func() reportResult {
			ts.finish(tr, now)
			return ts.report("t-1", "secret", true, "", "", now.Add(time.Minute))
		}, reportAccepted, true},
		{"wrong token after finish", func() reportResult { return ts.report("t-1", "guess", true, "", "", now) }, reportBadToken, true},
		{"after the settled TTL", func() reportResult { return ts.report("t-1", "secret", true, "", "", now.Add(settledTTL)) }, reportUnknown, true},
		{"never registered", func() reportResult { return ts.report("t-9", "secret", true, "", "", now) }, reportUnknown, true},
	}
	for _, s := range steps {
		require.Equal(t, s.want, s.do(), s.name)
		select {
		case <-tr.done:
			require.True(t, s.ready, s.name)
			require.True(t, tr.ready, "the first report wins: %s", s.name)
		default:
			require.False(t, s.ready, s.name)
		}
	}
	require.Zero(t, ts.liveCount())

	// finish of a transfer that is not (or no longer) live changes nothing.
	ts.finish(tr, now)
	ts.finish(&transfer{id: "t-1"}, now)
	require.Equal(t, reportAccepted, ts.report("t-1", "secret", true, "", "", now))

	// Memory stays bounded: the oldest settled transfers are forgotten.
	big := newTransfers()
	for i := 0; i < settledMax+100; i++ {
		big.finish(big.register(ids.Hex(4)+"-"+string(rune('a'+i%26)), "k"), now)
	}
	big.mu.Lock()
	n := len(big.settled)
	big.mu.Unlock()
	require.LessOrEqual(t, n, settledMax)
}

func TestAwaitTransfer(t *testing.T) {
	t.Run("report before the wait returns at once", func(t *testing.T) {
		ts := newTransfers()
		tr := ts.register("t", "k")
		ts.report("t", "k", true, "", "", time.Now())
		res := awaitTransfer(context.Background(), tr, &engineStub{delay: time.Hour}, time.Hour)
		require.Equal(t, waitResult{outcome: waitReady, source: sourceCallback}, res)
	})
	t.Run("failed report", func(t *testing.T) {
		ts := newTransfers()
		tr := ts.register("t", "k")
		ts.report("t", "k", false, "", "", time.Now())
		res := awaitTransfer(context.Background(), tr, nil, time.Hour)
		require.Equal(t, waitFailed, res.outcome)
		require.Equal(t, "reported failed", res.reason)
	})
	t.Run("engine first", func(t *testing.T) {
		tr := newTransfers().register("t", "k")
		res := awaitTransfer(context.Background(), tr, &engineStub{delay: time.Millisecond}, time.Hour)
		require.Equal(t, waitResult{outcome: waitReady, source: sourceEngine}, res)
	})
	t.Run("engine failure", func(t *testing.T) {
		tr := newTransfers().register("t", "k")
		res := awaitTransfer(context.Background(), tr, &engineStub{delay: time.Millisecond, fail: true}, time.Hour)
		require.Equal(t, waitFailed, res.outcome)
		require.Contains(t, res.reason, "pool exhausted")
	})
	t.Run("timeout", func(t *testing.T) {
		tr := newTransfers().register("t", "k")
		res := awaitTransfer(context.Background(), tr, &engineStub{delay: time.Hour}, 20*time.Millisecond)
		require.Equal(t, waitTimeout, res.outcome)
		res = awaitTransfer(context.Background(), tr, nil, 20*time.Millisecond)
		require.Equal(t, waitTimeout, res.outcome)
	})
	t.Run("client gone", func(t *testing.T) {
		tr := newTransfers().register("t", "k")
		ctx, cancel := context.WithCancel(context.Background())
		time.AfterFunc(10*time.Millisecond, cancel)
		res := awaitTransfer(ctx, tr, &engineStub{delay: time.Hour}, time.Hour)
		require.Equal(t, waitCancelled, res.outcome)
	})
}

// The failing leg's own message reaches the client in the JSON error.
func TestLegErrorMessagesReachTheClient(t *testing.T) {
	t.Run("decode 500", func(t *testing.T) {
		d := newFake(func(f *fakeVLLM) { f.failWith.Store(500); f.failN.Store(100) })
		h := startRouter(t, []*fakeVLLM{newFake(nil)}, []*fakeVLLM{d}, nil, nil)
		resp, body := post(t, h.url+"/v1/completions", completionBody)
		require.Equal(t, http.StatusBadGateway, resp.StatusCode)
		require.Contains(t, body, "decode backend "+d.srv.URL+" answered 500: injected 500")
	})
	t.Run("prefill timeout is 504 and names the flag", func(t *testing.T) {
		p := newFake(func(f *fakeVLLM) { f.prefillDelay = time.Second })
		h := startRouter(t, []*fakeVLLM{p}, []*fakeVLLM{newFake(nil)}, func(c *Config) {
			c.PrefillTimeout = 50 * time.Millisecond
			c.PrefillAttempts = 1
		}, nil)
		resp, body := post(t, h.url+"/v1/completions", completionBody)
		require.Equal(t, http.StatusGatewayTimeout, resp.StatusCode, body)
		require.Contains(t, body, "--prefill-timeout")
	})
	t.Run("a stall after the headers, before the first event, is retried", func(t *testing.T) {
		stalled := newFake(func(f *fakeVLLM) { f.stallFirst = time.Second })
		good := newFake(nil)
		h := startRouter(t, []*fakeVLLM{newFake(nil)}, []*fakeVLLM{stalled, good}, func(c *Config) {
			c.IdleStreamTimeout = 50 * time.Millisecond
		}, nil)
		for i := 0; i < 2; i++ {
			resp, body := post(t, h.url+"/v1/completions", completionBody)
			require.Equal(t, http.StatusOK, resp.StatusCode, body)
			text, done := sseText(t, body, false)
			require.Equal(t, "Hello, world!", text)
			require.True(t, done)
		}
		require.Equal(t, 1.0, testutil.ToFloat64(h.r.m.retries.WithLabelValues(roleDecode)))
	})
	t.Run("first-byte timeout is retried on another D", func(t *testing.T) {
		// The good D answers at once; the margin is for a loaded CI box.
		slow := newFake(func(f *fakeVLLM) { f.headerDelay = 5 * time.Second })
		good := newFake(nil)
		h := startRouter(t, []*fakeVLLM{newFake(nil)}, []*fakeVLLM{slow, good}, func(c *Config) {
			c.FirstByteTimeout = 400 * time.Millisecond
		}, nil)
		for i := 0; i < 2; i++ {
			resp, body := post(t, h.url+"/v1/completions", completionBody)
			require.Equal(t, http.StatusOK, resp.StatusCode, body)
			_, done := sseText(t, body, false)
			require.True(t, done)
		}
	})
}

func TestBindFlags(t *testing.T) {
	c := DefaultConfig()
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	BindFlags(fs, &c)
	require.Equal(t, "16MiB", fs.Lookup("max-body-bytes").DefValue)
	require.NoError(t, fs.Parse([]string{"--backend", "http://a:1", "--backend", "http://b:2", "--max-body-bytes", "1000001",
		"--decode-timeout", "5m", "--retry-backoff-max", "3s"}))
	require.Equal(t, []string{"http://a:1", "http://b:2"}, c.Backends)
	require.EqualValues(t, 1000001, c.MaxBodyBytes)
	require.Equal(t, "1000001", fs.Lookup("max-body-bytes").Value.String())
	require.Equal(t, 5*time.Minute, c.DecodeTimeout)
	require.Equal(t, 3*time.Second, c.RetryBackoffMax)
	require.True(t, c.Enabled())
	require.True(t, c.Aggregated())
	require.NoError(t, c.Validate())
	require.Error(t, fs.Parse([]string{"--max-body-bytes", "lots"}))

	require.Equal(t, UpstreamPegaFlow, c.UpstreamClient)
	require.NoError(t, cli.Parse(fs, nil, func(name string) (string, bool) {
		return string(UpstreamNetHTTP), name == "PEGAFLOW_UPSTREAM_CLIENT"
	}))
	require.Equal(t, UpstreamNetHTTP, c.UpstreamClient)
	require.NoError(t, c.Validate())
	c.UpstreamClient = "curl"
	require.ErrorContains(t, c.Validate(), `--upstream-client "curl": want pegaflow or nethttp`)
	c.UpstreamClient = UpstreamPegaFlow
	require.Equal(t, "256MiB", fs.Lookup("max-buffered-bytes").DefValue)
	require.NoError(t, fs.Parse([]string{"--max-buffered-bytes", "64MiB"}))
	require.EqualValues(t, 64<<20, c.MaxBufferedBytes)
	require.NoError(t, c.Validate())

	// The named policy types bind to their flags and PEGAFLOW_* variables
	// with the documented spellings.
	require.Equal(t, HandoffCallback, c.Handoff)
	require.Equal(t, "callback", fs.Lookup("handoff").DefValue)
	require.NoError(t, fs.Parse([]string{"--handoff", "sync", "--lb", "least-inflight"}))
	env := map[string]string{"PEGAFLOW_ON_KV_TIMEOUT": "fail"}
	require.NoError(t, cli.Parse(fs, nil, func(name string) (string, bool) { v, ok := env[name]; return v, ok }))
	require.Equal(t, HandoffSync, c.Handoff)
	require.Equal(t, LBLeastInflight, c.LB)
	require.Equal(t, OnKVTimeoutFail, c.OnKVTimeout)
	require.NoError(t, c.Validate())
	c.MaxBufferedBytes = 1<<20 - 1
	require.ErrorContains(t, c.Validate(), "--max-buffered-bytes must be at least 1MiB")
}

// Whatever the client sends, a body that passes validation gives legs that
// are valid JSON objects with the router's keys set.
func FuzzParseRequest(f *testing.F) {
	for _, s := range []string{completionBody, `{"model":"m","prompt":[1,2]}`, `{"model":"m","prompt":["\u00e9<>&"],"max_completion_tokens":3}`,
		`{"model":"m","messages":[{"role":"user","content":"x"}],"stream":true}`, `{"model":"m","prompt":"x","kv_transfer_params":null}`} {
		f.Add([]byte(s), false)
		f.Add([]byte(s), true)
	}
	f.Fuzz(func(t *testing.T, body []byte, chat bool) {
		req, err := parseRequest(body, chat)
		if err != nil {
			var br *badRequest
			require.ErrorAs(t, err, &br)
			return
		}
		var pb, params bytes.Buffer
		req.prefillBody(&pb, prefillParams(&params, "t\x00<", "http://r/kv_ready", "k"))
		var pre map[string]json.RawMessage
		require.NoError(t, json.Unmarshal(pb.Bytes(), &pre), pb.String())
		require.Equal(t, "1", string(pre["max_tokens"]))
		require.Equal(t, "false", string(pre["stream"]))
		require.NotContains(t, pre, "stream_options")
		dp := decodeParams(prefillKV{}, "t", "")
		var db bytes.Buffer
		req.decodeBody(&db, dp)
		var dec map[string]json.RawMessage
		require.NoError(t, json.Unmarshal(db.Bytes(), &dec), db.String())
		require.JSONEq(t, string(dp), string(dec["kv_transfer_params"]))
	})
}

// However the stream is cut into reads, the relay writes exactly the
// complete events, each write ending on an event boundary.
func FuzzRelayChunking(f *testing.F) {
	f.Add([]byte("data: {\"choices\":[1]}\n\ndata: [DONE]\n\n"), []byte{3, 7, 1})
	f.Add([]byte("data: a\r\n\r\ndata: b\n\npartial"), []byte{1, 1, 1, 1})
	f.Fuzz(func(t *testing.T, stream, cuts []byte) {
		var chunks []string
		rest := string(stream)
		for i := 0; len(rest) > 0; i++ {
			n := len(rest)
			if len(cuts) > 0 {
				n = min(int(cuts[i%len(cuts)])+1, len(rest))
			}
			chunks = append(chunks, rest[:n])
			rest = rest[n:]
		}
		var w writeRecorder
		res, _ := relaySSE(&w, func() error { return nil }, &chunkReader{chunks: chunks}, relayHooks{})
		got := strings.Join(w.writes, "")
		require.True(t, strings.HasPrefix(string(stream), got))
		if res.done {
			// The relay stops at the read that brought [DONE]: what it wrote
			// ends on an event boundary and holds the [DONE] event.
			require.LessOrEqual(t, len(got), lastEventEnd(stream, 0))
			var kinds []eventKind
			forEachEvent([]byte(got), func(k eventKind) { kinds = append(kinds, k) })
			require.Contains(t, kinds, eventDone)
		} else {
			require.Equal(t, lastEventEnd(stream, 0), len(got), "everything up to the last complete event, nothing after")
		}
		for _, wr := range w.writes {
			require.Equal(t, len(wr), lastEventEnd([]byte(wr), 0), "a write ends on an event boundary: %q", wr)
		}
	})
}

// The legs rewrite keys by name as encoding/json reads them: escaped
// keys and duplicates (the last counts) included, every other member
// verbatim.
func TestLegEncodingKeysAsDecoded(t *testing.T) {
	const body = `{"model":"x","model":"m","prompt":"p","max_tokens":5,"max_tokens":7,"stre\u0061m":true,"kv_transfer_params":{"a":1},"kv_transfer_params":null,"x":[1, {"y":"}"}]}`
	req, err := parseRequest([]byte(body), false)
	require.NoError(t, err)
	require.Equal(t, "m", req.model)
	require.True(t, req.stream, "an escaped key is the key")

	var pb, params bytes.Buffer
	req.prefillBody(&pb, prefillParams(&params, "t", "", "k"))
	var pre map[string]json.RawMessage
	require.NoError(t, json.Unmarshal(pb.Bytes(), &pre))
	require.Equal(t, "1", string(pre["max_tokens"]))
	require.Equal(t, "false", string(pre["stream"]))
	require.Equal(t, `[1, {"y":"}"}]`, string(pre["x"]), "other members verbatim")
	require.Equal(t, 1, strings.Count(pb.String(), `"max_tokens"`), "every duplicate replaced")
	require.NotContains(t, pb.String(), `stre\u0061m`)

	var db bytes.Buffer
	req.decodeBody(&db, nil)
	var dec map[string]json.RawMessage
	require.NoError(t, json.Unmarshal(db.Bytes(), &dec))
	require.NotContains(t, dec, "kv_transfer_params")
	require.Equal(t, "7", string(dec["max_tokens"]))
}

func TestPrefillAnswerParams(t *testing.T) {
	cases := []struct {
		answer, params, errPart string
	}{
		{`{"id":"p","kv_transfer_params":{"a":[1,"]"]}}`, `{"a":[1,"]"]}`, ""},
		{` {"kv_transfer_params":1,"kv_transfer_params":{"b":2}} trailing`, `{"b":2}`, ""},
		{`{"choices":[{"kv_transfer_params":{}}]}`, "", ""},
		{`null`, "", ""},
		{`[1]`, "", "array"},
		{`{"a":`, "", "unexpected end"},
		{``, "", "unexpected end"},
	}
	for _, tc := range cases {
		params, err := prefillAnswerParams([]byte(tc.answer))
		if tc.errPart != "" {
			require.ErrorContains(t, err, tc.errPart, tc.answer)
			continue
		}
		require.NoError(t, err, tc.answer)
		require.Equal(t, tc.params, string(params), tc.answer)
	}
}
