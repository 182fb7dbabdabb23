package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// The lab's deadlines. A request's bound follows from them: the router
// waits for the KV at most mhKVReadyTimeout, D's query (and so the fetch)
// at most mhQueryWait, and the slack covers the compute, a TCP retransmit
// after the link comes back and the router's decode retries.
const (
	mhKVReadyTimeout = 3 * time.Second
	mhQueryWait      = 2 * time.Second
	mhSlack          = 6 * time.Second
	mhBound          = mhKVReadyTimeout + mhQueryWait + mhSlack
	mhPromptWords    = 16*16 + 1 // 16 full blocks of 16 tokens
	// A block's bytes as the engine counts them (its rank_block_bytes
	// for the sims' 4 layers, 4 KV heads of 128, 16 tokens).
	mhBlockBytes = 128 << 10
)

// mhLab is P/D across two hosts: on A engine A, the P sim and the
// router; on B engine B and the D sim.
type mhLab struct {
	h          *twoHosts
	bin, dir   string
	tokenFile  string
	engA, engB *proc
	simP, simD *proc
	router     *proc
	clientA    *http.Client
	clientB    *http.Client
}

const (
	mhPeerPort   = 7400
	mhEngineHTTP = 8081
	mhSimPort    = 8100
	mhRouterPort = 8080
)

// mhSendBuf caps engine A's TCP send buffers (its namespace's
// net.ipv4.tcp_wmem) in engine-A-killed. With the kernel's autotuning a
// whole request's stream reply (2 MiB) can sit in A's kernel by the time
// B's fetch is under way, and it still reaches B after A is killed; 64 KiB
// keeps all but ~64 KiB of it in A's process, so killing A mid-fetch
// loses the reply in flight. Only there: a small window makes TCP recover
// from loss by timeouts, which would starve the packet-loss phase.
const mhSendBuf = "net.ipv4.tcp_wmem=4096 65536 65536"

// startEngineA starts engine A, env added to its environment.
func (l *mhLab) startEngineA(t *testing.T, env ...string) {
	l.engA = l.h.a.startEnv(t, env, l.bin, "serve", "--socket", filepath.Join(l.dir, "a.sock"), "--http-addr", l.h.a.Addr(mhEngineHTTP),
		"--pool-size", "256MiB", "--peer-addr", l.h.a.Addr(mhPeerPort), "--peer-token-file", l.tokenFile,
		"--kv-ready-allow", l.h.a.Addr(mhRouterPort), "--log-level", "debug")
	l.h.a.awaitHTTP(t, "http://"+l.h.a.Addr(mhEngineHTTP)+"/health", l.engA)
}

func (l *mhLab) simArgs(host nsHost, sock, id string) []string {
	return []string{"sim", "--http-addr", host.Addr(mhSimPort), "--engine-socket", filepath.Join(l.dir, sock), "--instance-id", id,
		"--num-layers", "4", "--num-kv-heads", "4", "--head-size", "128", "--block-size", "16", "--num-blocks", "320",
		"--kv-query-wait", mhQueryWait.String(), "--engine-timeout", "5s", "--log-level", "debug"}
}

