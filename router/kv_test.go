package router

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"

	"github.com/pegaflow/pegaflow/internal/vllmhash"
)

// fakeIndex behaves like the engines behind KVIndex: each engine holds
// some block hashes and answers the longest leading run of a query it
// holds; an engine may fail, or hang ignoring ctx (a dead peer whose
// client has no deadline of its own).
type fakeIndex struct {
	mu      sync.Mutex
	held    map[string]map[string]bool // engine -> hashes
	fail    map[string]bool
	hang    map[string]time.Duration
	bogus   map[string]int // engine -> an answer to give whatever is asked
	calls   map[string]int
	queries []KVQuery
}

func newFakeIndex() *fakeIndex {
	return &fakeIndex{held: map[string]map[string]bool{}, fail: map[string]bool{}, hang: map[string]time.Duration{},
		bogus: map[string]int{}, calls: map[string]int{}}
}

// hold makes engine hold the full blocks of tokens (salted).
func (x *fakeIndex) hold(t testing.TB, engine string, tokens []uint32, salt string) {
	t.Helper()
	hashes := testHashes(t, tokens, salt)
	x.mu.Lock()
	defer x.mu.Unlock()
	if x.held[engine] == nil {
		x.held[engine] = map[string]bool{}
	}
	for _, h := range hashes {
		x.held[engine][string(h)] = true
	}
}

func (x *fakeIndex) Lookup(ctx context.Context, engine string, q KVQuery) (int, error) {
	x.mu.Lock()
	x.calls[engine]++
	x.queries = append(x.queries, q)
	hang, fail := x.hang[engine], x.fail[engine]
	bogus, isBogus := x.bogus[engine]
	held := x.held[engine]
	x.mu.Unlock()
	if hang > 0 {
		time.Sleep(hang) // ignores ctx on purpose
	}
	if fail {
		return 0, errors.New("engine unavailable")
	}
	if isBogus {
		return bogus, nil
	}
	x.mu.Lock()
	defer x.mu.Unlock()
	n := 0
	for n < len(q.Hashes) && held[string(q.Hashes[n])] {
		n++
	}
	return n, nil
}

func (x *fakeIndex) callsTo(engine string) int {
	x.mu.Lock()
	defer x.mu.Unlock()
	return x.calls[engine]
}

const testBlockSize = 4

func testHashes(t testing.TB, tokens []uint32, salt string) [][]byte {
	t.Helper()
	none, err := vllmhash.NoneHash("sha256_cbor", "")
	require.NoError(t, err)
	h, err := vllmhash.BlockHashes(vllmhash.Params{Algo: "sha256_cbor", BlockSize: testBlockSize}, none, tokens, salt)
	require.NoError(t, err)
	return h
}

func hostPort(t testing.TB, f *fakeVLLM) string {
	t.Helper()
	u, err := url.Parse(f.srv.URL)
	require.NoError(t, err)
	return u.Host
}

// kvConfig turns on --lb kv with the test's hashing, each fake served by
// the engine named beside it.
func kvConfig(t testing.TB, engines map[*fakeVLLM]string, more func(*Config)) func(*Config) {
	return func(c *Config) {
		c.LB = LBKV
		c.KVHashAlgo = "sha256_cbor"
		c.KVBlockSize = testBlockSize
		c.KVLookupBudget = 200 * time.Millisecond
		c.KVTokenizeTimeout = 2 * time.Second
		for f, e := range engines {
			c.KVEngines = append(c.KVEngines, hostPort(t, f)+"="+e)
		}
		if more != nil {
			more(c)
		}
	}
}

const kvSystemPrompt = "You are a helpful assistant. Long shared system prompt, then the user's question."

