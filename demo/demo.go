// Package demo runs PegaFlow's whole system on one machine without GPUs and
// compares P/D disaggregation with aggregated serving on one workload:
//
//   - P/D: `pegaflow serve` (engine + router) in front of two `pegaflow sim`
//     instances, one prefill (P) and one decode (D), sharing KV through the
//     engine;
//   - DP2: a second `pegaflow serve --engine=false` (a router alone, no
//     pool) routing round-robin (--backend) to two aggregated sims, the
//     baseline the seed's table compares with.
//
// With Hosts 2 (`pegaflow demo --hosts 2`) the comparison is P/D on one
// host against P/D across two (twohosts.go): two network namespaces
// joined by a veth pair, D's engine fetching P's KV from P's engine over
// the validated stream.
//
// Every piece is a real process on real sockets; the demo only starts them,
// waits until they are healthy, runs `pegaflow bench`'s measurement against
// each router in turn, and reads the engine's and sims' /metrics. Whatever
// happens (failure, Ctrl-C), every process it started is stopped, and every
// namespace it created is deleted.
//
// The pieces, each in its own file:
//   - demo.go (this file): Config, the report types and the one-host run
//     (P/D against DP2);
//   - twohosts.go: P/D on one host against P/D across two namespaces;
//   - kv.go: the KV-aware routing comparison on the two-host lab (--kv:
//     one run per --lb policy on a multi-turn workload);
//   - ssd.go: the SSD tier demo (--ssd: a pool smaller than a multi-turn
//     workload's KV, without and with --ssd-dir, then the engine killed
//     with SIGKILL and restarted mid-run);
//   - oracle.go: the oracle column of that comparison (the hit ratio a
//     router knowing every host's content would reach on a run's
//     requests);
//   - procs.go: the process group (start, health waits, stop) and free
//     ports;
//   - bench.Scrape (bench/scrape.go) reads and diffs the processes' /metrics;
//   - report.go: the comparison table.
//
// It sits beside sim/ and bench/, not under internal/: it imports bench
// (the measurement), and no internal/ package imports a command's package.
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
	"strings"
	"time"

	"github.com/pegaflow/pegaflow/bench"
	"github.com/pegaflow/pegaflow/internal/netlab"
)

// routerHealthInterval: the routers re-poll their backends this often, so
// the demo's start does not wait out the default 5 s after a backend that
// was polled before it was up.
const routerHealthInterval = "500ms"

// Config of one demo run. DefaultConfig is what `make demo` runs.
type Config struct {
	// Binary is the pegaflow executable the processes run.
	Binary string
	// WorkDir receives the logs, the engine socket and the results
	// (pd.json, dp2.json, latency SVGs).
	WorkDir string
	// Workload is the benchmark run against both setups; BaseURL is set
	// per setup.
	Workload bench.Config
	// SimFlags are extra `pegaflow sim` flags for all four sims (cost
	// model, geometry).
	SimFlags []string
	// PoolSize is the P/D engine's pool (`serve --pool-size`).
	PoolSize string
	// StartTimeout bounds each process's wait for /health.
	StartTimeout time.Duration
	// StopGrace is how long a process gets to exit after SIGTERM.
	StopGrace time.Duration
	// Hosts is 1 (P/D against DP2 on this machine) or 2 (P/D on one host
	// against P/D across two network namespaces; needs root).
	Hosts int
}

// DefaultConfig is the seed's workload (random dataset, 5000 input / 200
// output tokens, Poisson arrivals) at 2 req/s with 60 prompts, so both runs
// finish in about 80 s. The sims' cost model puts a 5000-token prefill at
// ~200 ms in chunks of 2048 tokens, each chunk stalling the decodes that
// share its step: the effect P/D removes.
func DefaultConfig() Config {
	w := bench.DefaultConfig()
	w.NumPrompts = 60
	w.RequestRate = 2
	w.InputLen = 5000
	w.OutputLen = 200
	w.Seed = 1
	w.Timeout = time.Minute
	w.Percentiles = []float64{50, 99}
	return Config{
		WorkDir:  filepath.Join("build", "demo"),
		Workload: w,
		SimFlags: []string{
			"--num-blocks", "4096", "--max-batch-tokens", "2048",
			"--decode-us-per-step", "8000", "--prefill-us-per-token", "40", "--decode-us-per-token", "100",
		},
		PoolSize:     "1GiB",
		StartTimeout: 30 * time.Second,
		StopGrace:    5 * time.Second,
		Hosts:        1,
	}
}

