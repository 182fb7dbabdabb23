package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/pegaflow/pegaflow/bench"
	"github.com/pegaflow/pegaflow/internal/cli"
)

// runBench is `pegaflow bench`: vLLM-style serving benchmark of any
// OpenAI-compatible endpoint. Exit status 0 when every request succeeded,
// 1 when any failed or the run could not complete, 2 on bad flags.
func runBench(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	cfg := bench.DefaultConfig()
	fs := flag.NewFlagSet("pegaflow bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	bench.BindFlags(fs, &cfg)
	var jsonPath, plotPath string
	var progress bool
	fs.StringVar(&jsonPath, "json", "", "also write the result (with per-request records) as JSON to this file")
	fs.StringVar(&plotPath, "plot", "", "also draw the TTFT/ITL/E2EL distributions to this SVG file")
	fs.BoolVar(&progress, "progress", true, "show progress on stderr (a bar on a terminal, periodic lines otherwise)")
	err := cli.Parse(fs, args, nil)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err == nil && fs.NArg() > 0 {
		err = fmt.Errorf("unexpected arguments: %s", strings.Join(fs.Args(), " "))
	}
	if err == nil {
		err = cfg.Validate()
	}
	if err == nil && plotPath != "" && !strings.HasSuffix(strings.ToLower(plotPath), ".svg") {
		err = fmt.Errorf("--plot %q: only SVG is supported (name it *.svg)", plotPath)
	}
	if err != nil {
		fmt.Fprintf(stderr, "pegaflow bench: %v\n", err)
		return cli.ExitUsage
	}
	var prog io.Writer
	if progress {
		prog = stderr
		if f, ok := stderr.(*os.File); ok {
			prog = f
		}
	}
	res, runErr := bench.Run(ctx, cfg, prog)
	if res == nil {
		fmt.Fprintf(stderr, "pegaflow bench: %v\n", runErr)
		return 1
	}
	code := 0
	if err := res.WriteTable(stdout); err != nil {
		fmt.Fprintf(stderr, "pegaflow bench: %v\n", err)
		code = 1
	}
	if jsonPath != "" {
		if err := res.WriteJSONFile(jsonPath); err != nil {
			fmt.Fprintf(stderr, "pegaflow bench: %v\n", err)
			code = 1
		}
	}
	if plotPath != "" {
		if err := res.WriteSVGFile(plotPath); err != nil {
			fmt.Fprintf(stderr, "pegaflow bench: %v\n", err)
			code = 1
		}
	}
	if runErr != nil {
		fmt.Fprintf(stderr, "pegaflow bench: interrupted: %v\n", runErr)
		return 1
	}
	if res.Failed > 0 {
		fmt.Fprintf(stderr, "pegaflow bench: %d of %d requests failed\n", res.Failed, res.NumPrompts)
		return 1
	}
	return code
}
