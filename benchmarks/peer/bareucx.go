package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"time"
)

// The baseline of the target over --peer-transport=rdma (baretcp.go is
// the default's): the fetch's data path with plain UCX and no
// PegaFlow code, as two processes of benchmarks/native (ucx_baseline.c).
// The target registers a region as large as A's pool; the initiator GETs
// as many share-size extents per batch as a query fetches, from distinct
// remote offsets advancing through that region into a batch-size region,
// as many outstanding as the agent's window, each batch waited for like a
// query, as many timed batches as timed queries after one warm-up. So
// both move the same bytes over the same memory footprint, unlike
// ucx_perftest's one cache-hot buffer.

// bareUCXPlan is one size's two-process baseline.
type bareUCXPlan struct {
	extent, batchMiB, regionMiB, batches, window int
}

func planBareUCX(size, batchMiB, totalMiB, poolMiB int) bareUCXPlan {
	return bareUCXPlan{extent: size, batchMiB: batchMiB, regionMiB: poolMiB, batches: totalMiB / batchMiB,
		window: agentWindow(size)}
}

func (p bareUCXPlan) targetArgs() []string {
	return []string{"-ucx-get-target", "-region-mib", strconv.Itoa(p.regionMiB)}
}

func (p bareUCXPlan) initiatorArgs() []string {
	return []string{"-ucx-get-initiator", "-extent-kib", strconv.Itoa(p.extent >> 10), "-batch-mib",
		strconv.Itoa(p.batchMiB), "-iters", strconv.Itoa(p.batches), "-window", strconv.Itoa(p.window)}
}

// nativeBenchPkg is benchmarks/native by import path, so it builds from
// any directory of the module (the tests run in benchmarks/peer).
const nativeBenchPkg = "github.com/pegaflow/pegaflow/benchmarks/native"

// buildNativeBench builds benchmarks/native into dir once, so the
// baseline's processes start without a compile.
func buildNativeBench(ctx context.Context, goTool, goTags, dir string) (string, error) {
	bin := filepath.Join(dir, "nativebench")
	out, err := exec.CommandContext(ctx, goTool, "build", "-tags", goTags, "-o", bin, nativeBenchPkg).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("go build ./benchmarks/native: %w: %s", err, lastLines(out, 5))
	}
	return bin, nil
}

// runBareUCX runs one size's two-process UCX baseline (runPair).
func runBareUCX(ctx context.Context, bin string, p bareUCXPlan) (float64, error) {
	return runPair(ctx, "ucx-get", bin, p.targetArgs(), p.initiatorArgs())
}

// runPair starts bin with targetArgs, hands its first stdout line (its
// address) to bin with initiatorArgs and returns the initiator's GB/s
// (parseInitiatorJSON). The target may spin, so it lives only for one
// measurement (never beside a fetch); closing its stdin ends it.
func runPair(ctx context.Context, what, bin string, targetArgs, initiatorArgs []string) (float64, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	tgt := exec.CommandContext(ctx, bin, targetArgs...)
	var tgtErr bytes.Buffer
	tgt.Stderr = &tgtErr
	stop, err := tgt.StdinPipe()
	if err != nil {
		return 0, err
	}
	lines, err := tgt.StdoutPipe()
	if err != nil {
		return 0, err
	}
	if err := tgt.Start(); err != nil {
		return 0, fmt.Errorf("%s target: %w", what, err)
	}
	exited := make(chan error, 1)
	// stopTarget ends the target (closing stdin is its signal to exit) and
	// returns the tail of its stderr, which is only safe to read then.
	stopTarget := sync.OnceValue(func() string {
		_ = stop.Close()
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			_ = tgt.Process.Kill()
			<-exited
		}
		return lastLines(tgtErr.Bytes(), 5)
	})
	line, err := bufio.NewReaderSize(lines, 4<<20).ReadBytes('\n')
	go func() { exited <- tgt.Wait() }() // only now: Wait closes the stdout pipe
	defer stopTarget()
	if err != nil {
		return 0, fmt.Errorf("%s target gave no address: %w: %s", what, err, stopTarget())
	}
	ini := exec.CommandContext(ctx, bin, initiatorArgs...)
	ini.Stdin = bytes.NewReader(line)
	var iniErr bytes.Buffer
	ini.Stderr = &iniErr
	out, err := ini.Output()
	if err != nil {
		return 0, fmt.Errorf("%s initiator: %w: %s / target: %s", what, err, lastLines(iniErr.Bytes(), 5), stopTarget())
	}
	return parseInitiatorJSON(out)
}

// parseInitiatorJSON reads the GB/s of `nativebench -ucx-get-initiator`
// or of this benchmark's -bare-tcp-reader.
func parseInitiatorJSON(out []byte) (float64, error) {
	var rs []struct {
		GBps float64 `json:"gbps"`
	}
	if err := json.Unmarshal(out, &rs); err != nil {
		return 0, fmt.Errorf("initiator output: %w", err)
	}
	if len(rs) != 1 || rs[0].GBps <= 0 {
		return 0, errors.New("initiator output: want one result with gbps > 0")
	}
	return rs[0].GBps, nil
}
