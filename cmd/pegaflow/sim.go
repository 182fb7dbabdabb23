package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/pegaflow/pegaflow/internal/cli"
	"github.com/pegaflow/pegaflow/sim"
)

// runSim is `pegaflow sim`: a vLLM stand-in with PegaFlow's connector
// behaviour, for demos and tests without GPUs.
func runSim(ctx context.Context, args []string, _, stderr io.Writer) int {
	cfg := sim.DefaultConfig()
	fs := flag.NewFlagSet("pegaflow sim", flag.ContinueOnError)
	fs.SetOutput(stderr)
	sim.BindFlags(fs, &cfg)
	var addr, logLevel string
	fs.StringVar(&addr, "http-addr", "127.0.0.1:8100", "HTTP address of the OpenAI API, /health and /metrics")
	fs.StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	err := cli.Parse(fs, args, nil)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err == nil && fs.NArg() > 0 {
		err = fmt.Errorf("unexpected arguments: %s", strings.Join(fs.Args(), " "))
	}
	var level slog.Level
	if err == nil {
		if lerr := level.UnmarshalText([]byte(logLevel)); lerr != nil {
			err = fmt.Errorf("--log-level %q: want debug, info, warn or error", logLevel)
		}
	}
	if err == nil {
		if _, _, aerr := net.SplitHostPort(addr); aerr != nil {
			err = fmt.Errorf("--http-addr %q: %w", addr, aerr)
		}
	}
	if err == nil {
		err = cfg.Validate()
	}
	if err != nil {
		fmt.Fprintf(stderr, "pegaflow sim: %v\n", err)
		return cli.ExitUsage
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level})).With("component", "sim")
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		log.Error("listen failed", "addr", addr, "err", err)
		return 1
	}
	s, err := sim.New(cfg, log, reg)
	if err != nil {
		ln.Close()
		log.Error("sim setup failed", "err", err)
		return 1
	}
	if err := s.Run(ctx, ln); err != nil {
		log.Error("sim failed", "err", err)
		return 1
	}
	return 0
}
