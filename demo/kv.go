package demo

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/pegaflow/pegaflow/bench"
	"github.com/pegaflow/pegaflow/internal/ids"
	"github.com/pegaflow/pegaflow/internal/netlab"
	"github.com/pegaflow/pegaflow/sim"
)

// The KV routing comparison (`pegaflow demo --kv`, `make demo-kv`): on
// the two-host lab, two P and two D sims (kv_both: every request loads
// its host's prefix and saves its blocks, answers included) spread over
// both hosts, the router beside engine A, and the multi-turn chat
// workload, one run per routing policy with the same seed (fresh
// processes each run: no policy inherits another's cache). Every run's
// requests are the same: the sims' answers depend only on the prompt.

// KVPolicy is one row of the comparison: a name and the router's flags.
type KVPolicy struct {
	Name        string
	RouterFlags []string
}

// kvRouterFlags are what --lb kv needs of this lab: the engines' peer
// port (both hosts' sims map to their host's engine) and the sims' hash
// (sha256_cbor, seed "0", block size 16: pegaflow sim's defaults).
func kvRouterFlags(extra ...string) []string {
	return append([]string{"--lb", "kv", "--kv-engine-port", fmt.Sprint(labPeerPort),
		"--kv-block-size", fmt.Sprint(kvBlockSize), "--kv-hash-algo", sim.HashAlgo, "--kv-hash-seed", sim.DefaultConfig().HashSeed}, extra...)
}

// kvBlockSize is the demo sims' block size (pegaflow sim's default).
const kvBlockSize = 16

// KVPolicies are the compared policies, in the table's order.
func KVPolicies() []KVPolicy {
	return []KVPolicy{
		{"round-robin", []string{"--lb", "round-robin"}},
		{"least-inflight", []string{"--lb", "least-inflight"}},
		{"kv", kvRouterFlags()},
		{"kv + bypass 0.5", kvRouterFlags("--pd-bypass-ratio", "0.5")},
	}
}

// KVWorkload is the comparison's workload: 16 conversations of 4 turns
// sharing a 1000-word system prompt, 200-word messages, 100-token answers,
// a conversation starting every 0.5 s and 1 s of thinking between turns.
func KVWorkload() bench.Config {
	w := bench.DefaultConfig()
	w.Endpoint = bench.EndpointChat
	w.Users, w.Turns, w.SystemPromptLen = 16, 4, 1000
	w.InputLen, w.OutputLen = 200, 100
	w.RequestRate, w.ThinkTime = 2, time.Second
	w.Seed = 1
	w.Timeout = time.Minute
	w.Percentiles = []float64{99}
	return w
}

// KVRow is one policy's outcome.
type KVRow struct {
	Policy string        `json:"policy"`
	Result *bench.Result `json:"result,omitempty"`
	// Err: the run did not happen or ended early (a router refusing
	// --lb kv, say).
	Err string `json:"error,omitempty"`
	// PromptTokens: what the requests' prompts held; HitTokens: what the
	// instance that first served each request loaded from its own host's
	// engine (the sims' sim_kv_prefix_hit_tokens_total).
	PromptTokens float64 `json:"prompt_tokens"`
	HitTokens    float64 `json:"hit_tokens"`
	// Bypasses: requests sent to D alone (the router's
	// kv_decisions_total{reason="bypass"}, counted once per request).
	Bypasses float64 `json:"bypasses"`
	// CrossHostBytes: what the engines fetched from each other.
	CrossHostBytes float64 `json:"cross_host_bytes"`
	// KVFailures: the sims' failed KV saves, loads and verifications (a
	// broken lab: each costs hits, a refused save the router's
	// --kv-ready-timeout).
	KVFailures float64 `json:"kv_failures"`
	// OracleRatio: the oracle's hit ratio (oracle.go) on this run's
	// requests, as they were timed in it.
	OracleRatio float64 `json:"oracle_hit_ratio"`
}

// HitRatio is HitTokens / PromptTokens (NaN without prompts).
func (r KVRow) HitRatio() float64 {
	if r.PromptTokens == 0 {
		return math.NaN()
	}
	return r.HitTokens / r.PromptTokens
}

