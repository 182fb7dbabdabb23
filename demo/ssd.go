package demo

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"math"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/pegaflow/pegaflow/bench"
	"github.com/pegaflow/pegaflow/sim"
)

// The SSD tier demo (`pegaflow demo --ssd`, `make demo-ssd`): one engine
// (`pegaflow serve`, engine only) whose pool is several times smaller than
// a multi-turn workload's KV, two kv_both sims on it (every request loads
// its conversation's prefix from the engine and saves its blocks), and a
// round-robin proxy in front of the sims, so a conversation's turns land
// on both and its earlier turns' KV can only come from the engine. The
// workload runs three times, fresh processes each time:
//
//   - without --ssd-dir: what the pool evicts is gone;
//   - with --ssd-dir: blocks that prove reuse are written to SSD, and
//     what the pool evicts of them is promoted back on a hit;
//   - with --ssd-dir, the engine killed with SIGKILL mid-run and restarted
//     on the same directory and socket while the workload goes on: the
//     sims re-register, the restarted engine (empty DRAM) serves what it
//     recovered from the directory, seen per time window as tier="ssd"
//     hits.
//
// The proxy is the demo's own, not `pegaflow serve --engine=false`: a sim
// reports /health 503 while it has no engine session, and a router would
// stop routing to both sims for the length of the engine's restart; a
// vLLM whose connector lost its engine keeps serving (it recomputes), and
// so do the sims behind the proxy.

// SSDSettings are the SSD demo's knobs besides Config (binary, work
// directory, pool size, sim flags).
type SSDSettings struct {
	// Workload is the multi-turn chat run three times; BaseURL is set
	// per run.
	Workload bench.Config
	// SSDSize is each run's --ssd-size.
	SSDSize string
	// KillAfter: the third run kills the engine this long after its
	// workload started.
	KillAfter time.Duration
	// Window is the length of the third run's time windows.
	Window time.Duration
}

// SSDPoolSize is the engine pool the SSD demo uses unless told otherwise:
// 192 of the sims' 32 KiB blocks, a few times less than the default
// workload's KV.
const SSDPoolSize = "6MiB"

// DefaultSSDSettings: 6 conversations of 30 turns (a 200-word system
// prompt, 60-word messages, 30-token answers, no think time): about
// 1,100 blocks (35 MiB) of KV, 6x the default pool, ~15 s a run. Each
// turn's query hits its conversation's history, which so proves reuse
// and is written to SSD; what the pool evicts of it comes back from
// there.
func DefaultSSDSettings() SSDSettings {
	w := bench.DefaultConfig()
	w.Endpoint = bench.EndpointChat
	w.Users, w.Turns, w.SystemPromptLen = 6, 30, 200
	w.InputLen, w.OutputLen = 60, 30
	w.RequestRate, w.ThinkTime = 2, 0
	w.Seed = 1
	w.Timeout = time.Minute
	w.Percentiles = []float64{50, 90}
	return SSDSettings{Workload: w, SSDSize: "256MiB", KillAfter: 6 * time.Second, Window: 2 * time.Second}
}

// Validate checks the settings.
func (s SSDSettings) Validate() error {
	w := s.Workload
	w.BaseURL = "http://127.0.0.1:1"
	if w.Users < 1 || w.Turns < 2 {
		return fmt.Errorf("--ssd: --users %d --turns %d: want at least 1 user and 2 turns", w.Users, w.Turns)
	}
	if err := w.Validate(); err != nil {
		return fmt.Errorf("--ssd: %w", err)
	}
	if s.KillAfter <= 0 || s.Window <= 0 {
		return errors.New("--ssd: the kill time and the window must be positive")
	}
	if s.SSDSize == "" {
		return errors.New("--ssd: no SSD size")
	}
	return nil
}

// SSDRun is one run's outcome.
type SSDRun struct {
	Name   string        `json:"name"`
	SSD    bool          `json:"ssd"`
	Result *bench.Result `json:"result,omitempty"`
	Err    string        `json:"error,omitempty"`
	// Tiers are the engine's query_blocks_total by tier (dram, ssd, peer,
	// miss) over the run (across the restart: both engines').
	Tiers    map[string]float64 `json:"tiers"`
	Spilled  float64            `json:"ssd_spill_blocks"`
	Promoted float64            `json:"ssd_promote_blocks"`
	// PromptTokens and HitTokens: the sims' prompt tokens and those they
	// loaded from the engine.
	PromptTokens   float64 `json:"prompt_tokens"`
	HitTokens      float64 `json:"hit_tokens"`
	VerifyFailures float64 `json:"verify_failures"`
	// Kill is the third run's restart (nil in the others).
	Kill *SSDKill `json:"kill,omitempty"`
}

