// Command pegaflow is PegaFlow's single binary: the KV engine and P/D router
// (`serve`), plus tools.
//
// Files: main.go the subcommands and their dispatch (and `version`);
// serve.go `serve`: its flags, the engine with its socket API, the router
// and the HTTP side (/topology among it), run until a signal; servepeer.go
// serve's cross-host flags (--peer-*: token, advertised address, the peer
// service and client); servekv.go the router's --lb kv index over
// engine/kvlookup (and its flag checks); servessd.go serve's SSD tier
// flags (--ssd-*); bench.go `bench`; sim.go `sim`; demo.go `demo`.
package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"sort"
	"syscall"
)

// version is set at build time (-ldflags -X main.version=...).
var version = "dev"

type command struct {
	run     func(ctx context.Context, args []string, stdout, stderr io.Writer) int
	summary string
}

func commands() map[string]command {
	return map[string]command{
		"serve":   {runServe, "run the KV engine (and the P/D router when backends are given)"},
		"version": {runVersion, "print the version"},
		"bench":   {runBench, "measure an OpenAI-compatible endpoint like vLLM's bench serve"},
		"sim":     {runSim, "run a vLLM stand-in (OpenAI API, engine P/D roles) for demos and tests"},
		"demo":    {runDemo, "run P/D (1P+1D) against 2 aggregated instances with simulators and compare"},
	}
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := dispatch(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

func dispatch(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	cmds := commands()
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		usage(stderr, cmds)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	cmd, ok := cmds[args[0]]
	if !ok {
		fmt.Fprintf(stderr, "pegaflow: unknown command %q\n\n", args[0])
		usage(stderr, cmds)
		return 2
	}
	return cmd.run(ctx, args[1:], stdout, stderr)
}

func usage(w io.Writer, cmds map[string]command) {
	fmt.Fprintln(w, "usage: pegaflow <command> [flags]\n\ncommands:")
	names := make([]string, 0, len(cmds))
	for n := range cmds {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(w, "  %-8s %s\n", n, cmds[n].summary)
	}
	fmt.Fprintln(w, "\nRun 'pegaflow <command> -h' for its flags. Every flag can also be set by PEGAFLOW_<FLAG> (e.g. PEGAFLOW_POOL_SIZE).")
}

func runVersion(_ context.Context, _ []string, stdout, _ io.Writer) int {
	fmt.Fprintf(stdout, "pegaflow %s (%s)\n", version, backendName())
	return 0
}