func startMHLab(t *testing.T) *mhLab {
	h := newTwoHosts(t)
	l := &mhLab{h: h, bin: testBinary(t), dir: t.TempDir(), clientA: h.a.client(30 * time.Second), clientB: h.b.client(10 * time.Second)}
	l.tokenFile = filepath.Join(l.dir, "peer-token")
	require.NoError(t, os.WriteFile(l.tokenFile, []byte(peerTestToken+"\n"), 0o600))
	l.startEngineA(t)
	l.engB = h.b.start(t, l.bin, "serve", "--socket", filepath.Join(l.dir, "b.sock"), "--http-addr", h.b.Addr(mhEngineHTTP),
		"--pool-size", "256MiB", "--peer-addr", h.b.Addr(mhPeerPort), "--peer-token-file", l.tokenFile,
		"--peer-allow", h.a.Addr(mhPeerPort), "--log-level", "debug")
	h.b.awaitHTTP(t, "http://"+h.b.Addr(mhEngineHTTP)+"/health", l.engB)
	l.simP = h.a.start(t, l.bin, l.simArgs(h.a, "a.sock", "P")...)
	l.simD = h.b.start(t, l.bin, l.simArgs(h.b, "b.sock", "D")...)
	h.a.awaitHTTP(t, "http://"+h.a.Addr(mhSimPort)+"/health", l.simP)
	h.b.awaitHTTP(t, "http://"+h.b.Addr(mhSimPort)+"/health", l.simD)
	// One P and one D: decode retries ride out a short outage of the link
	// instead of ejecting D, and no active health polling: P's /health is
	// 503 while its engine is gone (by design), which would make the
	// router refuse requests rather than show D recomputing.
	l.router = h.a.start(t, l.bin, "serve", "--engine=false", "--http-addr", h.a.Addr(mhRouterPort),
		"--prefill", "http://"+h.a.Addr(mhSimPort), "--decode", "http://"+h.b.Addr(mhSimPort),
		"--kv-ready-url", "http://"+h.a.Addr(mhRouterPort)+"/kv_ready", "--kv-ready-timeout", mhKVReadyTimeout.String(),
		"--connect-timeout", "1s", "--decode-attempts", "6", "--retry-backoff", "200ms", "--retry-backoff-max", "1s",
		"--fail-threshold", "100", "--health-interval", "0", "--log-level", "debug")
	h.a.awaitHTTP(t, "http://"+h.a.Addr(mhRouterPort)+"/health", l.router)
	t.Cleanup(func() {
		// PEGAFLOW_MH_LOGS=DIR keeps every process's whole log there.
		keep := os.Getenv("PEGAFLOW_MH_LOGS")
		for name, p := range map[string]*proc{"engine-A": l.engA, "engine-B": l.engB, "sim-P": l.simP, "sim-D": l.simD, "router": l.router} {
			if t.Failed() {
				t.Logf("--- %s ---\n%s", name, tail(p.logs.String(), 4000))
			}
			if keep != "" {
				_ = os.WriteFile(filepath.Join(keep, name+".log"), []byte(p.logs.String()), 0o644)
			}
		}
	})
	return l
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

// mhCounters are the figures a phase compares before and after.
type mhCounters struct {
	fetched, fetchBytes, loaded, verifyFails, computed float64
	failures                                           map[string]float64
}

func (l *mhLab) counters(t *testing.T) mhCounters {
	eb := metrics(t, l.clientB, l.h.b.Addr(mhEngineHTTP))
	d := metrics(t, l.clientB, l.h.b.Addr(mhSimPort))
	c := mhCounters{fetched: eb["pegaflow_engine_peer_fetch_blocks_total"], fetchBytes: eb["pegaflow_engine_peer_fetch_bytes_total"],
		loaded: d["sim_kv_blocks_loaded_total"], verifyFails: d["sim_kv_verify_failures_total"],
		computed: d["sim_prefill_tokens_computed_total"], failures: map[string]float64{}}
	for k, v := range eb {
		if r, ok := strings.CutPrefix(k, `pegaflow_engine_peer_fetch_failures_total{reason="`); ok && v > 0 {
			c.failures[strings.TrimSuffix(r, `"}`)] = v
		}
	}
	return c
}

// mhResult is one phase's requests.
type mhResult struct {
	n, ok   int
	maxLat  time.Duration
	codes   map[int]int
	elapsed time.Duration
}

// drive keeps conc clients sending distinct prompts through the router
// on A for dur; fault (if any) runs alongside from the phase's start.
func (l *mhLab) drive(t *testing.T, phase string, dur time.Duration, conc int, fault func()) mhResult {
	t.Helper()
	res := mhResult{codes: map[int]int{}}
	var mu sync.Mutex
	var wg sync.WaitGroup
	if fault != nil {
		wg.Go(fault)
	}
	start := time.Now()
	for c := range conc {
		wg.Go(func() {
			for i := 0; time.Since(start) < dur; i++ {
				code, lat := l.complete(fmt.Sprintf("%s-%d-%d", phase, c, i))
				mu.Lock()
				res.n++
				res.codes[code]++
				if code == http.StatusOK {
					res.ok++
				}
				res.maxLat = max(res.maxLat, lat)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	res.elapsed = time.Since(start)
	return res
}

// complete sends one prompt of mhPromptWords distinct words; code 0 is
// no answer (or an unreadable one).
func (l *mhLab) complete(tag string) (int, time.Duration) {
	words := make([]string, mhPromptWords)
	for w := range words {
		words[w] = fmt.Sprintf("%s-%d", tag, w)
	}
	body, _ := json.Marshal(map[string]any{"model": "pegaflow-sim", "prompt": strings.Join(words, " "), "max_tokens": 4})
	t0 := time.Now()
	resp, err := l.clientA.Post("http://"+l.h.a.Addr(mhRouterPort)+"/v1/completions", "application/json", bytes.NewReader(body))
	if err != nil {
		return 0, time.Since(t0)
	}
	defer resp.Body.Close()
	var out map[string]any
	if json.NewDecoder(resp.Body).Decode(&out) != nil {
		return 0, time.Since(t0)
	}
	return resp.StatusCode, time.Since(t0)
}

// phase runs one fault and checks what every phase must show: every
// request answered 200 within the bound, nothing corrupt. It returns
// the counters' deltas for the phase's own checks.
func (l *mhLab) phase(t *testing.T, name string, dur time.Duration, fault func()) (mhResult, mhCounters) {
	t.Helper()
	before := l.counters(t)
	res := l.drive(t, name, dur, 4, fault)
	after := l.counters(t)
	d := mhCounters{fetched: after.fetched - before.fetched, fetchBytes: after.fetchBytes - before.fetchBytes,
		loaded: after.loaded - before.loaded, verifyFails: after.verifyFails - before.verifyFails,
		computed: after.computed - before.computed, failures: map[string]float64{}}
	for r, v := range after.failures {
		if v > before.failures[r] {
			d.failures[r] = v - before.failures[r]
		}
	}
	t.Logf("%-10s %d/%d answered 200 in %v (max latency %v, bound %v); D fetched %v of %d blocks (%.1f MiB), loaded %v, recomputed %v prompt tokens; fetch failures %v",
		name, res.ok, res.n, res.elapsed.Round(time.Millisecond), res.maxLat.Round(time.Millisecond), mhBound,
		d.fetched, res.n*16, d.fetchBytes/(1<<20), d.loaded, d.computed-float64(res.n), d.failures)
	require.Equal(t, res.n, res.ok, "%s: every request answered 200 (codes %v; 0 = no answer)", name, res.codes)
	require.Less(t, res.maxLat, mhBound, "%s: no request waits past the deadlines", name)
	require.Zero(t, d.verifyFails, "%s: nothing corrupt", name)
	require.Zero(t, after.verifyFails, "nothing corrupt")
	return res, d
}

// killAMidFetch polls engine B's fetches in their read phase and kills
// engine A as soon as that count rises: a fetch entered its reads (its
// GETs posted) since the previous poll. It returns how long the kill
// came after that poll's predecessor, or an error when no fetch began
// reading within limit (A is killed anyway, so the phase still ends).
func (l *mhLab) killAMidFetch(limit time.Duration) (time.Duration, error) {
	url := "http://" + l.h.b.Addr(mhEngineHTTP) + "/metrics"
	const gauge = "pegaflow_engine_peer_fetches_inflight "
	reading := func() (float64, error) {
		resp, err := l.clientB.Get(url)
		if err != nil {
			return 0, err
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		if err != nil {
			return 0, err
		}
		for line := range strings.SplitSeq(string(body), "\n") {
			if v, ok := strings.CutPrefix(line, gauge); ok {
				return strconv.ParseFloat(v, 64)
			}
		}
		return 0, fmt.Errorf("engine B exports no %s", strings.TrimSpace(gauge))
	}
	defer l.engA.kill()
	prev, err := reading()
	if err != nil {
		return 0, err
	}
	for start, t0 := time.Now(), time.Now(); time.Since(start) < limit; {
		time.Sleep(5 * time.Millisecond)
		n, err := reading()
		if err != nil {
			return 0, err
		}
		if n > prev {
			l.engA.kill()
			return time.Since(t0), nil
		}
		prev, t0 = n, time.Now()
	}
	return 0, fmt.Errorf("no fetch on engine B began reading within %v", limit)
}

// P/D across two hosts: two network namespaces joined by a veth pair,
// an engine, a sim on each, the router on A. D's engine fetches P's KV
// from A's engine over the validated stream (on the veth); D verifies every loaded
// byte. Then faults on A and on the link: every request is still
// answered within the deadlines, D recomputes what it could not fetch,
// nothing corrupt is ever loaded.
func TestMultiHostPD(t *testing.T) {
	skipUnlessPeerProcs(t, "builds the binary, runs two hosts in network namespaces")
	l := startMHLab(t)
	a, b := l.h.a, l.h.b

	t.Run("baseline", func(t *testing.T) {
		res, d := l.phase(t, "baseline", 1500*time.Millisecond, nil)
		require.EqualValues(t, res.n*16, d.fetched, "every block fetched from A")
		require.EqualValues(t, d.fetched*mhBlockBytes, d.fetchBytes)
		require.EqualValues(t, res.n*16, d.loaded, "and loaded by D, verified")
	})

	t.Run("rate-limit", func(t *testing.T) {
		if _, err := exec.LookPath("tc"); err != nil {
			t.Skip("tc not installed: rate-limit fault skipped")
		}
		// A -> B carries the GETs' data: 50 mbit/s is ~0.7 s for one
		// request's 4 MiB, 4 in flight share it; the fetch deadline
		// (the query's wait less the 1 s cancel grace) cuts some short.
		a.sh(t, "tc", "qdisc", "add", "dev", a.Veth, "root", "tbf", "rate", "50mbit", "burst", "32kbit", "latency", "400ms")
		defer a.sh(t, "tc", "qdisc", "del", "dev", a.Veth, "root")
		_, d := l.phase(t, "rate-limit", 3*time.Second, nil)
		require.Positive(t, d.fetched, "blocks still arrive")
	})

	t.Run("packet-loss", func(t *testing.T) {
		if _, err := exec.LookPath("nft"); err != nil {
			t.Skip("nft not installed: packet-loss fault skipped (apt-get install nftables)")
		}
		b.sh(t, "nft", "add", "table", "inet", "pfloss")
		b.sh(t, "nft", "add chain inet pfloss in { type filter hook input priority 0; }")
		b.sh(t, "nft", "add rule inet pfloss in iifname "+b.Veth+" numgen random mod 10 < 1 drop")
		defer b.sh(t, "nft", "delete", "table", "inet", "pfloss")
		_, d := l.phase(t, "loss-10%", 3*time.Second, nil)
		require.Positive(t, d.fetched)
	})

	t.Run("link-down", func(t *testing.T) {
		l.phase(t, "link-down", 4*time.Second, func() {
			time.Sleep(time.Second)
			a.sh(t, "ip", "link", "set", a.Veth, "down")
			time.Sleep(1500 * time.Millisecond)
			a.sh(t, "ip", "link", "set", a.Veth, "up")
		})
	})

	t.Run("engine-A-killed", func(t *testing.T) {
		if _, err := exec.LookPath("tc"); err != nil {
			t.Skip("tc not installed: the kill cannot be timed into a fetch")
		}
		// A -> B slowed so that one request's 2 MiB takes ~0.8 s: a fetch
		// caught entering its reads is still mid-read when A dies (A's
		// reply waits in A's process, mhSendBuf), and the queue's 50 ms
		// bound lets what A's kernel still sends, then its FIN, reach B
		// well before the fetch's 1 s deadline: the read fails on the lost
		// peer, not on the deadline. So A runs with mhSendBuf in this
		// phase (a new epoch: B's first fetch handshakes again).
		l.engA.kill()
		a.sh(t, "sysctl", "-qw", mhSendBuf)
		defer a.sh(t, "sysctl", "-qw", "net.ipv4.tcp_wmem=4096 16384 4194304")
		l.startEngineA(t)
		a.awaitHTTP(t, "http://"+a.Addr(mhSimPort)+"/health", l.simP) // P registered again
		a.sh(t, "tc", "qdisc", "add", "dev", a.Veth, "root", "tbf", "rate", "20mbit", "burst", "32kbit", "latency", "50ms")
		defer a.sh(t, "tc", "qdisc", "del", "dev", a.Veth, "root")
		var killed time.Duration
		var killErr error
		res, d := l.phase(t, "A-killed", 3*time.Second, func() { killed, killErr = l.killAMidFetch(3 * time.Second) })
		require.NoError(t, killErr)
		t.Logf("A killed %v after a fetch on B began its reads", killed.Round(time.Millisecond))
		require.Positive(t, d.failures["connection"], "the fetch that was reading ends on the lost peer (failures %v)", d.failures)
		require.Zero(t, metrics(t, l.clientB, b.Addr(mhEngineHTTP))["pegaflow_engine_peer_fetches_inflight"], "no fetch left reading")
		require.Greater(t, d.computed, float64(res.n), "D recomputes what A's engine can no longer serve")
	})

	t.Run("engine-A-restarted", func(t *testing.T) {
		l.startEngineA(t)
		a.awaitHTTP(t, "http://"+a.Addr(mhSimPort)+"/health", l.simP) // P registered again
		res, d := l.phase(t, "A-restart", 2*time.Second, nil)
		require.EqualValues(t, res.n*16, d.fetched, "the new epoch serves again: B handshakes anew")
		require.EqualValues(t, res.n*16, d.loaded)
	})
}