// Validate checks the configuration.
func (c *Config) Validate() error {
	if c.Binary == "" {
		return errors.New("no pegaflow binary given")
	}
	if c.WorkDir == "" {
		return errors.New("no work directory given")
	}
	if c.StartTimeout <= 0 || c.StopGrace <= 0 {
		return errors.New("start timeout and stop grace must be positive")
	}
	if c.Hosts != 1 && c.Hosts != 2 {
		return fmt.Errorf("hosts %d: want 1 or 2", c.Hosts)
	}
	w := c.Workload
	w.BaseURL = "http://127.0.0.1:1" // set per setup; only the rest is checked here
	return w.Validate()
}

// Setup is one measured serving setup.
type Setup struct {
	Name   string        `json:"name"`
	Result *bench.Result `json:"result"`
}

// failed reports whether the setup did not run or lost a request.
func (s Setup) failed() bool {
	return s.Result == nil || s.Result.Failed > 0 || s.Result.NotSent > 0
}

// EngineStats is what the engines and D did during a P/D run. Across two
// hosts, the save side (SavedBytes, TransfersReady) is engine A's and the
// rest engine B's, D's engine.
type EngineStats struct {
	QueriedBlocks   float64 `json:"queried_blocks"`
	HitBlocks       float64 `json:"hit_blocks"`
	SavedBytes      float64 `json:"saved_bytes"`
	LoadedBytes     float64 `json:"loaded_bytes"`
	TransfersReady  float64 `json:"transfers_ready"`
	DBlocksLoaded   float64 `json:"d_blocks_loaded"`   // D sim: prompt blocks loaded from the engine
	DPrefillTokens  float64 `json:"d_prefill_tokens"`  // D sim: prompt tokens it computed itself
	DVerifyFailures float64 `json:"d_verify_failures"` // D sim: loaded KV that did not match the prompt
	// Across two hosts: what D's engine fetched from P's engine.
	PeerFetchedBlocks float64 `json:"peer_fetched_blocks,omitempty"`
	PeerFetchedBytes  float64 `json:"peer_fetched_bytes,omitempty"`
	PeerFetches       float64 `json:"peer_fetches,omitempty"`        // fetches (each of one query's missing blocks)
	PeerFetchFailures float64 `json:"peer_fetch_failures,omitempty"` // fetches that ended short, any reason
}

// engineStats reads a P/D run's counters: saver is the engine P saves to,
// loader the one D queries and loads from (the same engine on one host),
// d is D's sim.
func engineStats(saver, loader, d bench.Sample) EngineStats {
	return EngineStats{
		QueriedBlocks:     loader["pegaflow_engine_hits_total"] + loader["pegaflow_engine_misses_total"],
		HitBlocks:         loader["pegaflow_engine_hits_total"],
		SavedBytes:        saver["pegaflow_engine_saved_bytes_total"],
		LoadedBytes:       loader["pegaflow_engine_loaded_bytes_total"],
		TransfersReady:    saver[`pegaflow_engine_transfers_total{status="ready"}`],
		DBlocksLoaded:     d["sim_kv_blocks_loaded_total"],
		DPrefillTokens:    d["sim_prefill_tokens_computed_total"],
		DVerifyFailures:   d["sim_kv_verify_failures_total"],
		PeerFetchedBlocks: loader["pegaflow_engine_peer_fetch_blocks_total"],
		PeerFetchedBytes:  loader["pegaflow_engine_peer_fetch_bytes_total"],
		PeerFetches:       loader["pegaflow_engine_peer_fetch_duration_seconds_count"],
		PeerFetchFailures: loader["pegaflow_engine_peer_fetch_failures_total"],
	}
}

// HitRatio is hit blocks / queried blocks (NaN when nothing was queried).
func (e EngineStats) HitRatio() float64 {
	if e.QueriedBlocks == 0 {
		return math.NaN()
	}
	return e.HitBlocks / e.QueriedBlocks
}

// Report is the outcome of a demo run: P/D and, compared with it, DP2
// (Hosts 1) or P/D across two hosts (Hosts 2).
type Report struct {
	PD     Setup       `json:"pd"`
	DP2    Setup       `json:"dp2,omitzero"`
	Engine EngineStats `json:"engine"` // during the P/D run
	// TwoHosts is P/D across the two namespaces; TwoHostsEngine what its
	// engines and D did.
	TwoHosts       Setup       `json:"two_hosts,omitzero"`
	TwoHostsEngine EngineStats `json:"two_hosts_engine,omitzero"`
}

// twoHosts reports whether the report compares one host with two.
func (r *Report) twoHosts() bool { return r.TwoHosts.Name != "" }