// KVReport is the comparison: a row per policy.
type KVReport struct {
	Rows []KVRow `json:"rows"`
}

// Failed reports whether any policy did not run, lost a request or saw
// a KV save, load or verification fail.
func (r *KVReport) Failed() bool {
	for _, row := range r.Rows {
		if row.Err != "" || row.Result == nil || row.Result.FollowUps == nil || row.Result.Failed > 0 || row.Result.NotSent > 0 ||
			row.KVFailures > 0 {
			return true
		}
	}
	return len(r.Rows) == 0
}

// RunKV builds the lab once and runs every policy on it in turn; a
// policy that cannot run is reported in its row and the next one runs.
func RunKV(ctx context.Context, cfg Config, w bench.Config, policies []KVPolicy, progress io.Writer) (rep *KVReport, err error) {
	progress, logDir, err := cfg.prepare(progress)
	if err != nil {
		return nil, err
	}
	lab, err := netlab.New(ctx, NetlabPrefix)
	if err != nil {
		return nil, err
	}
	defer func() { err = errors.Join(err, lab.Close()) }()
	token := filepath.Join(cfg.WorkDir, "peer-token")
	if err := os.WriteFile(token, []byte(ids.Hex(32)+"\n"), 0o600); err != nil {
		return nil, fmt.Errorf("peer token: %w", err)
	}
	rep = &KVReport{}
	for _, p := range policies {
		if ctx.Err() != nil {
			break
		}
		rep.Rows = append(rep.Rows, runKVPolicy(ctx, cfg, w, p, lab, token, progress, filepath.Join(logDir, slugPolicy(p.Name))))
	}
	return rep, ctx.Err()
}

func slugPolicy(name string) string {
	return strings.NewReplacer(" ", "", "+", "-", ".", "").Replace(name)
}

func kvSockets(cfg Config) (a, b string) {
	return filepath.Join(cfg.WorkDir, "kv-engine-a.sock"), filepath.Join(cfg.WorkDir, "kv-engine-b.sock")
}

// kvSpecs are one policy's processes, the router first: on A engine A
// with the router (pol's flags), on B engine B; on each host a P and a D
// sim (kv_both) on its engine. The engines' peer APIs allow each other.
func kvSpecs(cfg Config, lab *netlab.Lab, token string, pol KVPolicy) []spec {
	a, b := &lab.A, &lab.B
	sockA, sockB := kvSockets(cfg)
	router, engineB := a.Addr(labRouterPort), b.Addr(labEnginePort)
	pA, dA, pB, dB := a.Addr(labSimPort), a.Addr(labSimPort+1), b.Addr(labSimPort), b.Addr(labSimPort+1)
	peer := func(h *netlab.Host, other *netlab.Host) []string {
		return []string{"--peer-addr", h.Addr(labPeerPort), "--peer-token-file", token, "--peer-allow", other.Addr(labPeerPort)}
	}
	routerArgs := append([]string{"serve", "--socket", sockA, "--http-addr", router, "--pool-size", cfg.PoolSize},
		peer(a, b)...)
	routerArgs = append(routerArgs, "--prefill", "http://"+pA, "--prefill", "http://"+pB, "--decode", "http://"+dA, "--decode", "http://"+dB,
		"--health-interval", routerHealthInterval, "--log-level", "warn")
	routerArgs = append(routerArgs, pol.RouterFlags...)
	// P on B saves with the router's ready_url, on A: engine B must be
	// allowed to post there (its default allows loopback only, and a
	// refused save leaves the router waiting out --kv-ready-timeout).
	engineArgs := append([]string{"serve", "--socket", sockB, "--http-addr", engineB, "--pool-size", cfg.PoolSize,
		"--kv-ready-allow", router}, peer(b, a)...)
	kvSim := func(addr, sock, id string) []string {
		return simArgs(cfg, addr, "--engine-socket", sock, "--instance-id", id, "--kv-role", sim.KVBoth)
	}
	return []spec{
		{name: "engine+router-a", addr: router, router: true, host: a, args: routerArgs},
		{name: "engine-b", addr: engineB, host: b, args: append(engineArgs, "--log-level", "warn")},
		{name: "sim-p-a", addr: pA, host: a, args: kvSim(pA, sockA, "p-a")},
		{name: "sim-d-a", addr: dA, host: a, args: kvSim(dA, sockA, "d-a")},
		{name: "sim-p-b", addr: pB, host: b, args: kvSim(pB, sockB, "p-b")},
		{name: "sim-d-b", addr: dB, host: b, args: kvSim(dB, sockB, "d-b")},
	}
}

