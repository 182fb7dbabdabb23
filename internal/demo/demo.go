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
// Every piece is a real process on real sockets; the demo only starts them,
// waits until they are healthy, runs `pegaflow bench`'s measurement against
// each router in turn, and reads the engine's and sims' /metrics. Whatever
// happens (failure, Ctrl-C), every process it started is stopped.
package demo

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/pegaflow/pegaflow/bench"
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
	w := c.Workload
	w.BaseURL = "http://127.0.0.1:1" // set per setup; only the rest is checked here
	return w.Validate()
}

// Setup is one measured serving setup.
type Setup struct {
	Name   string        `json:"name"`
	Result *bench.Result `json:"result"`
}

// EngineStats is what the P/D engine did during the P/D run.
type EngineStats struct {
	QueriedBlocks   float64 `json:"queried_blocks"`
	HitBlocks       float64 `json:"hit_blocks"`
	SavedBytes      float64 `json:"saved_bytes"`
	LoadedBytes     float64 `json:"loaded_bytes"`
	TransfersReady  float64 `json:"transfers_ready"`
	DBlocksLoaded   float64 `json:"d_blocks_loaded"`   // D sim: prompt blocks loaded from the engine
	DPrefillTokens  float64 `json:"d_prefill_tokens"`  // D sim: prompt tokens it computed itself
	DVerifyFailures float64 `json:"d_verify_failures"` // D sim: loaded KV that did not match the prompt
}

// HitRatio is hit blocks / queried blocks (NaN when nothing was queried).
func (e EngineStats) HitRatio() float64 {
	if e.QueriedBlocks == 0 {
		return math.NaN()
	}
	return e.HitBlocks / e.QueriedBlocks
}

// Report is the outcome of a demo run.
type Report struct {
	PD     Setup       `json:"pd"`
	DP2    Setup       `json:"dp2"`
	Engine EngineStats `json:"engine"`
}

// Failed reports whether any request of either setup failed.
func (r *Report) Failed() bool {
	return r.PD.Result == nil || r.DP2.Result == nil || r.PD.Result.Failed > 0 || r.DP2.Result.Failed > 0 ||
		r.PD.Result.NotSent > 0 || r.DP2.Result.NotSent > 0
}