// EngineHitRatio is (dram + ssd + peer) / queried blocks, NaN when none
// was queried.
func (r SSDRun) EngineHitRatio() float64 { return tierRatio(r.Tiers, "dram", "ssd", "peer") }

// SSDShare is the share of queried blocks served from the SSD tier.
func (r SSDRun) SSDShare() float64 { return tierRatio(r.Tiers, "ssd") }

// SimHitRatio is HitTokens / PromptTokens (NaN without prompts).
func (r SSDRun) SimHitRatio() float64 {
	if r.PromptTokens == 0 {
		return math.NaN()
	}
	return r.HitTokens / r.PromptTokens
}

func tierRatio(tiers map[string]float64, hit ...string) float64 {
	var h, all float64
	for t, v := range tiers {
		all += v
		for _, x := range hit {
			if t == x {
				h += v
			}
		}
	}
	if all == 0 {
		return math.NaN()
	}
	return h / all
}

// SSDKill is what the kill -9 and restart did.
type SSDKill struct {
	// KilledAt is when the engine was killed, from the workload's start;
	// EngineUp and SimsBack are from the kill until the restarted engine
	// answered /health and until every sim had registered with it again.
	KilledAt time.Duration `json:"killed_at_ns"`
	EngineUp time.Duration `json:"engine_up_ns"`
	SimsBack time.Duration `json:"sims_back_ns"`
	// RecoveredBlocks and RecoverySeconds are the restarted engine's
	// pegaflow_engine_ssd_recovered_blocks and _recovery_seconds.
	RecoveredBlocks float64     `json:"recovered_blocks"`
	RecoverySeconds float64     `json:"recovery_seconds"`
	Windows         []SSDWindow `json:"windows"`
	Err             string      `json:"error,omitempty"`
}

// SSDWindow is one time window of the third run.
type SSDWindow struct {
	Start time.Duration `json:"start_ns"`
	End   time.Duration `json:"end_ns"`
	// Phase: "before" the kill, "gap" (no engine answering /metrics at
	// the window's end, or killed within it) or "after" the restart.
	Phase        string             `json:"phase"`
	PromptTokens float64            `json:"prompt_tokens"`
	HitTokens    float64            `json:"hit_tokens"`
	Tiers        map[string]float64 `json:"tiers"`
}

// SSDReport is the demo's outcome: the runs without and with the SSD
// tier, and the one with the restart.
type SSDReport struct {
	Runs []SSDRun `json:"runs"`
}

// Failed reports whether a run did not happen, lost a request, saw a
// verification fail, or the restart did not come back.
func (r *SSDReport) Failed() bool {
	if len(r.Runs) != 3 {
		return true
	}
	for _, run := range r.Runs {
		if run.Err != "" || run.Result == nil || run.Result.Failed > 0 || run.Result.NotSent > 0 || run.VerifyFailures > 0 {
			return true
		}
	}
	k := r.Runs[2].Kill
	return k == nil || k.Err != "" || k.SimsBack == 0
}

// RunSSD runs the three runs in turn; one that cannot run is reported in
// its row and the next one runs.
func RunSSD(ctx context.Context, cfg Config, s SSDSettings, progress io.Writer) (*SSDReport, error) {
	progress, logDir, err := cfg.prepare(progress)
	if err != nil {
		return nil, err
	}
	if err := s.Validate(); err != nil {
		return nil, err
	}
	rep := &SSDReport{}
	for _, r := range []struct {
		name      string
		ssd, kill bool
	}{{"no SSD", false, false}, {"SSD", true, false}, {"SSD, kill -9", true, true}} {
		if ctx.Err() != nil {
			break
		}
		run := ssdRun{cfg: cfg, s: s, progress: progress, logDir: filepath.Join(logDir, "ssd-"+slugPolicy(strings.ReplaceAll(r.name, ",", "")))}
		rep.Runs = append(rep.Runs, run.run(ctx, r.name, r.ssd, r.kill))
	}
	return rep, ctx.Err()
}

// ssdRun is one run's processes and files.
type ssdRun struct {
	cfg      Config
	s        SSDSettings
	progress io.Writer
	logDir   string
}

