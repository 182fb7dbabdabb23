package main

import (
	"errors"
	"flag"
	"fmt"
	"path/filepath"
	"time"

	"github.com/pegaflow/pegaflow/engine"
	"github.com/pegaflow/pegaflow/internal/cli"
	"github.com/pegaflow/pegaflow/native"
)

// ssdFlags are `pegaflow serve`'s SSD tier flags (engine/ssdtier.go).
type ssdFlags struct {
	dirs        cli.StringList
	size        cli.ByteSize
	staging     cli.ByteSize
	promoteWait time.Duration
	backend     string
	depth       int
}

func bindSSDFlags(fs *flag.FlagSet, f *ssdFlags) {
	f.staging = 64 << 20
	fs.Var(&f.dirs, "ssd-dir", "a directory on a local SSD for the SSD tier (repeatable, one per device; created 0700, must be this user's and closed to others): "+
		"blocks that prove reuse are written there, promoted back when the pool lost them and a query needs them, and survive a restart")
	fs.Var(&f.size, "ssd-size", "space the SSD tier takes in each --ssd-dir (e.g. 200GiB; at least 64MiB)")
	fs.Var(&f.staging, "ssd-staging", "memory holding evicted blocks until they are written (bounds the spill queue; a full one skips spills, never saves)")
	fs.DurationVar(&f.promoteWait, "ssd-promote-wait", 100*time.Millisecond, "SSD read budget of a query that waits less: what is not read by then is a shorter hit")
	fs.StringVar(&f.backend, "ssd-io", "auto", "SSD I/O engine: auto (io_uring when built and allowed, else threads), io_uring or threads")
	fs.IntVar(&f.depth, "ssd-io-depth", 32, "io_uring entries or I/O threads per pool (1..4096)")
}

// check validates the flags; the directories themselves are checked by
// the engine (ownership, mode), which leaves out an unusable one.
func (f *ssdFlags) check() error {
	if len(f.dirs) == 0 {
		if f.size != 0 {
			return errors.New("--ssd-size needs --ssd-dir")
		}
		return nil
	}
	if len(f.dirs) > engine.MaxSSDDirs {
		return fmt.Errorf("--ssd-dir given %d times, max %d", len(f.dirs), engine.MaxSSDDirs)
	}
	seen := map[string]bool{}
	for _, d := range f.dirs {
		if !filepath.IsAbs(d) {
			return fmt.Errorf("--ssd-dir %q must be an absolute path", d)
		}
		if seen[filepath.Clean(d)] {
			return fmt.Errorf("--ssd-dir %q given twice", d)
		}
		seen[filepath.Clean(d)] = true
	}
	if f.size < engine.MinSSDSize {
		return fmt.Errorf("--ssd-size %s: give at least 64MiB per --ssd-dir", f.size.String())
	}
	if f.staging < 1<<20 || f.staging > 1<<40 {
		return fmt.Errorf("--ssd-staging %s: want 1MiB..1TiB", f.staging.String())
	}
	if f.promoteWait <= 0 || f.promoteWait > time.Minute {
		return fmt.Errorf("--ssd-promote-wait %v: want (0, 1m]", f.promoteWait)
	}
	if _, err := f.ioBackend(); err != nil {
		return err
	}
	if f.depth < 1 || f.depth > 4096 {
		return fmt.Errorf("--ssd-io-depth %d: want 1..4096", f.depth)
	}
	return nil
}

func (f *ssdFlags) ioBackend() (native.SSDBackend, error) {
	switch f.backend {
	case "auto":
		return native.SSDAuto, nil
	case "io_uring":
		return native.SSDURing, nil
	case "threads":
		return native.SSDThreads, nil
	}
	return 0, fmt.Errorf("--ssd-io %q: want auto, io_uring or threads", f.backend)
}

// config is the engine's SSDConfig.
func (f *ssdFlags) config() engine.SSDConfig {
	if len(f.dirs) == 0 {
		return engine.SSDConfig{}
	}
	be, _ := f.ioBackend()
	return engine.SSDConfig{Dirs: f.dirs, Size: uint64(f.size), StagingBytes: uint64(f.staging), PromoteWait: f.promoteWait, Backend: be, Depth: f.depth}
}
