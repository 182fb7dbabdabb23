package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/pegaflow/pegaflow/sim"
)

// startLocal runs bin with args on this host, killed when the test ends.
func startLocal(t *testing.T, bin string, args ...string) *proc {
	t.Helper()
	return startCmd(t, exec.Command(bin, args...))
}

// tokenizingProxy fronts a sim and answers POST /tokenize with the sim's
// own tokenizer (main's sim does not serve /tokenize yet), counting the
// generation requests it passes on.
type tokenizingProxy struct {
	srv      *httptest.Server
	requests atomic.Int64
}

func newTokenizingProxy(t *testing.T, simAddr string) *tokenizingProxy {
	t.Helper()
	tok, err := sim.NewTokenizer(sim.DefaultConfig().VocabSize)
	require.NoError(t, err)
	rp := httputil.NewSingleHostReverseProxy(&url.URL{Scheme: "http", Host: simAddr})
	rp.FlushInterval = -1
	p := &tokenizingProxy{}
	p.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/tokenize" {
			if strings.HasSuffix(r.URL.Path, "completions") {
				p.requests.Add(1)
			}
			rp.ServeHTTP(w, r)
			return
		}
		var req struct{ Prompt string }
		if json.NewDecoder(r.Body).Decode(&req) != nil || req.Prompt == "" {
			http.Error(w, "want a prompt", http.StatusBadRequest)
			return
		}
		ids := tok.Encode(req.Prompt)
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]any{"tokens": ids, "count": len(ids), "max_model_len": 4096})
	}))
	t.Cleanup(p.srv.Close)
	return p
}

func (p *tokenizingProxy) hostPort() string { return strings.TrimPrefix(p.srv.URL, "http://") }

// kvWords is a prompt of n distinct words (tokens) tagged by tag.
func kvWords(tag string, n int) string {
	w := make([]string, n)
	for i := range w {
		w[i] = fmt.Sprintf("%s%d", tag, i)
	}
	return strings.Join(w, " ")
}

func postCompletion(t *testing.T, base, prompt string, params map[string]any) {
	t.Helper()
	body := map[string]any{"model": sim.DefaultConfig().Model, "prompt": prompt, "max_tokens": 2}
	if params != nil {
		body["kv_transfer_params"] = params
	}
	raw, _ := json.Marshal(body)
	c := &http.Client{Timeout: 30 * time.Second}
	resp, err := c.Post(base+"/v1/completions", "application/json", bytes.NewReader(raw))
	require.NoError(t, err)
	out, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode, "%s", out)
}