func (r ssdRun) socket() string { return filepath.Join(r.cfg.WorkDir, "ssd-engine.sock") }
func (r ssdRun) ssdDir() string { return filepath.Join(r.cfg.WorkDir, "ssd-tier") }

// engineArgs is the engine alone on addr: no backends, so no router.
func (r ssdRun) engineArgs(addr string, ssd bool) []string {
	args := []string{"serve", "--socket", r.socket(), "--http-addr", addr, "--pool-size", r.cfg.PoolSize, "--log-level", "warn"}
	if ssd {
		args = append(args, "--ssd-dir", r.ssdDir(), "--ssd-size", r.s.SSDSize)
	}
	return args
}

func (r ssdRun) run(ctx context.Context, name string, ssd, kill bool) (out SSDRun) {
	out.Name, out.SSD = name, ssd
	fail := func(err error) SSDRun {
		out.Err = strings.TrimPrefix(out.Err+"; "+err.Error(), "; ")
		return out
	}
	if err := os.MkdirAll(r.logDir, 0o755); err != nil {
		return fail(err)
	}
	// Every run starts from an empty SSD directory: the restart's hits
	// must come from what this run spilled.
	if err := os.RemoveAll(r.ssdDir()); err != nil {
		return fail(err)
	}
	_ = os.Remove(r.socket())
	g := newGroup(r.logDir)
	defer func() {
		if err := g.stop(r.cfg.StopGrace); err != nil {
			fail(err)
		}
	}()
	addrs, err := freeAddrs(3)
	if err != nil {
		return fail(err)
	}
	engineAddr, sims := addrs[0], addrs[1:]
	fmt.Fprintf(r.progress, "demo: --ssd: %s: starting the engine (pool %s) and 2 sims (logs in %s)\n", name, r.cfg.PoolSize, r.logDir)
	engine, err := g.start("engine", r.cfg.Binary, r.engineArgs(engineAddr, ssd)...)
	if err != nil {
		return fail(err)
	}
	if err := waitHealthy(ctx, engine, "http://"+engineAddr+"/health", r.cfg.StartTimeout); err != nil {
		return fail(err)
	}
	simProcs := make([]*process, len(sims))
	for i, a := range sims {
		id := fmt.Sprintf("sim-%d", i+1)
		if simProcs[i], err = g.start(id, r.cfg.Binary, simArgs(r.cfg, a, "--engine-socket", r.socket(), "--instance-id", id, "--kv-role", sim.KVBoth)...); err != nil {
			return fail(err)
		}
	}
	for i, a := range sims {
		if err := waitHealthy(ctx, simProcs[i], "http://"+a+"/health", r.cfg.StartTimeout); err != nil {
			return fail(err)
		}
	}
	proxy, err := startRoundRobin(sims, filepath.Join(r.logDir, "proxy.log"))
	if err != nil {
		return fail(err)
	}
	defer proxy.Close()

	read := func(ctx context.Context) (bench.Sample, error) { return sumScrapes(ctx, sims) }
	simsBefore, err := read(ctx)
	if err != nil {
		return fail(err)
	}
	engineBefore, err := bench.Scrape(ctx, http.DefaultClient, "http://"+engineAddr)
	if err != nil {
		return fail(err)
	}
	w := r.s.Workload
	w.BaseURL = proxy.URL
	fmt.Fprintf(r.progress, "demo: --ssd: %s: %d users x %d turns\n", name, w.Users, w.Turns)
	var k *killer
	bctx, stopBench := context.WithCancel(ctx)
	defer stopBench()
	if kill {
		k = &killer{run: r, g: g, engine: engine, engineAddr: engineAddr, sims: sims, start: time.Now()}
		k.wg.Add(1)
		go k.loop(bctx)
	}
	res, berr := bench.Run(ctx, w, r.progress)
	stopBench()
	out.Result = res
	if res != nil {
		_ = res.WriteJSONFile(filepath.Join(r.cfg.WorkDir, "ssd-"+slugPolicy(strings.ReplaceAll(name, ",", ""))+".json"))
	}
	if berr != nil {
		fail(berr)
	}
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	simsAfter, err := read(sctx)
	if err != nil {
		return fail(err)
	}
	d := simsAfter.Delta(simsBefore)
	out.PromptTokens, out.HitTokens = d["vllm:prompt_tokens_total"], d["sim_kv_prefix_hit_tokens_total"]
	out.VerifyFailures = d["sim_kv_verify_failures_total"]
	if k != nil {
		k.wg.Wait()
		out.Kill = &k.out
		// The restarted engine's counters started at zero: the run's
		// figures are the first engine's until the kill plus the
		// second's.
		out.Tiers = map[string]float64{}
		for _, win := range k.out.Windows {
			for t, v := range win.Tiers {
				out.Tiers[t] += v
			}
		}
		if k.out.Err != "" {
			fail(errors.New(k.out.Err))
		}
	}
	engineAfter, err := bench.Scrape(sctx, http.DefaultClient, "http://"+engineAddr)
	if err != nil {
		return fail(err)
	}
	if k != nil {
		k.out.RecoveredBlocks = sumPrefix(engineAfter, "pegaflow_engine_ssd_recovered_blocks")
		k.out.RecoverySeconds = sumPrefix(engineAfter, "pegaflow_engine_ssd_recovery_seconds")
		engineBefore = bench.Sample{}
	}
	e := engineAfter.Delta(engineBefore)
	if k == nil {
		out.Tiers = tiers(e)
	}
	out.Spilled, out.Promoted = e["pegaflow_engine_ssd_spill_blocks_total"], e["pegaflow_engine_ssd_promote_blocks_total"]
	if k != nil {
		// Spills and promotes of the killed engine, up to its last
		// reading.
		out.Spilled += k.firstSpilled
		out.Promoted += k.firstPromoted
	}
	return out
}

