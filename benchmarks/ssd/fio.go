package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os/exec"
	"strconv"
	"strings"
	"time"
)

// fioRunner runs fio on the test file with the native engine's depth and
// O_DIRECT; engine is io_uring until fio refuses it, then libaio.
type fioRunner struct {
	bin, version, engine string
	depth                int
	fileBytes            uint64
	dur                  time.Duration
}

// fioInfo finds fio on PATH; nil without it (or with -no-fio).
func fioInfo(cfg config) *fioRunner {
	if cfg.noFio {
		return nil
	}
	bin, err := exec.LookPath("fio")
	if err != nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	v, err := exec.CommandContext(ctx, bin, "--version").Output()
	if err != nil {
		return nil
	}
	return &fioRunner{bin: bin, version: strings.TrimSpace(string(v)), engine: "io_uring", depth: cfg.depth, fileBytes: cfg.fileBytes, dur: cfg.dur}
}

func (f *fioRunner) describe() string {
	if f == nil {
		return "the parallel pread loop (fio not on PATH)"
	}
	return fmt.Sprintf("%s (%s, then libaio if refused; --direct=1 --iodepth=%d; randread / write)", f.version, f.engine, f.depth)
}

// run reads (random order) or writes (in order) bs blocks of the file for
// f.dur and returns fio's byte count and runtime.
func (f *fioRunner) run(ctx context.Context, path string, bs uint64, write bool) (uint64, time.Duration, error) {
	n, d, err := f.runEngine(ctx, path, bs, write)
	if err != nil && f.engine == "io_uring" {
		f.engine = "libaio"
		n, d, err = f.runEngine(ctx, path, bs, write)
	}
	return n, d, err
}

func (f *fioRunner) runEngine(ctx context.Context, path string, bs uint64, write bool) (uint64, time.Duration, error) {
	rw := "randread"
	if write {
		rw = "write"
	}
	ctx, cancel := context.WithTimeout(ctx, f.dur+time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, f.bin, "--name=pegaflow-bench-ssd", "--filename="+path,
		"--size="+strconv.FormatUint(f.fileBytes, 10), "--direct=1", "--rw="+rw,
		"--bs="+strconv.FormatUint(bs, 10), "--ioengine="+f.engine, "--iodepth="+strconv.Itoa(f.depth),
		"--runtime="+strconv.FormatInt(max(f.dur.Milliseconds(), 1), 10)+"ms", "--time_based",
		"--output-format=json")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return 0, 0, fmt.Errorf("fio %s: %w: %s", f.engine, err, strings.TrimSpace(stderr.String()))
	}
	// fio may print notes before the JSON.
	if i := bytes.IndexByte(out, '{'); i > 0 {
		out = out[i:]
	}
	var rep struct {
		Jobs []struct {
			Error       int `json:"error"`
			Read, Write struct {
				IOBytes uint64 `json:"io_bytes"`
				Runtime int64  `json:"runtime"` // ms
			}
		} `json:"jobs"`
	}
	if err := json.Unmarshal(out, &rep); err != nil {
		return 0, 0, fmt.Errorf("fio output: %w", err)
	}
	if len(rep.Jobs) != 1 || rep.Jobs[0].Error != 0 {
		return 0, 0, errors.New("fio: job failed")
	}
	st := rep.Jobs[0].Read
	if write {
		st = rep.Jobs[0].Write
	}
	if st.Runtime <= 0 || st.IOBytes == 0 {
		return 0, 0, errors.New("fio: no I/O reported")
	}
	return st.IOBytes, time.Duration(st.Runtime) * time.Millisecond, nil
}