func TestKVPicksTheHostHoldingThePrefix(t *testing.T) {
	chatMsgs := []map[string]any{{"role": "system", "content": kvSystemPrompt}, {"role": "user", "content": "hi"}}
	chatBody := `{"model":"tiny","messages":[{"role":"system","content":"` + kvSystemPrompt + `"},{"role":"user","content":"hi"}],"max_tokens":4}`
	cases := []struct {
		name, path, body string
		tokens           []uint32 // what the engine on host B holds
		salt             string
		tokenized        bool // the router had to ask /tokenize
	}{
		{"completion text", "/v1/completions", `{"model":"tiny","prompt":"` + kvSystemPrompt + `","max_tokens":4}`, fakeTokens(kvSystemPrompt), "", true},
		{"completion in a list", "/v1/completions", `{"model":"tiny","prompt":["` + kvSystemPrompt + `"],"max_tokens":4}`, fakeTokens(kvSystemPrompt), "", true},
		{"token ids", "/v1/completions", `{"model":"tiny","prompt":[1,2,3,4,5,6,7,8,9],"max_tokens":4}`, []uint32{1, 2, 3, 4, 5, 6, 7, 8, 9}, "", false},
		{"chat with the template", "/v1/chat/completions", chatBody, fakeTokens(fakeChatText(chatMsgs, true)), "", true},
		{"cache_salt in the first block", "/v1/completions", `{"model":"tiny","prompt":"` + kvSystemPrompt + `","cache_salt":"tenant-1","max_tokens":4}`, fakeTokens(kvSystemPrompt), "tenant-1", true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			pA, pB, dA, dB := newFake(nil), newFake(nil), newFake(nil), newFake(nil)
			idx := newFakeIndex()
			idx.hold(t, "hostb:7000", tc.tokens, tc.salt)
			idx.hold(t, "hosta:7000", tc.tokens, tc.salt+"-other") // another tenant's blocks: no hit
			h := startRouterDeps(t, []*fakeVLLM{pA, pB}, []*fakeVLLM{dA, dB},
				kvConfig(t, map[*fakeVLLM]string{pA: "hosta:7000", dA: "hosta:7000", pB: "hostb:7000", dB: "hostb:7000"}, nil),
				Deps{KVIndex: idx})
			const n = 4
			for range n {
				resp, body := post(t, h.url+tc.path, tc.body)
				require.Equal(t, http.StatusOK, resp.StatusCode, body)
			}
			require.Len(t, pB.requests(), n, "every prefill on the host holding the prefix")
			require.Empty(t, pA.requests())
			require.Len(t, dB.requests(), n, "decode beside its P: no cross-host fetch")
			require.Empty(t, dA.requests())
			require.Equal(t, 1, idx.callsTo("hostb:7000")/n, "one lookup per engine and request")
			tokenizes := int(pA.tokenizeCalls.Load() + pB.tokenizeCalls.Load() + dA.tokenizeCalls.Load() + dB.tokenizeCalls.Load())
			if tc.tokenized {
				require.Equal(t, n, tokenizes)
			} else {
				require.Zero(t, tokenizes, "token ids need no tokenizer")
			}
			m := h.r.m
			require.Equal(t, float64(n), testutil.ToFloat64(m.kvDecisions.WithLabelValues(rolePrefill, decisionHit)))
			require.Equal(t, float64(n), testutil.ToFloat64(m.kvDecisions.WithLabelValues(roleDecode, decisionColocated)))
			blocks := len(tc.tokens) / testBlockSize
			require.Equal(t, float64(n*blocks*testBlockSize), testutil.ToFloat64(m.kvHitTokens.WithLabelValues(rolePrefill)))
			require.Equal(t, float64(n*len(tc.tokens)), testutil.ToFloat64(m.kvPromptTokens))
			q := idx.queries[0]
			require.Equal(t, testBlockSize, q.BlockSize)
			require.Equal(t, "sha256_cbor", q.HashAlgo)
			require.Len(t, q.SeedFingerprint, 16)
			require.Len(t, q.Hashes, blocks)
		})
	}
}

func TestKVCostWeighsLoadAgainstHits(t *testing.T) {
	// Host A holds half the prompt but already runs 3 requests; host B
	// holds nothing and runs none: 32 uncached x 1 beats 16 x 4.
	pA, pB, d := newFake(nil), newFake(nil), newFake(nil)
	tokens := fakeTokens(strings.Repeat("x", 32))
	idx := newFakeIndex()
	idx.hold(t, "hosta:7000", tokens[:16], "")
	h := startRouterDeps(t, []*fakeVLLM{pA, pB}, []*fakeVLLM{d},
		kvConfig(t, map[*fakeVLLM]string{pA: "hosta:7000", pB: "hostb:7000", d: "hostb:7000"}, nil), Deps{KVIndex: idx})
	h.r.prefill.backends()[0].inflight.Store(3)
	resp, body := post(t, h.url+"/v1/completions", `{"model":"tiny","prompt":"`+strings.Repeat("x", 32)+`","max_tokens":2}`)
	require.Equal(t, http.StatusOK, resp.StatusCode, body)
	require.Len(t, pB.requests(), 1)
	require.Empty(t, pA.requests())
	require.Equal(t, 1.0, testutil.ToFloat64(h.r.m.kvDecisions.WithLabelValues(rolePrefill, decisionNoHit)))
}