// tierNames are query_blocks_total's tiers.
var tierNames = [...]string{"dram", "ssd", "peer", "miss"}

func tiers(s bench.Sample) map[string]float64 {
	out := make(map[string]float64, len(tierNames))
	for _, t := range tierNames {
		out[t] = s[`pegaflow_engine_query_blocks_total{tier="`+t+`"}`]
	}
	return out
}

// sumPrefix adds every series of a metric (all its label sets).
func sumPrefix(s bench.Sample, name string) float64 {
	var v float64
	for k, x := range s {
		if strings.HasPrefix(k, name+"{") {
			v += x
		}
	}
	return v
}

// sumScrapes reads the sims' pages and adds them up.
func sumScrapes(ctx context.Context, addrs []string) (bench.Sample, error) {
	sum := bench.Sample{}
	for _, a := range addrs {
		s, err := bench.Scrape(ctx, http.DefaultClient, "http://"+a)
		if err != nil {
			return nil, err
		}
		for k, v := range s {
			sum[k] += v
		}
	}
	return sum, nil
}

// killer samples the third run per window, kills the engine at KillAfter
// and restarts it.
type killer struct {
	run        ssdRun
	g          *group
	engine     *process
	engineAddr string
	sims       []string
	start      time.Time
	wg         sync.WaitGroup
	out        SSDKill
	// The killed engine's spill and promote counters at its last reading.
	firstSpilled, firstPromoted float64
}

// loop reads the pages at every window's end until ctx ends (the
// workload finished), and kills and restarts the engine once.
func (k *killer) loop(ctx context.Context) {
	defer k.wg.Done()
	tick := time.NewTicker(k.run.s.Window)
	defer tick.Stop()
	killTimer := time.NewTimer(k.run.s.KillAfter)
	defer killTimer.Stop()
	var prevSims, prevEngine bench.Sample
	prevEngineGen, gen := 0, 0
	prevAt := time.Duration(0)
	killedIn := false
	sample := func() {
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
		defer cancel()
		at := time.Since(k.start)
		s, err := sumScrapes(sctx, k.sims)
		if err != nil {
			return
		}
		e, eerr := bench.Scrape(sctx, http.DefaultClient, "http://"+k.engineAddr)
		if prevSims != nil {
			d := s.Delta(prevSims)
			win := SSDWindow{Start: prevAt, End: at, PromptTokens: d["vllm:prompt_tokens_total"], HitTokens: d["sim_kv_prefix_hit_tokens_total"],
				Tiers: map[string]float64{}}
			switch {
			case eerr != nil:
				win.Phase = "gap"
			case gen != prevEngineGen:
				// The restarted engine's counters count from zero.
				win.Phase, win.Tiers = "gap", tiers(e)
			default:
				win.Phase, win.Tiers = "before", tiers(e.Delta(prevEngine))
				if gen > 0 {
					win.Phase = "after"
				}
			}
			if killedIn {
				win.Phase = "gap"
			}
			k.out.Windows = append(k.out.Windows, win)
		}
		killedIn = false
		prevSims, prevAt = s, at
		if eerr == nil {
			prevEngine, prevEngineGen = e, gen
			if gen == 0 {
				k.firstSpilled, k.firstPromoted = e["pegaflow_engine_ssd_spill_blocks_total"], e["pegaflow_engine_ssd_promote_blocks_total"]
			}
		}
	}
	sample()
	for {
		select {
		case <-ctx.Done():
			sample()
			return
		case <-tick.C:
			sample()
		case <-killTimer.C:
			if time.Since(k.start)-prevAt > k.run.s.Window/4 {
				sample() // the old engine's last window, up to the kill
			}
			if err := k.killAndRestart(ctx); err != nil {
				k.out.Err = err.Error()
			}
			gen++
			killedIn = true
		}
	}
}