// compared is the setup P/D is compared with.
func (r *Report) compared() Setup {
	if r.twoHosts() {
		return r.TwoHosts
	}
	return r.DP2
}

// Failed reports whether any request of either setup failed, or a setup
// did not run.
func (r *Report) Failed() bool { return r.PD.failed() || r.compared().failed() }

// Run starts the setups, benchmarks P/D then the one it is compared with
// (DP2, or with Hosts 2 P/D across two hosts), and stops everything.
// progress (may be nil) receives step messages and the benchmark progress.
// The report is returned even when a benchmark failed part-way, as long as
// it ran.
func Run(ctx context.Context, cfg Config, progress io.Writer) (*Report, error) {
	progress, logDir, err := cfg.prepare(progress)
	if err != nil {
		return nil, err
	}
	if cfg.Hosts == 2 {
		return runTwoHosts(ctx, cfg, progress, logDir)
	}
	g := newGroup(logDir)
	defer g.stop(cfg.StopGrace)

	addrs, err := freeAddrs(6)
	if err != nil {
		return nil, err
	}
	pdRouter, p, d, dpRouter, a1, a2 := addrs[0], addrs[1], addrs[2], addrs[3], addrs[4], addrs[5]
	sock := filepath.Join(cfg.WorkDir, "engine.sock")
	_ = os.Remove(sock)

	specs := append(pdSpecs(cfg, sock, pdRouter, p, d),
		spec{name: "sim-agg1", addr: a1, args: simArgs(cfg, a1)},
		spec{name: "sim-agg2", addr: a2, args: simArgs(cfg, a2)},
		// The DP2 router needs no engine: --engine=false allocates no pool.
		spec{name: "router-dp2", addr: dpRouter, router: true, args: []string{"serve", "--engine=false", "--http-addr", dpRouter,
			"--backend", "http://" + a1, "--backend", "http://" + a2,
			"--health-interval", routerHealthInterval, "--log-level", "warn"}})
	if err := startAll(ctx, g, cfg, specs, progress, logDir); err != nil {
		return nil, err
	}

	rep := &Report{PD: Setup{Name: pdName}, DP2: Setup{Name: "DP2 2x aggregated"}}
	rep.PD.Result, rep.Engine, err = measurePD(ctx, cfg, progress, rep.PD.Name, http.DefaultClient, "http://"+pdRouter,
		sameHostProbe(http.DefaultClient, "http://"+pdRouter, "http://"+d))
	if err != nil {
		return rep, err
	}
	rep.DP2.Result, err = runBench(ctx, cfg, progress, rep.DP2.Name, http.DefaultClient, "http://"+dpRouter)
	if err != nil {
		return rep, fmt.Errorf("DP2 benchmark: %w", err)
	}
	return rep, nil
}

// pdName is the same-host P/D setup's row.
const pdName = "P/D 1P+1D"

// spec is one process of a setup. host nil: this machine's network;
// else the process runs in host's namespace.
type spec struct {
	name   string
	addr   string // host:port its /health answers on
	args   []string
	router bool // a router: wait until it sees every backend healthy
	host   *netlab.Host
}

// simArgs is `pegaflow sim` on addr with the demo's sim flags, then extra.
func simArgs(cfg Config, addr string, extra ...string) []string {
	args := append([]string{"sim", "--http-addr", addr, "--log-level", "warn"}, cfg.SimFlags...)
	return append(args, extra...)
}

// pdSpecs is same-host P/D: one `serve` (engine + router) on sock and the
// P and D sims sharing its engine. Order matters: the engine first (the
// sims register with it).
func pdSpecs(cfg Config, sock, router, p, d string) []spec {
	return []spec{
		{name: "engine+router-pd", addr: router, router: true, args: []string{"serve", "--socket", sock, "--http-addr", router,
			"--pool-size", cfg.PoolSize, "--prefill", "http://" + p, "--decode", "http://" + d,
			"--health-interval", routerHealthInterval, "--log-level", "warn"}},
		{name: "sim-p", addr: p, args: simArgs(cfg, p, "--engine-socket", sock, "--instance-id", "p0")},
		{name: "sim-d", addr: d, args: simArgs(cfg, d, "--engine-socket", sock, "--instance-id", "d0")},
	}
}