// runKVPolicy starts one policy's processes, runs the workload, reads the
// counters and stops them.
func runKVPolicy(ctx context.Context, cfg Config, w bench.Config, pol KVPolicy, lab *netlab.Lab, token string,
	progress io.Writer, logDir string) (row KVRow) {
	row.Policy = pol.Name
	if err := os.MkdirAll(logDir, 0o755); err != nil {
		row.Err = err.Error()
		return row
	}
	g := newGroup(logDir)
	defer func() {
		if err := g.stop(cfg.StopGrace); err != nil {
			row.Err = strings.TrimPrefix(row.Err+"; "+err.Error(), "; ")
		}
	}()
	sockA, sockB := kvSockets(cfg)
	_, _ = os.Remove(sockA), os.Remove(sockB)
	specs := kvSpecs(cfg, lab, token, pol)
	if err := startAll(ctx, g, cfg, specs, progress, logDir); err != nil {
		row.Err = err.Error()
		return row
	}
	// Every process's /metrics, reached from its own host, in specs'
	// order (the router's first).
	clients := map[*netlab.Host]*http.Client{&lab.A: lab.A.HTTPClient(0), &lab.B: lab.B.HTTPClient(0)}
	type page struct {
		hc  *http.Client
		url string
	}
	pages := make([]page, len(specs))
	pageNames := make([]string, len(specs))
	for i, sp := range specs {
		pages[i], pageNames[i] = page{clients[sp.host], sp.addr}, sp.name
	}
	read := func(ctx context.Context) ([]bench.Sample, error) {
		out := make([]bench.Sample, len(pages))
		for i, p := range pages {
			var err error
			if out[i], err = bench.Scrape(ctx, p.hc, "http://"+p.url); err != nil {
				return nil, err
			}
		}
		return out, nil
	}
	before, err := read(ctx)
	if err != nil {
		row.Err = err.Error()
		return row
	}
	w.BaseURL, w.HTTPClient = "http://"+specs[0].addr, pages[0].hc
	fmt.Fprintf(progress, "demo: --kv: %s: %d users x %d turns\n", pol.Name, w.Users, w.Turns)
	res, err := bench.Run(ctx, w, progress)
	row.Result = res
	if res != nil {
		_ = res.WriteJSONFile(filepath.Join(cfg.WorkDir, "kv-"+slugPolicy(pol.Name)+".json"))
		for _, r := range res.Records {
			if r.OK() {
				row.PromptTokens += float64(r.PromptTokens)
			}
		}
		row.OracleRatio = oracleHitRatio(res, sim.DefaultConfig().VocabSize, kvBlockSize)
	}
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	after, serr := read(sctx)
	if serr == nil {
		deltas := make([]bench.Sample, len(pages))
		for i := range pages {
			deltas[i] = after[i].Delta(before[i])
		}
		row.addCounters(deltas)
		serr = writeDeltas(filepath.Join(logDir, "metrics-delta.txt"), pageNames, deltas)
	}
	if err = errors.Join(err, serr); err != nil {
		row.Err = err.Error()
	}
	return row
}