// killAndRestart sends SIGKILL to the engine, starts it again on the same
// socket and SSD directory, and times its /health and the sims'
// re-registration (their /health answers 200 again).
func (k *killer) killAndRestart(ctx context.Context) error {
	k.out.KilledAt = time.Since(k.start)
	fmt.Fprintf(k.run.progress, "demo: --ssd: kill -9 of the engine (pid %d) at %s\n", k.engine.cmd.Process.Pid, k.out.KilledAt.Round(time.Millisecond))
	killed := time.Now()
	if err := syscall.Kill(-k.engine.cmd.Process.Pid, syscall.SIGKILL); err != nil {
		return fmt.Errorf("kill the engine: %w", err)
	}
	select {
	case <-k.engine.done:
	case <-time.After(k.run.cfg.StopGrace):
		return fmt.Errorf("engine (pid %d) still running %s after SIGKILL", k.engine.cmd.Process.Pid, k.run.cfg.StopGrace)
	}
	// kill -9 leaves the socket file behind.
	_ = os.Remove(k.run.socket())
	p, err := k.g.start("engine-restarted", k.run.cfg.Binary, k.run.engineArgs(k.engineAddr, true)...)
	if err != nil {
		return err
	}
	if err := waitHealthy(ctx, p, "http://"+k.engineAddr+"/health", k.run.cfg.StartTimeout); err != nil {
		return err
	}
	k.out.EngineUp = time.Since(killed)
	for _, a := range k.sims {
		if err := waitHealthy(ctx, p, "http://"+a+"/health", k.run.cfg.StartTimeout); err != nil {
			return fmt.Errorf("sim at %s did not register with the restarted engine: %w", a, err)
		}
	}
	k.out.SimsBack = time.Since(killed)
	fmt.Fprintf(k.run.progress, "demo: --ssd: engine back after %s, sims registered after %s\n",
		k.out.EngineUp.Round(time.Millisecond), k.out.SimsBack.Round(time.Millisecond))
	return nil
}

// roundRobin is the demo's proxy: each request to the next sim, streamed
// through unbuffered.
type roundRobin struct {
	URL string
	srv *http.Server
	log *os.File // the proxy's error log, nil when it could not be created
}

func startRoundRobin(backends []string, logPath string) (*roundRobin, error) {
	targets := make([]*url.URL, len(backends))
	for i, b := range backends {
		targets[i] = &url.URL{Scheme: "http", Host: b}
	}
	var next atomic.Uint64
	rp := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(targets[(next.Add(1)-1)%uint64(len(targets))])
		},
		FlushInterval: -1,
		Transport:     http.DefaultTransport.(*http.Transport).Clone(),
	}
	// What the proxy saw go wrong with a backend (a cut stream) goes to
	// the run's logs, not the demo's output.
	lf, err := os.Create(logPath)
	if err == nil {
		rp.ErrorLog = log.New(lf, "proxy: ", log.LstdFlags|log.Lmicroseconds)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		if lf != nil {
			_ = lf.Close()
		}
		return nil, fmt.Errorf("round-robin proxy: %w", err)
	}
	// The request body is read whole before it is forwarded: streamed, the
	// transport's last read of it (for EOF) could come after the proxy had
	// flushed the sim's response headers to the client, which closes the
	// inbound body; the transport then closed the upstream connection
	// mid-stream ("use of closed network connection", the client's stream
	// cut) in about one kill run in three on a loaded machine.
	whole := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, 64<<20))
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		r.Body, r.ContentLength = io.NopCloser(bytes.NewReader(body)), int64(len(body))
		rp.ServeHTTP(w, r)
	})
	srv := &http.Server{Handler: whole, ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = srv.Serve(ln) }()
	return &roundRobin{URL: "http://" + ln.Addr().String(), srv: srv, log: lf}, nil
}

func (p *roundRobin) Close() {
	_ = p.srv.Close()
	if p.log != nil {
		_ = p.log.Close()
	}
}