// Run starts the two setups, benchmarks P/D then DP2, and stops everything.
// progress (may be nil) receives step messages and the benchmark progress.
// The report is returned even when a benchmark failed part-way, as long as
// it ran.
func Run(ctx context.Context, cfg Config, progress io.Writer) (*Report, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if progress == nil {
		progress = io.Discard
	}
	logDir := filepath.Join(cfg.WorkDir, "logs")
	if err := os.MkdirAll(logDir, 0o755); err != nil {
		return nil, fmt.Errorf("work dir: %w", err)
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

	type spec struct {
		name string
		addr string
		args []string
	}
	sim := func(addr string, extra ...string) []string {
		args := append([]string{"sim", "--http-addr", addr, "--log-level", "warn"}, cfg.SimFlags...)
		return append(args, extra...)
	}
	// Order matters: the engine first (the P/D sims register with it),
	// routers last (their health checks need live backends).
	specs := []spec{
		{"engine+router-pd", pdRouter, []string{"serve", "--socket", sock, "--http-addr", pdRouter,
			"--pool-size", cfg.PoolSize, "--prefill", "http://" + p, "--decode", "http://" + d,
			"--health-interval", routerHealthInterval, "--log-level", "warn"}},
		{"sim-p", p, sim(p, "--engine-socket", sock, "--instance-id", "p0")},
		{"sim-d", d, sim(d, "--engine-socket", sock, "--instance-id", "d0")},
		{"sim-agg1", a1, sim(a1)},
		{"sim-agg2", a2, sim(a2)},
		// The DP2 router needs no engine: --engine=false allocates no pool.
		{"router-dp2", dpRouter, []string{"serve", "--engine=false", "--http-addr", dpRouter,
			"--backend", "http://" + a1, "--backend", "http://" + a2,
			"--health-interval", routerHealthInterval, "--log-level", "warn"}},
	}
	fmt.Fprintf(progress, "demo: starting %d processes (logs in %s)\n", len(specs), logDir)
	procs := map[string]*process{}
	for _, s := range specs {
		proc, err := g.start(s.name, cfg.Binary, s.args...)
		if err != nil {
			return nil, err
		}
		procs[s.name] = proc
	}
	for _, s := range specs {
		if err := waitHealthy(ctx, procs[s.name], "http://"+s.addr+"/health", cfg.StartTimeout); err != nil {
			return nil, err
		}
	}
	for _, r := range []struct{ name, addr string }{{"engine+router-pd", pdRouter}, {"router-dp2", dpRouter}} {
		if err := waitRouterReady(ctx, procs[r.name], "http://"+r.addr, cfg.StartTimeout); err != nil {
			return nil, err
		}
	}

	rep := &Report{PD: Setup{Name: "P/D 1P+1D"}, DP2: Setup{Name: "DP2 2x aggregated"}}
	run := func(name, addr string) (*bench.Result, error) {
		w := cfg.Workload
		w.BaseURL = "http://" + addr
		fmt.Fprintf(progress, "demo: benchmarking %s (%d prompts, %d in / %d out tokens, rate %s req/s)\n",
			name, w.NumPrompts, w.InputLen, w.OutputLen, rateString(w.RequestRate))
		res, err := bench.Run(ctx, w, progress)
		if res != nil {
			slug := strings.ToLower(strings.SplitN(name, " ", 2)[0])
			slug = strings.ReplaceAll(slug, "/", "")
			_ = res.WriteJSONFile(filepath.Join(cfg.WorkDir, slug+".json"))
			_ = res.WriteSVGFile(filepath.Join(cfg.WorkDir, slug+"-latency.svg"))
		}
		return res, err
	}

	engineBefore, err := scrape(ctx, "http://"+pdRouter)
	if err != nil {
		return nil, err
	}
	dBefore, err := scrape(ctx, "http://"+d)
	if err != nil {
		return nil, err
	}
	rep.PD.Result, err = run(rep.PD.Name, pdRouter)
	// The engine figures are read even after an interrupted run (with a
	// fresh deadline: ctx may be the cancelled one).
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	engineAfter, serr := scrape(sctx, "http://"+pdRouter)
	dAfter, derr := scrape(sctx, "http://"+d)
	if serr == nil && derr == nil {
		e, ds := engineAfter.delta(engineBefore), dAfter.delta(dBefore)
		rep.Engine = EngineStats{
			QueriedBlocks:   e["pegaflow_engine_hits_total"] + e["pegaflow_engine_misses_total"],
			HitBlocks:       e["pegaflow_engine_hits_total"],
			SavedBytes:      e["pegaflow_engine_saved_bytes_total"],
			LoadedBytes:     e["pegaflow_engine_loaded_bytes_total"],
			TransfersReady:  e[`pegaflow_engine_transfers_total{status="ready"}`],
			DBlocksLoaded:   ds["sim_kv_blocks_loaded_total"],
			DPrefillTokens:  ds["sim_prefill_tokens_computed_total"],
			DVerifyFailures: ds["sim_kv_verify_failures_total"],
		}
	}
	if err != nil {
		return rep, fmt.Errorf("P/D benchmark: %w", err)
	}
	if err := errors.Join(serr, derr); err != nil {
		return rep, err
	}

	rep.DP2.Result, err = run(rep.DP2.Name, dpRouter)
	if err != nil {
		return rep, fmt.Errorf("DP2 benchmark: %w", err)
	}
	return rep, nil
}

func rateString(r float64) string {
	if math.IsInf(r, 1) {
		return "inf"
	}
	return fmt.Sprintf("%g", r)
}
