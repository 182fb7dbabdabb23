package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/pegaflow/pegaflow/bench"
	"github.com/pegaflow/pegaflow/demo"
	"github.com/pegaflow/pegaflow/internal/cli"
	"github.com/pegaflow/pegaflow/internal/netlab"
)

// runDemo is `pegaflow demo`: P/D (1P+1D through the engine) against DP2
// (two aggregated instances, round-robin) on one workload, with simulators
// in place of vLLM; with --hosts 2, P/D on one host against P/D across two
// network namespaces (root needed). Exit status 0 when every
// request of both runs succeeded, 1 otherwise, 2 on bad flags or when
// --hosts 2 cannot run here.
func runDemo(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	cfg := demo.DefaultConfig()
	fs := flag.NewFlagSet("pegaflow demo", flag.ContinueOnError)
	fs.SetOutput(stderr)
	w := &cfg.Workload
	fs.IntVar(&w.NumPrompts, "num-prompts", w.NumPrompts, "requests per setup")
	fs.Float64Var(&w.RequestRate, "request-rate", w.RequestRate, "requests per second (Poisson arrivals)")
	fs.IntVar(&w.InputLen, "random-input-len", w.InputLen, "prompt length in tokens")
	fs.IntVar(&w.OutputLen, "random-output-len", w.OutputLen, "output length in tokens")
	fs.Int64Var(&w.Seed, "seed", w.Seed, "seed of the dataset and the arrival times")
	fs.StringVar(&cfg.WorkDir, "work-dir", cfg.WorkDir, "directory for logs, the engine socket and results (pd.json, dp2.json, SVG plots)")
	fs.StringVar(&cfg.PoolSize, "pool-size", cfg.PoolSize, "P/D engine pool size")
	fs.DurationVar(&cfg.StartTimeout, "start-timeout", cfg.StartTimeout, "longest wait for each process to become healthy")
	fs.IntVar(&cfg.Hosts, "hosts", cfg.Hosts, "1: P/D against DP2; 2: P/D on one host against P/D across two network namespaces (needs root)")
	simFlags := strings.Join(cfg.SimFlags, " ")
	fs.StringVar(&simFlags, "sim-flags", simFlags, "flags passed to every `pegaflow sim` (cost model, geometry)")
	var reportPath string
	fs.StringVar(&reportPath, "json", "", "also write the report (both results and the engine figures) as JSON to this file")
	var kv bool
	fs.BoolVar(&kv, "kv", false, "compare routing policies (round-robin, least-inflight, --lb kv with and without P/D bypass, an oracle) on the two-host lab with a multi-turn chat workload (needs root; docs/router.md)")
	kvw := demo.KVWorkload()
	fs.IntVar(&kvw.Users, "users", kvw.Users, "--kv: conversations of the multi-turn workload")
	fs.IntVar(&kvw.Turns, "turns", kvw.Turns, "--kv: turns per conversation")
	var ssd bool
	fs.BoolVar(&ssd, "ssd", false, "the SSD tier: a multi-turn workload on an engine pool smaller than its KV, without and with --ssd-dir, then with the engine killed (-9) and restarted mid-run (pool --pool-size, default "+demo.SSDPoolSize+")")
	ssdS := demo.DefaultSSDSettings()
	fs.DurationVar(&ssdS.KillAfter, "kill-after", ssdS.KillAfter, "--ssd: kill the engine this long into the third run")
	var progress bool
	fs.BoolVar(&progress, "progress", true, "show steps and benchmark progress on stderr")
	err := cli.Parse(fs, args, nil)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err == nil && fs.NArg() > 0 {
		err = fmt.Errorf("unexpected arguments: %s", strings.Join(fs.Args(), " "))
	}
	cfg.SimFlags = strings.Fields(simFlags)
	if err == nil {
		cfg.Binary, err = os.Executable()
	}
	if err == nil {
		cfg.WorkDir, err = filepath.Abs(cfg.WorkDir)
	}
	if err == nil {
		err = cfg.Validate()
	}
	if err == nil && kv {
		kvw.Seed = cfg.Workload.Seed
		err = validateKVWorkload(kvw)
	}
	if err == nil && kv && ssd {
		err = errors.New("--kv and --ssd are separate demos: give one")
	}
	if err == nil && ssd {
		err = ssdSettings(fs, &cfg, &ssdS, kvw)
	}
	if err == nil && !kv && !ssd {
		fs.Visit(func(f *flag.Flag) {
			if f.Name == "users" || f.Name == "turns" {
				err = fmt.Errorf("--%s applies to --kv and --ssd only", f.Name)
			}
		})
	}
	if err == nil && !ssd {
		fs.Visit(func(f *flag.Flag) {
			if f.Name == "kill-after" {
				err = errors.New("--kill-after applies to --ssd only")
			}
		})
	}
	if err == nil && (cfg.Hosts == 2 || kv) {
		err = canRunTwoHosts()
	}
	if err != nil {
		fmt.Fprintf(stderr, "pegaflow demo: %v\n", err)
		return cli.ExitUsage
	}
	var prog io.Writer
	if progress {
		prog = stderr
	}
	if ssd {
		rep, runErr := demo.RunSSD(ctx, cfg, ssdS, prog)
		if rep == nil {
			return finishDemo(nil, nil, reportPath, runErr, "", stdout, stderr)
		}
		return finishDemo(rep, func(out io.Writer) error { return rep.WriteTable(out, ssdS, cfg.PoolSize) }, reportPath, runErr,
			"a run did not complete, lost requests, saw a KV verification fail, or the restart did not come back (see the table and the logs)", stdout, stderr)
	}
	if kv {
		return runDemoKV(ctx, cfg, kvw, prog, reportPath, stdout, stderr)
	}
	rep, runErr := demo.Run(ctx, cfg, prog)
	if rep == nil {
		return finishDemo(nil, nil, reportPath, runErr, "", stdout, stderr)
	}
	return finishDemo(rep, func(w io.Writer) error { return rep.WriteTable(w, cfg.Workload) }, reportPath, runErr,
		"some requests failed (see the table and the logs)", stdout, stderr)
}