// WriteTable prints the runs side by side, then the restart's figures and
// its windows.
func (r *SSDReport) WriteTable(out io.Writer, s SSDSettings, poolSize string) error {
	var b strings.Builder
	w := s.Workload
	fmt.Fprintf(&b, "PegaFlow SSD tier demo: engine pool %s, 2 kv_both sims behind round-robin, %d users x %d turns, system prompt %d words, "+
		"messages %d words, answers %d tokens, %s users/s, think %s, seed %d\n\n",
		poolSize, w.Users, w.Turns, w.SystemPromptLen, w.InputLen, w.OutputLen, rateString(w.RequestRate), w.ThinkTime, w.Seed)
	fmt.Fprintf(&b, "| %-13s | %10s | %9s | %8s | %12s | %12s | %7s | %8s | %6s | %6s |\n", "run", "engine hit", "ssd share",
		"sim hit", "TTFT p50 t>=2", "TTFT p90 t>=2", "spilled", "promoted", "verify", "failed")
	fmt.Fprintf(&b, "|%s|%s:|%s:|%s:|%s:|%s:|%s:|%s:|%s:|%s:|\n", dashes(15), dashes(11), dashes(10), dashes(9), dashes(13),
		dashes(13), dashes(8), dashes(9), dashes(7), dashes(7))
	for _, run := range r.Runs {
		if run.Result == nil {
			fmt.Fprintf(&b, "| %-13s | not run: %s\n", run.Name, truncateErr(run.Err))
			continue
		}
		p50, p90, n := math.NaN(), math.NaN(), 0
		if fu := run.Result.FollowUps; fu != nil {
			p50, p90, n = fu.TTFT.Percentiles["50"], fu.TTFT.Percentiles["90"], fu.TTFT.Count
		}
		fmt.Fprintf(&b, "| %-13s | %10s | %9s | %8s | %13s | %13s | %7.0f | %8.0f | %6.0f | %6d |\n", run.Name,
			percent(run.EngineHitRatio()), percent(run.SSDShare()), percent(run.SimHitRatio()), msCell(p50, n), msCell(p90, n),
			run.Spilled, run.Promoted, run.VerifyFailures, run.Result.Failed+run.Result.NotSent)
		if run.Err != "" {
			fmt.Fprintf(&b, "|   (%s)\n", truncateErr(run.Err))
		}
	}
	b.WriteString("engine hit: query_blocks_total dram+ssd / all queried blocks; ssd share: tier=\"ssd\" / all; " +
		"sim hit: prompt tokens the sims loaded from the engine / prompt tokens; TTFT in ms over turns >= 2\n")
	if len(r.Runs) == 3 && r.Runs[2].Kill != nil {
		k := r.Runs[2].Kill
		fmt.Fprintf(&b, "\nkill -9 of the engine at %s: engine answering again after %s, both sims re-registered after %s; "+
			"recovered %.0f blocks from the SSD directory in %.3f s\n\n",
			k.KilledAt.Round(time.Millisecond), k.EngineUp.Round(time.Millisecond), k.SimsBack.Round(time.Millisecond),
			k.RecoveredBlocks, k.RecoverySeconds)
		fmt.Fprintf(&b, "| %-13s | %-6s | %8s | %10s | %6s | %6s | %6s |\n", "window", "phase", "sim hit", "engine hit", "dram", "ssd", "miss")
		fmt.Fprintf(&b, "|%s|%s|%s:|%s:|%s:|%s:|%s:|\n", dashes(15), dashes(8), dashes(9), dashes(11), dashes(7), dashes(7), dashes(7))
		for _, win := range k.Windows {
			sh := math.NaN()
			if win.PromptTokens > 0 {
				sh = win.HitTokens / win.PromptTokens
			}
			fmt.Fprintf(&b, "| %5.1f-%5.1f s | %-6s | %8s | %10s | %6.0f | %6.0f | %6.0f |\n", win.Start.Seconds(), win.End.Seconds(), win.Phase,
				percent(sh), percent(tierRatio(win.Tiers, "dram", "ssd", "peer")), win.Tiers["dram"], win.Tiers["ssd"], win.Tiers["miss"])
		}
		if k.Err != "" {
			fmt.Fprintf(&b, "restart failed: %s\n", truncateErr(k.Err))
		}
	}
	for _, run := range r.Runs {
		writeFailures(&b, run.Name, run.Result)
	}
	_, err := io.WriteString(out, b.String())
	return err
}
