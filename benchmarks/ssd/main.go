// Command ssdbench measures the SSD tier's I/O and recovery on this
// machine, in one run, and prints one table (`make bench-ssd`):
//
//   - promote: random reads of whole blocks from one file into a native
//     pool through the native SSD engine (batches of -batch blocks, -inflight
//     batches in flight, engine depth -depth), each backend this build has,
//     against reading the same blocks of the same file with fio (when it is
//     on PATH: O_DIRECT, io_uring or libaio, the same depth) and with plain
//     O_DIRECT pread loops (one goroutine, and -depth goroutines).
//   - spill: the same with sequential writes (the store's slot ring is
//     written in order) against fio and pwrite loops.
//   - recovery: engine/ssd's Open of a store with -recovery-slots live
//     slots after a kill -9 (the store is never closed), from a checkpoint
//     plus the 1000 slots written after it and from a full header scan,
//     with the page cache dropped first (when /proc/sys/vm/drop_caches is
//     writable) and warm.
//
// The ratio is native / baseline, the baseline being fio when it ran,
// else the parallel pread loop; the SSD tier's target is >= 0.9 from
// 256 KiB blocks up.
//
// Files: main.go the flags and the table; io.go the native engine and the
// pread/pwrite loops; fio.go the fio runs; recovery.go the store's Open.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/pegaflow/pegaflow/native"
)

type config struct {
	dir           string
	fileBytes     uint64
	blocks        []uint64
	batch, depth  int
	inflight      int
	dur           time.Duration
	recoverySlots int
	noFio         bool
}

func main() {
	def := envInt("PEGAFLOW_BENCH_SSD_FILE_MIB", 1024)
	fileMiB := flag.Int("file-mib", def, "size of the I/O test file, MiB (env PEGAFLOW_BENCH_SSD_FILE_MIB)")
	dir := flag.String("dir", os.Getenv("PEGAFLOW_BENCH_SSD_DIR"), "directory on the device to measure (env PEGAFLOW_BENCH_SSD_DIR; default a temp dir under /var/tmp)")
	batch := flag.Int("batch", 64, "blocks per native batch")
	depth := flag.Int("depth", 32, "I/O depth: engine threads or ring entries, fio iodepth, parallel loop goroutines")
	inflight := flag.Int("inflight", 2, "native batches in flight")
	secs := flag.Float64("seconds", 1, "seconds per measurement")
	slots := flag.Int("recovery-slots", envInt("PEGAFLOW_BENCH_SSD_RECOVERY_SLOTS", 1_000_000), "live slots of the recovery store, 0 to skip (env PEGAFLOW_BENCH_SSD_RECOVERY_SLOTS)")
	noFio := flag.Bool("no-fio", false, "skip fio even when it is on PATH")
	flag.Parse()
	if *fileMiB < 64 || *batch < 1 || *batch > native.MaxSSDOps || *depth < 1 || *depth > 4096 || *inflight < 1 || *secs <= 0 || *slots < 0 {
		fmt.Fprintln(os.Stderr, "ssdbench: need file-mib >= 64, 1 <= batch <= 65536, 1 <= depth <= 4096, inflight >= 1, seconds > 0, recovery-slots >= 0")
		os.Exit(2)
	}
	cfg := config{
		dir: *dir, fileBytes: uint64(*fileMiB) << 20, batch: *batch, depth: *depth, inflight: *inflight,
		dur: time.Duration(*secs * float64(time.Second)), recoverySlots: *slots, noFio: *noFio,
		blocks: []uint64{16 << 10, 64 << 10, 256 << 10, 1 << 20, 2 << 20},
	}
	if err := run(context.Background(), cfg); err != nil {
		fmt.Fprintln(os.Stderr, "ssdbench:", err)
		os.Exit(1)
	}
}

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil {
		return v
	}
	return def
}

func run(ctx context.Context, cfg config) error {
	if cfg.dir == "" {
		d, err := os.MkdirTemp("/var/tmp", "pegaflow-bench-ssd-")
		if err != nil {
			return fmt.Errorf("temp dir: %w", err)
		}
		defer os.RemoveAll(d)
		cfg.dir = d
	}
	var st syscall.Statfs_t
	if err := syscall.Statfs(cfg.dir, &st); err != nil {
		return fmt.Errorf("statfs %s: %w", cfg.dir, err)
	}
	free := st.Bavail * uint64(st.Bsize)
	if cfg.fileBytes+1<<30 > free {
		return fmt.Errorf("%s has %d MiB free, the test file needs %d MiB and 1 GiB of headroom (-file-mib)", cfg.dir, free>>20, cfg.fileBytes>>20)
	}
	start := time.Now()
	b, err := newIOBench(ctx, cfg, filepath.Join(cfg.dir, "pegaflow-bench-ssd.dat"))
	if err != nil {
		return err
	}
	defer b.close()
	fio := fioInfo(cfg)
	fmt.Printf("SSD tier benchmark: %s (file system 0x%x, %d MiB free), %d MiB file, O_DIRECT %v, io_uring built %v (registered buffers %v), %d CPUs\n",
		cfg.dir, st.Type, free>>20, cfg.fileBytes>>20, b.direct, native.SSDURingBuilt(), b.registered, runtime.NumCPU())
	fmt.Printf("native: batches of %d blocks, %d in flight, depth %d; baseline: %s; page cache dropped before each run: %v; %v per run\n\n",
		cfg.batch, cfg.inflight, cfg.depth, fio.describe(), dropCaches(), cfg.dur)

	tw := tabwriter.NewWriter(os.Stdout, 2, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "what\tblock\tnative threads\tnative io_uring\tfio\tpread x1\tpread x"+strconv.Itoa(cfg.depth)+"\tthreads/base\tio_uring/base\t")
	for _, write := range []bool{false, true} {
		what := "promote GB/s"
		if write {
			what = "spill GB/s"
		}
		for _, bs := range cfg.blocks {
			r := b.measure(ctx, bs, write, fio)
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t\n", what, size(bs),
				gbps(r.threads), gbps(r.uring), gbps(r.fio), gbps(r.loop1), gbps(r.loopN),
				ratio(r.threads, r.base()), ratio(r.uring, r.base()))
		}
	}
	tw.Flush()
	b.close()
	if cfg.recoverySlots > 0 {
		fmt.Println()
		if err := recovery(ctx, cfg, free); err != nil {
			return err
		}
	}
	fmt.Printf("\n(%.0f s in all)\n", time.Since(start).Seconds())
	return nil
}

// result is one block size and direction; a negative rate did not run.
type result struct{ threads, uring, fio, loop1, loopN float64 }

func (r result) base() float64 {
	if r.fio > 0 {
		return r.fio
	}
	return r.loopN
}

func gbps(v float64) string {
	if v < 0 {
		return "-"
	}
	return strconv.FormatFloat(v, 'f', 2, 64)
}

func ratio(a, b float64) string {
	if a <= 0 || b <= 0 {
		return "-"
	}
	return strconv.FormatFloat(a/b, 'f', 2, 64)
}

func size(n uint64) string {
	if n >= 1<<20 {
		return fmt.Sprintf("%d MiB", n>>20)
	}
	return fmt.Sprintf("%d KiB", n>>10)
}

// dropCaches asks the kernel to drop the page cache (root only; O_DIRECT
// bypasses it anyway, the recovery scan does not) and says whether it could.
func dropCaches() bool {
	syscall.Sync()
	return os.WriteFile("/proc/sys/vm/drop_caches", []byte("3\n"), 0) == nil
}