// startAll starts specs in order into g, waits until each answers
// /health, then until each router sees its backends healthy (a router's
// health checks need live backends, so routers are waited for last).
func startAll(ctx context.Context, g *group, cfg Config, specs []spec, progress io.Writer, logDir string) error {
	fmt.Fprintf(progress, "demo: starting %d processes (logs in %s)\n", len(specs), logDir)
	procs := make([]*process, len(specs))
	for i, s := range specs {
		var err error
		if s.host == nil {
			procs[i], err = g.start(s.name, cfg.Binary, s.args...)
		} else {
			cmd := s.host.Command(cfg.Binary, s.args...)
			procs[i], err = g.startCmd(s.name, cmd, s.host.HTTPClient(0))
		}
		if err != nil {
			return err
		}
	}
	for i, s := range specs {
		if err := waitHealthy(ctx, procs[i], "http://"+s.addr+"/health", cfg.StartTimeout); err != nil {
			return err
		}
	}
	for i, s := range specs {
		if s.router {
			if err := waitRouterReady(ctx, procs[i], "http://"+s.addr, cfg.StartTimeout); err != nil {
				return err
			}
		}
	}
	return nil
}

// runBench runs the workload against the router at baseURL (reached with
// hc) and keeps its result and latency plot in the work directory, named
// after the setup's first word.
func runBench(ctx context.Context, cfg Config, progress io.Writer, name string, hc *http.Client, baseURL string) (*bench.Result, error) {
	w := cfg.Workload
	w.BaseURL = baseURL
	if hc != http.DefaultClient {
		w.HTTPClient = hc
	}
	fmt.Fprintf(progress, "demo: benchmarking %s (%d prompts, %d in / %d out tokens, rate %s req/s)\n",
		name, w.NumPrompts, w.InputLen, w.OutputLen, rateString(w.RequestRate))
	res, err := bench.Run(ctx, w, progress)
	if res != nil {
		_ = res.WriteJSONFile(filepath.Join(cfg.WorkDir, slug(name)+".json"))
		_ = res.WriteSVGFile(filepath.Join(cfg.WorkDir, slug(name)+"-latency.svg"))
	}
	return res, err
}

// slug names a setup's files: "P/D 1P+1D" -> "pd", "P/D 2 hosts" ->
// "pd-2hosts", "DP2 2x aggregated" -> "dp2".
func slug(name string) string {
	if strings.Contains(name, "2 hosts") {
		return "pd-2hosts"
	}
	s := strings.ToLower(strings.SplitN(name, " ", 2)[0])
	return strings.ReplaceAll(s, "/", "")
}

// pdSamples is one reading of a P/D setup's /metrics pages: the engine P
// saves to, the one D loads from (the same on one host), and D.
type pdSamples struct{ saver, loader, d bench.Sample }

// probe reads a P/D setup's pages; a run's figures are the difference of
// a reading after it and one before.
type probe func(ctx context.Context) (pdSamples, error)

// sameHostProbe reads the one engine (its /metrics at engineURL) and D.
func sameHostProbe(hc *http.Client, engineURL, dURL string) probe {
	return func(ctx context.Context) (pdSamples, error) {
		e, err := bench.Scrape(ctx, hc, engineURL)
		if err != nil {
			return pdSamples{}, err
		}
		d, err := bench.Scrape(ctx, hc, dURL)
		if err != nil {
			return pdSamples{}, err
		}
		return pdSamples{saver: e, loader: e, d: d}, nil
	}
}

// measurePD benchmarks a P/D setup and what its engines and D did. The
// figures are read even after an interrupted run (with a fresh deadline:
// ctx may be the cancelled one).
func measurePD(ctx context.Context, cfg Config, progress io.Writer, name string, hc *http.Client, routerURL string,
	read probe) (*bench.Result, EngineStats, error) {
	before, err := read(ctx)
	if err != nil {
		return nil, EngineStats{}, err
	}
	res, err := runBench(ctx, cfg, progress, name, hc, routerURL)
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	after, serr := read(sctx)
	var stats EngineStats
	if serr == nil {
		stats = engineStats(after.saver.Delta(before.saver), after.loader.Delta(before.loader), after.d.Delta(before.d))
	}
	if err != nil {
		return res, stats, fmt.Errorf("%s benchmark: %w", name, err)
	}
	return res, stats, serr
}

func rateString(r float64) string {
	if math.IsInf(r, 1) {
		return "inf"
	}
	return fmt.Sprintf("%g", r)
}

// prepare is what every demo run does first: validate cfg, default the
// progress writer, and make the work directory's logs folder.
func (cfg Config) prepare(progress io.Writer) (io.Writer, string, error) {
	if err := cfg.Validate(); err != nil {
		return nil, "", err
	}
	if progress == nil {
		progress = io.Discard
	}
	logDir := filepath.Join(cfg.WorkDir, "logs")
	if err := os.MkdirAll(logDir, 0o755); err != nil {
		return nil, "", fmt.Errorf("work dir: %w", err)
	}
	return progress, logDir, nil
}
