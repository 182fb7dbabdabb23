package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os/exec"
	"strconv"
	"strings"
	"time"
)

// agentWindowBytes and agentWindowOps are the transfer agent's per-peer
// window (native/include/pegaflow_xfer.h: 256 GETs, ~16 MiB in flight):
// the bare figure gets the same number of GETs outstanding, so the ratio
// measures our overhead, not a different pipeline depth.
const (
	agentWindowBytes = 16 << 20
	agentWindowOps   = 256
)

// perftestPlan is one size's ucx_perftest: iterations, warm-up and
// outstanding GETs.
type perftestPlan struct {
	size, iters, warmup, outstanding int
}

// agentWindow is how many GETs of size bytes the agent keeps in flight.
func agentWindow(size int) int { return min(agentWindowOps, max(agentWindowBytes/size, 1)) }

func planPerftest(size, totalBytes int) perftestPlan {
	iters := max(totalBytes/size, 1)
	return perftestPlan{size: size, iters: iters, warmup: max(iters/10, 1), outstanding: agentWindow(size)}
}

func (p perftestPlan) serverArgs(port int) []string { return []string{"-p", strconv.Itoa(port)} }

func (p perftestPlan) clientArgs(host string, port int) []string {
	return []string{host, "-p", strconv.Itoa(port), "-t", "ucp_get", "-s", strconv.Itoa(p.size),
		"-n", strconv.Itoa(p.iters), "-w", strconv.Itoa(p.warmup), "-O", strconv.Itoa(p.outstanding), "-v"}
}

// parsePerftestCSV reads the overall bandwidth, in GB/s (1e9), from
// `ucx_perftest -v` output: a CSV header naming overall_bw and a row of
// numbers, bandwidth in MB/s, which ucx_perftest counts as MiB/s.
func parsePerftestCSV(out []byte) (float64, error) {
	col := -1
	for _, line := range strings.Split(string(out), "\n") {
		fields := strings.Split(strings.TrimSpace(line), ",")
		if col < 0 {
			for i, f := range fields {
				if f == "overall_bw" {
					col = i
				}
			}
			continue
		}
		if len(fields) <= col {
			continue
		}
		v, err := strconv.ParseFloat(fields[col], 64)
		if err != nil {
			continue
		}
		return v * (1 << 20) / 1e9, nil
	}
	return 0, errors.New("no overall_bw in ucx_perftest output")
}

// runPerftest runs one ucx_perftest server and client on host (the UCX
// environment inherited) and returns the client's overall GB/s. It reads
// one size-byte buffer into one size-byte buffer over and over (it has no
// option to spread them), so both ends stay cache-hot: a reference, not
// the baseline of the target (bareucx.go is).
func runPerftest(ctx context.Context, bin, host string, p perftestPlan) (float64, error) {
	port, err := freePort(host)
	if err != nil {
		return 0, err
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	var srvOut bytes.Buffer
	srv := exec.CommandContext(ctx, bin, p.serverArgs(port)...)
	srv.Stdout, srv.Stderr = &srvOut, &srvOut
	if err := srv.Start(); err != nil {
		return 0, fmt.Errorf("ucx_perftest server: %w", err)
	}
	defer func() { _ = srv.Process.Kill(); _ = srv.Wait() }()
	// The server listens a moment after it starts; the client fails fast
	// until then.
	var out []byte
	for attempt := 0; ; attempt++ {
		out, err = exec.CommandContext(ctx, bin, p.clientArgs(host, port)...).CombinedOutput()
		if err == nil || attempt == 20 || ctx.Err() != nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		return 0, fmt.Errorf("ucx_perftest client: %w: %s / server: %s", err, lastLines(out, 5), lastLines(srvOut.Bytes(), 5))
	}
	return parsePerftestCSV(out)
}

func lastLines(b []byte, n int) string {
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	return strings.Join(lines[max(len(lines)-n, 0):], " | ")
}