// addCounters adds one run's counter deltas, one Sample per page, to
// the row.
func (r *KVRow) addCounters(deltas []bench.Sample) {
	for _, d := range deltas {
		r.HitTokens += d["sim_kv_prefix_hit_tokens_total"]
		r.CrossHostBytes += d["pegaflow_engine_peer_fetch_bytes_total"]
		r.KVFailures += d["sim_kv_save_failures_total"] + d["sim_kv_load_failures_total"] + d["sim_kv_verify_failures_total"]
		for k, v := range d {
			// Matched by label, not by the whole series: the router adds
			// labels of its own (mode).
			if strings.HasPrefix(k, "pegaflow_router_kv_decisions_total{") &&
				strings.Contains(k, `leg="decode"`) && strings.Contains(k, `reason="bypass"`) {
				r.Bypasses += v
			}
		}
	}
}

// writeDeltas keeps a run's non-zero counter deltas, page by page, for
// explaining its row (docs/router.md reads them).
func writeDeltas(path string, names []string, deltas []bench.Sample) error {
	var b strings.Builder
	for i, d := range deltas {
		keys := make([]string, 0, len(d))
		for k, v := range d {
			if v != 0 {
				keys = append(keys, k)
			}
		}
		sort.Strings(keys)
		fmt.Fprintf(&b, "# %s\n", names[i])
		for _, k := range keys {
			fmt.Fprintf(&b, "%s %g\n", k, d[k])
		}
	}
	if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
		return fmt.Errorf("metrics deltas: %w", err)
	}
	return nil
}

// WriteTable prints the comparison: per policy, the hit ratio and the
// oracle's on the same run's requests, TTFT over turns >= 2, bypasses and
// cross-host bytes.
func (r *KVReport) WriteTable(out io.Writer, w bench.Config) error {
	var b strings.Builder
	fmt.Fprintf(&b, "PegaFlow KV routing demo: 2 hosts, 2 P + 2 D sims (kv_both), %d users x %d turns, system prompt %d words, "+
		"messages %d words, answers %d tokens, %s users/s, think %s, seed %d\n\n",
		w.Users, w.Turns, w.SystemPromptLen, w.InputLen, w.OutputLen, rateString(w.RequestRate), w.ThinkTime, w.Seed)
	fmt.Fprintf(&b, "| %-16s | %9s | %6s | %14s | %13s | %8s | %14s | %6s |\n", "policy", "hit ratio", "oracle",
		"TTFT mean t>=2", "TTFT p99 t>=2", "bypasses", "cross-host MiB", "failed")
	fmt.Fprintf(&b, "|%s|%s:|%s:|%s:|%s:|%s:|%s:|%s:|\n", dashes(18), dashes(10), dashes(7), dashes(15), dashes(14),
		dashes(9), dashes(15), dashes(7))
	for _, row := range r.Rows {
		if row.Result == nil || row.Result.FollowUps == nil {
			why := row.Err
			if why == "" {
				why = "no follow-up turn completed"
			}
			fmt.Fprintf(&b, "| %-16s | not run: %s\n", row.Policy, truncateErr(why))
			continue
		}
		fu := row.Result.FollowUps
		fmt.Fprintf(&b, "| %-16s | %9s | %6s | %14s | %13s | %8.0f | %14.1f | %6d |\n", row.Policy, percent(row.HitRatio()),
			percent(row.OracleRatio), msCell(fu.TTFT.Mean, fu.TTFT.Count), msCell(p99(fu.TTFT), fu.TTFT.Count), row.Bypasses,
			row.CrossHostBytes/(1<<20), row.Result.Failed+row.Result.NotSent)
		if row.Err != "" {
			fmt.Fprintf(&b, "|   (%s)\n", truncateErr(row.Err))
		}
		if row.KVFailures > 0 {
			fmt.Fprintf(&b, "|   (%.0f failed KV saves, loads or verifications: see the sims' logs)\n", row.KVFailures)
		}
	}
	b.WriteString("\noracle: the hit ratio of a router knowing every host's content and ignoring load, on the same run's requests " +
		"(no eviction; a request loads what earlier ones had saved when it was sent)\n")
	_, err := io.WriteString(out, b.String())
	return err
}

func truncateErr(s string) string {
	if len(s) > 160 {
		return s[:160] + "..."
	}
	return s
}