func TestKVSlowOrDeadEngineIsNoHit(t *testing.T) {
	cases := []struct {
		name   string
		mutate func(x *fakeIndex)
		result string
	}{
		{"engine hangs past the budget", func(x *fakeIndex) { x.hang["hostb:7000"] = 3 * time.Second }, lookupTimeout},
		{"engine errs", func(x *fakeIndex) { x.fail["hostb:7000"] = true }, lookupError},
		{"engine answers more blocks than asked", func(x *fakeIndex) { x.bogus["hostb:7000"] = 1 << 30 }, lookupBogus},
		{"engine answers a negative count", func(x *fakeIndex) { x.bogus["hostb:7000"] = -1 }, lookupBogus},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			pA, pB, d := newFake(nil), newFake(nil), newFake(nil)
			idx := newFakeIndex()
			idx.hold(t, "hostb:7000", fakeTokens(kvSystemPrompt), "") // B would be the pick
			tc.mutate(idx)
			h := startRouterDeps(t, []*fakeVLLM{pA, pB}, []*fakeVLLM{d},
				kvConfig(t, map[*fakeVLLM]string{pA: "hosta:7000", pB: "hostb:7000", d: "hosta:7000"}, func(c *Config) {
					c.KVLookupBudget = 20 * time.Millisecond
				}), Deps{KVIndex: idx})
			t0 := time.Now()
			resp, body := post(t, h.url+"/v1/completions", `{"model":"tiny","prompt":"`+kvSystemPrompt+`","max_tokens":2}`)
			require.Equal(t, http.StatusOK, resp.StatusCode, body)
			require.Less(t, time.Since(t0), 2*time.Second, "routing never waits for a slow engine")
			m := h.r.m
			require.Equal(t, 1.0, testutil.ToFloat64(m.kvLookups.WithLabelValues(tc.result)))
			require.Zero(t, testutil.ToFloat64(m.kvHitTokens.WithLabelValues(rolePrefill)), "counted as no hit")
			require.Equal(t, 1.0, testutil.ToFloat64(m.kvDecisions.WithLabelValues(rolePrefill, decisionNoHit)))
		})
	}
}

func TestKVBypassSendsOneRequestToDAlone(t *testing.T) {
	cases := []struct {
		name   string
		ratio  float64
		bypass bool
	}{
		{"held share above the ratio", 0.5, true},
		{"ratio above what D's host holds", 0.99, false},
		{"bypass off", 0, false},
	}
	// D's host holds the first 60 of the prompt's 68 tokens (a previous
	// turn); the new message is the tail.
	turn1 := strings.Repeat("y", 60)
	prompt := turn1 + "next one"
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p, dA, dB := newFake(nil), newFake(nil), newFake(nil)
			idx := newFakeIndex()
			idx.hold(t, "hostd:7000", fakeTokens(turn1), "")
			h := startRouterDeps(t, []*fakeVLLM{p}, []*fakeVLLM{dA, dB},
				kvConfig(t, map[*fakeVLLM]string{p: "hostp:7000", dA: "hosta:7000", dB: "hostd:7000"}, func(c *Config) {
					c.PDBypassRatio = tc.ratio
				}), Deps{KVIndex: idx})
			resp, body := post(t, h.url+"/v1/completions",
				`{"model":"tiny","prompt":"`+prompt+`","max_tokens":4,"kv_transfer_params":{"do_remote_prefill":true}}`)
			require.Equal(t, http.StatusOK, resp.StatusCode, body)
			bypasses := testutil.ToFloat64(h.r.m.kvDecisions.WithLabelValues(roleDecode, decisionBypass))
			if !tc.bypass {
				require.Len(t, p.requests(), 1)
				require.Zero(t, bypasses)
				return
			}
			require.Empty(t, p.requests(), "no prefill")
			require.Empty(t, dA.requests())
			require.Len(t, dB.requests(), 1, "the D whose host holds the prompt")
			require.NotContains(t, dB.requests()[0], "kv_transfer_params", "D loads locally: no transfer to wait for")
			require.Equal(t, 1.0, bypasses)
			require.Equal(t, 60.0, testutil.ToFloat64(h.r.m.kvHitTokens.WithLabelValues(roleDecode)))
		})
	}
}