// finishDemo prints a run's table, writes its JSON report, and gives the
// exit status: 1 when the run failed, could not be reported, or rep
// reports a failure (failMsg then says so), else 0. rep nil: no run.
func finishDemo(rep interface{ Failed() bool }, table func(io.Writer) error, reportPath string, runErr error,
	failMsg string, stdout, stderr io.Writer) int {
	if rep != nil {
		if err := table(stdout); err != nil {
			fmt.Fprintf(stderr, "pegaflow demo: %v\n", err)
			return 1
		}
		if reportPath != "" {
			if err := writeJSON(reportPath, rep); err != nil {
				fmt.Fprintf(stderr, "pegaflow demo: %v\n", err)
				return 1
			}
		}
	}
	if runErr != nil {
		fmt.Fprintf(stderr, "pegaflow demo: %v\n", runErr)
		return 1
	}
	if rep == nil || rep.Failed() {
		fmt.Fprintln(stderr, "pegaflow demo: "+failMsg)
		return 1
	}
	return 0
}

// validateKVWorkload checks --kv's workload (its URL is the lab's,
// set per run).
func validateKVWorkload(w bench.Config) error {
	w.BaseURL = "http://127.0.0.1:1"
	if w.Users < 1 || w.Turns < 2 {
		// The comparison is over follow-up turns: one-turn prompts
		// (bench's --users 0) would leave every row empty.
		return fmt.Errorf("--kv: --users %d --turns %d: want at least 1 user and 2 turns", w.Users, w.Turns)
	}
	if err := w.Validate(); err != nil {
		return fmt.Errorf("--kv: %w", err)
	}
	return nil
}

// runDemoKV is `pegaflow demo --kv`: the routing comparison on the
// multi-turn workload w (--seed, --users, --turns).
func runDemoKV(ctx context.Context, cfg demo.Config, w bench.Config, prog io.Writer, reportPath string, stdout, stderr io.Writer) int {
	rep, runErr := demo.RunKV(ctx, cfg, w, demo.KVPolicies(), prog)
	if rep == nil {
		return finishDemo(nil, nil, reportPath, runErr, "", stdout, stderr)
	}
	return finishDemo(rep, func(out io.Writer) error { return rep.WriteTable(out, w) }, reportPath, runErr,
		"a policy did not run or lost requests (see the table and the logs)", stdout, stderr)
}

// ssdSettings applies the flags --ssd shares with the other demos: the
// pool (its own default unless --pool-size is given), --users, --turns
// and --seed (taken from kvw, where the flags wrote them when given).
func ssdSettings(fs *flag.FlagSet, cfg *demo.Config, s *demo.SSDSettings, kvw bench.Config) error {
	pool := false
	fs.Visit(func(f *flag.Flag) {
		switch f.Name {
		case "pool-size":
			pool = true
		case "users":
			s.Workload.Users = kvw.Users
		case "turns":
			s.Workload.Turns = kvw.Turns
		}
	})
	if cfg.Hosts != 1 {
		return errors.New("--ssd runs on one host: drop --hosts")
	}
	if !pool {
		cfg.PoolSize = demo.SSDPoolSize
	}
	s.Workload.Seed = cfg.Workload.Seed
	return s.Validate()
}

// canRunTwoHosts says why --hosts 2 cannot run here: the lab needs root
// and `ip`.
func canRunTwoHosts() error {
	if err := netlab.Check(); err != nil {
		return fmt.Errorf("--hosts 2: %w", err)
	}
	return nil
}

func writeJSON(path string, rep any) error {
	data, err := json.MarshalIndent(rep, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(data, '\n'), 0o644)
}