// --lb kv end to end: a router with engine A in its process and engine B
// apart (its peer API, the token), P and D sims on each; B's backends
// mapped to B with --kv-engine, A's (loopback, unmapped) to the engine
// in process. A prompt saved on B's side routes its follow-up to B's D
// (and P), a follow-up holding >= --pd-bypass-ratio goes to B's D alone;
// with B killed every request still succeeds and B counts as no hit; B
// restarted answers from its own empty index (no stale hit).
func TestKVRoutingAcrossEngines(t *testing.T) {
	skipUnlessPeerProcs(t, "runs two engines, four sims and a router as processes")
	bin, dir := testBinary(t), t.TempDir()
	tokenFile := filepath.Join(dir, "peer-token")
	require.NoError(t, os.WriteFile(tokenFile, []byte(peerTestToken+"\n"), 0o600))
	peerA, peerB, routerAddr, engBHTTP := freeAddr(t), freeAddr(t), freeAddr(t), freeAddr(t)
	sockA, sockB := filepath.Join(dir, "a.sock"), filepath.Join(dir, "b.sock")
	startB := func() *proc {
		p := startLocal(t, bin, "serve", "--socket", sockB, "--http-addr", engBHTTP, "--pool-size", "64MiB", "--mlock=false", "--hugepages=false",
			"--peer-addr", peerB, "--peer-token-file", tokenFile, "--peer-allow", peerA, "--log-level", "debug")
		awaitHealthy(t, engBHTTP, p.logs)
		return p
	}
	engB := startB()
	simArgs := func(sock string) (string, []string) {
		addr := freeAddr(t)
		return addr, []string{"sim", "--http-addr", addr, "--engine-socket", sock, "--num-layers", "2", "--num-kv-heads", "2",
			"--head-size", "8", "--block-size", "16", "--num-blocks", "256", "--kv-query-wait", "1s", "--engine-timeout", "2s"}
	}
	// The router's process runs engine A; its sims attach once it is up.
	pA, pAArgs := simArgs(sockA)
	pB, pBArgs := simArgs(sockB)
	dA, dAArgs := simArgs(sockA)
	dB, dBArgs := simArgs(sockB)
	proxyDA, proxyDB := newTokenizingProxy(t, dA), newTokenizingProxy(t, dB)
	router := startLocal(t, bin, "serve", "--socket", sockA, "--http-addr", routerAddr, "--pool-size", "64MiB", "--mlock=false", "--hugepages=false",
		"--peer-addr", peerA, "--peer-token-file", tokenFile, "--peer-allow", peerB,
		"--prefill", "http://"+pA, "--prefill", "http://"+pB, "--decode", proxyDA.srv.URL, "--decode", proxyDB.srv.URL,
		"--lb", "kv", "--kv-hash-algo", sim.HashAlgo, "--kv-hash-seed", sim.DefaultConfig().HashSeed, "--kv-block-size", "16", "--kv-lookup-budget", "200ms", "--kv-tokenize-timeout", "5s",
		"--kv-engine", pB+"="+peerB, "--kv-engine", proxyDB.hostPort()+"="+peerB, "--pd-bypass-ratio", "0.9",
		"--health-interval", "0", "--fail-threshold", "100", "--kv-ready-timeout", "3s", "--log-level", "debug")
	awaitHealthy(t, routerAddr, router.logs)
	sims := map[string]*proc{}
	for name, args := range map[string][]string{"P-A": pAArgs, "P-B": pBArgs, "D-A": dAArgs, "D-B": dBArgs} {
		sims[name] = startLocal(t, bin, args...)
		require.Eventually(t, func() bool {
			resp, err := http.Get("http://" + args[2] + "/health")
			if err != nil {
				return false
			}
			resp.Body.Close()
			return resp.StatusCode == http.StatusOK
		}, 20*time.Second, 20*time.Millisecond, "%s never healthy: %s", name, sims[name].logs)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("--- router ---\n%s", tail(router.logs.String(), 6000))
			t.Logf("--- P-B ---\n%s", tail(sims["P-B"].logs.String(), 3000))
		}
	})
	base := "http://" + routerAddr
	c := &http.Client{Timeout: 10 * time.Second}
	rm := func() map[string]float64 { return metrics(t, c, routerAddr) }
	decided := func(m map[string]float64, leg, reason string) float64 {
		return m[fmt.Sprintf(`pegaflow_router_kv_decisions_total{leg=%q,mode="pd",reason=%q}`, leg, reason)]
	}

	// Save prompts on B's side: straight to B's P, as a prefill.
	conv := kvWords("conv", 16*16) // 16 blocks
	long := kvWords("long", 16*16)
	for _, p := range []string{conv, long} {
		postCompletion(t, "http://"+pB, p, map[string]any{"do_remote_decode": true})
	}
	require.Eventually(t, func() bool {
		return metrics(t, c, engBHTTP)["pegaflow_engine_save_duration_seconds_count"] >= 2
	}, 10*time.Second, 20*time.Millisecond, "B never saved the prompts: %s", sims["P-B"].logs)

	// A follow-up sharing 16 of 24 blocks (< 0.9): P/D, both on B.
	before, dBBefore := rm(), proxyDB.requests.Load()
	postCompletion(t, base, long+" "+kvWords("tail", 8*16), nil)
	after := rm()
	require.Equal(t, 1.0, decided(after, "prefill", "prefix_hit")-decided(before, "prefill", "prefix_hit"), "P on B's host")
	require.Equal(t, 1.0, decided(after, "decode", "colocated")-decided(before, "decode", "colocated"), "D beside that P")
	require.Equal(t, dBBefore+1, proxyDB.requests.Load(), "the D on B's host")

	// A follow-up B holds >= 0.9 of: B's D alone.
	before, dBBefore = after, proxyDB.requests.Load()
	postCompletion(t, base, conv+" next question", nil)
	after = rm()
	require.Equal(t, 1.0, decided(after, "decode", "bypass")-decided(before, "decode", "bypass"))
	require.Equal(t, 0.0, after["pegaflow_router_kv_decisions_total"]-before["pegaflow_router_kv_decisions_total"]-1, "no P leg")
	require.Equal(t, dBBefore+1, proxyDB.requests.Load())

	// B killed: lookups of B fail, no hit is counted for it, nothing fails.
	engB.kill()
	before = after
	for i := range 4 {
		postCompletion(t, base, kvWords(fmt.Sprintf("fresh%d-", i), 40), nil)
	}
	postCompletion(t, base, long+" "+kvWords("other", 8*16), nil) // held by B alone
	after = rm()
	require.Greater(t, after[`pegaflow_router_kv_lookups_total{mode="pd",result="error"}`], before[`pegaflow_router_kv_lookups_total{mode="pd",result="error"}`])
	require.Equal(t, decided(before, "prefill", "prefix_hit"), decided(after, "prefill", "prefix_hit"), "no hit from a dead engine")
	require.Equal(t, decided(before, "decode", "bypass"), decided(after, "decode", "bypass"))

	// B restarted (same address): its index is empty, so no stale hit on
	// conv (which only the old B held).
	engB = startB()
	defer engB.kill()
	before = rm()
	postCompletion(t, base, conv+" a third question", nil)
	after = rm()
	require.Equal(t, decided(before, "decode", "bypass"), decided(after, "decode", "bypass"), "no stale hit after the restart")
	require.Equal(t, decided(before, "prefill", "prefix_hit"), decided(after, "prefill", "prefix_hit"))
	require.Zero(t, after[`pegaflow_router_requests_total{mode="pd",outcome="failed"}`])
}