func TestKVFallbacks(t *testing.T) {
	long := strings.Repeat("z", 40)
	cases := []struct {
		name, path, body string
		fake             func(f *fakeVLLM)
		reason           string
	}{
		{"image in a message", "/v1/chat/completions",
			`{"model":"tiny","messages":[{"role":"user","content":[{"type":"text","text":"what is this"},{"type":"image_url","image_url":{"url":"data:,"}}]}]}`, nil, fallbackMultimodal},
		{"truncate_prompt_tokens", "/v1/completions", `{"model":"tiny","prompt":"` + long + `","truncate_prompt_tokens":8}`, nil, fallbackUnsupported},
		{"cache_salt not a string", "/v1/completions", `{"model":"tiny","prompt":"` + long + `","cache_salt":7}`, nil, fallbackUnsupported},
		{"token id out of range", "/v1/completions", `{"model":"tiny","prompt":[1,2,4294967296]}`, nil, fallbackUnsupported},
		{"unknown model (404)", "/v1/completions", `{"model":"lora-x","prompt":"` + long + `"}`,
			func(f *fakeVLLM) {
				f.tokenizeStatus, f.tokenizeRaw = 404, `{"error":{"message":"model lora-x does not exist"}}`
			}, fallbackUnknownModel},
		{"tokenize fails (500)", "/v1/completions", `{"model":"tiny","prompt":"` + long + `"}`,
			func(f *fakeVLLM) { f.tokenizeStatus = 500 }, fallbackTokenizeError},
		{"tokenize too slow", "/v1/completions", `{"model":"tiny","prompt":"` + long + `"}`,
			func(f *fakeVLLM) { f.tokenizeDelay = 5 * time.Second }, fallbackTokenizeTimout},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p, d := newFake(nil), newFake(tc.fake)
			idx := newFakeIndex()
			h := startRouterDeps(t, []*fakeVLLM{p}, []*fakeVLLM{d},
				kvConfig(t, map[*fakeVLLM]string{p: "hostp:7000", d: "hostd:7000"}, func(c *Config) {
					c.KVTokenizeTimeout = 100 * time.Millisecond
				}), Deps{KVIndex: idx})
			resp, body := post(t, h.url+tc.path, tc.body)
			require.Equal(t, http.StatusOK, resp.StatusCode, body)
			m := h.r.m
			require.Equal(t, 1.0, testutil.ToFloat64(m.kvFallbacks[tc.reason]))
			require.Equal(t, 1.0, testutil.ToFloat64(m.kvDecisions.WithLabelValues(rolePrefill, decisionFallback)))
			require.Equal(t, 1.0, testutil.ToFloat64(m.kvDecisions.WithLabelValues(roleDecode, decisionFallback)))
			require.Zero(t, idx.callsTo("hostp:7000"), "nothing to look up")
		})
	}
}

func TestKVHostileTokenizeAnswers(t *testing.T) {
	cases := []struct {
		name string
		fake func(f *fakeVLLM)
	}{
		{"not JSON", func(f *fakeVLLM) { f.tokenizeRaw = `{"tokens":[1,2,` }},
		{"tokens not a list", func(f *fakeVLLM) { f.tokenizeRaw = `{"tokens":"1,2,3"}` }},
		{"no tokens", func(f *fakeVLLM) { f.tokenizeRaw = `{"count":3}` }},
		{"negative id", func(f *fakeVLLM) { f.tokenizeRaw = `{"tokens":[1,-2,3]}` }},
		{"fractional id", func(f *fakeVLLM) { f.tokenizeRaw = `{"tokens":[1,2.5,3]}` }},
		{"id past uint32", func(f *fakeVLLM) { f.tokenizeRaw = `{"tokens":[99999999999]}` }},
		{"nested lists", func(f *fakeVLLM) {
			f.tokenizeRaw = `{"tokens":` + strings.Repeat("[", 5000) + strings.Repeat("]", 5000) + `}`
		}},
		{"an array, not an object", func(f *fakeVLLM) { f.tokenizeRaw = `[1,2,3]` }},
		{"endless token list", func(f *fakeVLLM) { f.tokenizeFlood = true }},
		{"too many tokens", func(f *fakeVLLM) {
			f.tokenizeRaw = `{"tokens":[` + strings.Repeat("1,", maxPromptTokens) + `1]}`
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p, d := newFake(nil), newFake(tc.fake)
			h := startRouterDeps(t, []*fakeVLLM{p}, []*fakeVLLM{d},
				kvConfig(t, map[*fakeVLLM]string{p: "hostp:7000", d: "hostd:7000"}, func(c *Config) {
					c.KVTokenizeTimeout = time.Second
				}), Deps{KVIndex: newFakeIndex()})
			resp, body := post(t, h.url+"/v1/completions", `{"model":"tiny","prompt":"`+kvSystemPrompt+`","max_tokens":2}`)
			require.Equal(t, http.StatusOK, resp.StatusCode, body)
			m := h.r.m
			fell := testutil.ToFloat64(m.kvFallbacks[fallbackTokenizeError]) + testutil.ToFloat64(m.kvFallbacks[fallbackTokenizeTimout])
			require.Equal(t, 1.0, fell)
		})
	}
}

func TestKVEngineMapping(t *testing.T) {
	m, err := parseKVEngines([]string{"10.0.0.5=10.0.0.50:7000", "10.0.0.6:8200=e6:7001", "[fd00::1]=[fd00::9]:7000"}, 0)
	require.NoError(t, err)
	withPort, err := parseKVEngines(nil, 7000)
	require.NoError(t, err)
	cases := []struct {
		m      kvEngineMap
		base   string
		engine string
		ok     bool
	}{
		{m, "http://10.0.0.5:8100", "10.0.0.50:7000", true},
		{m, "http://10.0.0.6:8200", "e6:7001", true},
		{m, "http://10.0.0.6:8201", "", false},
		{m, "http://[fd00::1]:8100", "[fd00::9]:7000", true},
		{m, "http://127.0.0.1:8100", LocalEngine, true},
		{m, "http://localhost:8100", LocalEngine, true},
		{m, "http://user:pw@10.0.0.7:8100", "", false},
		{withPort, "http://10.0.0.7:8100", "10.0.0.7:7000", true},      // a dns:// backend's resolved address
		{withPort, "http://[fd00::2]:8100", "[fd00::2]:7000", true},    // IPv6
		{withPort, "http://127.0.0.1:8100", "127.0.0.1:7000", true},    // the port wins over loopback
		{withPort, "https://P1.example:8443", "p1.example:7000", true}, // names compare case-blind
	}
	for _, tc := range cases {
		t.Run(tc.base, func(t *testing.T) {
			e, ok := tc.m.engineFor(tc.base)
			require.Equal(t, tc.ok, ok)
			require.Equal(t, tc.engine, e)
		})
	}
	for _, bad := range []string{"noequals", "=e:1", "h=nope", "h=e:0", "bad host!=e:1"} {
		_, err := parseKVEngines([]string{bad}, 0)
		require.Error(t, err, bad)
	}
}

func TestKVConfigErrors(t *testing.T) {
	cases := []struct {
		name   string
		mutate func(c *Config)
		want   string
	}{
		{"bypass without kv", func(c *Config) { c.PDBypassRatio = 0.5 }, "need --lb kv"},
		{"bypass ratio above 1", func(c *Config) { c.LB, c.PDBypassRatio = LBKV, 1.5 }, "--pd-bypass-ratio"},
		{"bad fallback", func(c *Config) { c.LB, c.KVFallbackLB = LBKV, LBKV }, "--kv-fallback-lb"},
		{"block size 0", func(c *Config) { c.LB, c.KVBlockSize = LBKV, 0 }, "--kv-block-size"},
		{"zero budget", func(c *Config) { c.LB, c.KVLookupBudget = LBKV, 0 }, "--kv-lookup-budget"},
		{"bad engine", func(c *Config) { c.LB, c.KVEngines = LBKV, []string{"h=x"} }, "--kv-engine"},
		{"xxhash without a seed", func(c *Config) { c.LB, c.KVHashAlgo = LBKV, "xxhash" }, "PYTHONHASHSEED"},
		{"unknown algorithm", func(c *Config) { c.LB, c.KVHashAlgo = LBKV, "md5" }, "--kv-hash-algo"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := DefaultConfig()
			c.Prefill, c.Decode = []string{"http://p:1"}, []string{"http://d:2"}
			c.KVHashAlgo = "sha256_cbor"
			tc.mutate(&c)
			require.ErrorContains(t, c.Validate(), tc.want)
		})
	}
	c := DefaultConfig()
	c.Prefill, c.Decode, c.LB, c.KVHashAlgo = []string{"http://p:1"}, []string{"http://d:2"}, LBKV, "sha256_cbor"
	_, err := New(c, Deps{})
	require.ErrorContains(t, err, "--lb kv needs the engines' index")
}

func TestKVAggregated(t *testing.T) {
	a, b := newFake(nil), newFake(nil)
	idx := newFakeIndex()
	idx.hold(t, "hostb:7000", fakeTokens(kvSystemPrompt), "")
	h := startRouterDeps(t, nil, nil, kvConfig(t, map[*fakeVLLM]string{a: "hosta:7000", b: "hostb:7000"}, func(c *Config) {
		c.Backends = []string{a.srv.URL, b.srv.URL}
	}), Deps{KVIndex: idx})
	for range 3 {
		resp, body := post(t, h.url+"/v1/completions", `{"model":"tiny","prompt":"`+kvSystemPrompt+`","max_tokens":2}`)
		require.Equal(t, http.StatusOK, resp.StatusCode, body)
	}
	require.Len(t, b.requests(), 3)
	require.Empty(t, a.requests())
	require.Equal(t, 3.0, testutil.ToFloat64(h.r.m.kvDecisions.WithLabelValues(roleAggregated, decisionHit)))
}

func TestPromptOf(t *testing.T) {
	cases := []struct {
		body     string
		chat     bool
		tokenize string // the /tokenize request ("" none)
		ids      []uint32
		salt     string
		reason   string
	}{
		{`{"model":"m","prompt":"a b"}`, false, `{"model":"m","prompt":"a b"}`, nil, "", ""},
		{`{"model":"m","prompt":["a"],"add_special_tokens":false}`, false, `{"model":"m","add_special_tokens":false,"prompt":"a"}`, nil, "", ""},
		{`{"model":"m","prompt":[[5,6]],"cache_salt":"s"}`, false, "", []uint32{5, 6}, "s", ""},
		{`{"model":"m","prompt":[ 5 , 6 ]}`, false, "", []uint32{5, 6}, "", ""},
		{`{"model":"m","prompt":["a","b"]}`, false, "", nil, "", fallbackUnsupported},
		{`{"model":"m","prompt":[[[1]]]}`, false, "", nil, "", fallbackUnsupported},
		{`{"model":"m","prompt":[]}`, false, "", nil, "", fallbackUnsupported},
		{`{"model":"m","messages":[{"role":"user","content":"x"}]}`, true, `{"model":"m","add_generation_prompt":true,"messages":[{"role":"user","content":"x"}]}`, nil, "", ""},
		{`{"model":"m","messages":[{"role":"user","content":"x"}],"add_generation_prompt":false,"chat_template_kwargs":{"k":1}}`, true,
			`{"model":"m","add_generation_prompt":false,"chat_template_kwargs":{"k":1},"messages":[{"role":"user","content":"x"}]}`, nil, "", ""},
		{`{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"x"}]}]}`, true,
			`{"model":"m","add_generation_prompt":true,"messages":[{"role":"user","content":[{"type":"text","text":"x"}]}]}`, nil, "", ""},
		{`{"model":"m","messages":[{"role":"user","content":[{"type":"input_audio"}]}]}`, true, "", nil, "", fallbackMultimodal},
	}
	for i, tc := range cases {
		t.Run(fmt.Sprint(i), func(t *testing.T) {
			p, reason := promptOf([]byte(tc.body), tc.chat)
			require.Equal(t, tc.reason, reason)
			if reason != "" {
				return
			}
			if tc.tokenize != "" {
				require.JSONEq(t, tc.tokenize, string(p.tokenize))
			} else {
				require.Nil(t, p.tokenize)
			}
			require.Equal(t, tc.ids, p.ids)
			require.Equal(t, tc.salt, p.salt)
		})
	}
}
