// Command nativebench measures the native copier against a plain memcpy of
// the same bytes in the same run: for each block size, a batch of blocks
// scattered over a shared-memory region (so nothing coalesces) is copied
// region->pool and pool->region by the copier, and by one goroutine doing
// Go `copy` over the same mapping and offsets. It prints GB/s and the
// copier/memcpy ratio.
//
// With -xfer it measures the UCX transfer layer instead: XferPeer.Get
// between two agents in this process next to a plain ucp_get_nbx loop over
// the same memory and offsets, for 16 KiB to 2 MiB extents.
//
// -ucx-get-target and -ucx-get-initiator are the two processes of
// benchmarks/peer's bare-UCX baseline (plain ucp.h, no PegaFlow code): the
// target registers -region-mib and prints its worker address and rkey as
// one JSON line, then serves until stdin closes; the initiator reads that
// line from stdin and GETs -iters batches of -batch-mib (after one
// warm-up) in -extent-kib extents from advancing remote offsets, -window
// outstanding, and prints the GB/s as JSON.
//
// Files: main.go the flags and the copier-vs-memcpy run; xfer.go the -xfer
// run (XferPeer.Get vs ucp_get_nbx); ucxget.go the two bare-UCX processes
// (-ucx-get-target, -ucx-get-initiator); xfer_noucx.go their stand-ins in
// a build without UCX (tag noucx), which say so; cpus.go the CPU count the
// tables print.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/pegaflow/pegaflow/native"
)

type result struct {
	BlockBytes int     `json:"block_bytes"`
	Direction  string  `json:"direction"`
	Blocks     int     `json:"blocks_per_batch"`
	CopierGBps float64 `json:"copier_gbps"`
	MemcpyGBps float64 `json:"memcpy_gbps"`
	Ratio      float64 `json:"ratio"`
}

func main() {
	regionMiB := flag.Int("region-mib", 256, "size of the shared-memory region")
	batchMiB := flag.Int("batch-mib", 64, "bytes per batch (and pool size)")
	iters := flag.Int("iters", 6, "timed batches per block size and direction")
	threads := flag.Int("threads", 2, "copier threads")
	dir := flag.String("dir", "", "directory for the region file (default /dev/shm, else the temp dir)")
	jsonOut := flag.Bool("json", false, "print JSON instead of a table")
	xfer := flag.Bool("xfer", false, "measure UCX transfers (XferPeer.Get vs plain ucp_get_nbx, UCX_TLS default tcp) instead of copies")
	target := flag.Bool("ucx-get-target", false, "serve a -region-mib region to one -ucx-get-initiator until stdin closes")
	initiator := flag.Bool("ucx-get-initiator", false, "read -iters batches of -batch-mib from the target on stdin; print JSON")
	extentKiB := flag.Int("extent-kib", 256, "-ucx-get-initiator: bytes per GET, KiB")
	window := flag.Int("window", 64, "-ucx-get-initiator: GETs outstanding")
	flag.Parse()
	switch {
	case *target:
		if *regionMiB <= 0 {
			fmt.Fprintln(os.Stderr, "nativebench: need region-mib > 0")
			os.Exit(2)
		}
		if err := runUCXGetTarget(uint64(*regionMiB) << 20); err != nil {
			fmt.Fprintln(os.Stderr, "nativebench:", err)
			os.Exit(1)
		}
		return
	case *initiator:
		if *batchMiB <= 0 || *iters <= 0 || *extentKiB <= 0 || *extentKiB > *batchMiB<<10 || *window <= 0 {
			fmt.Fprintln(os.Stderr, "nativebench: need batch-mib > 0, iters > 0, 0 < extent-kib <= batch-mib*1024, window > 0")
			os.Exit(2)
		}
		r, err := runUCXGetInitiator(uint64(*extentKiB)<<10, uint64(*batchMiB)<<20, *iters, *window)
		finish([]ucxGetResult{r}, err, true, nil)
		return
	}
	if *xfer {
		if *batchMiB <= 0 || *iters <= 0 {
			fmt.Fprintln(os.Stderr, "nativebench: need batch-mib > 0, iters > 0")
			os.Exit(2)
		}
		results, err := runXfer(uint64(*batchMiB)<<20, *iters)
		finish(results, err, *jsonOut, func(r []xferResult) { printXfer(r, *batchMiB) })
		return
	}
	if *batchMiB <= 0 || *regionMiB < *batchMiB || *iters <= 0 || *threads <= 0 {
		fmt.Fprintln(os.Stderr, "nativebench: need 0 < batch-mib <= region-mib, iters > 0, threads > 0")
		os.Exit(2)
	}
	results, err := run(uint64(*regionMiB)<<20, uint64(*batchMiB)<<20, *iters, *threads, *dir)
	finish(results, err, *jsonOut, func(results []result) {
		fmt.Printf("native copier (%s, %d threads) vs Go copy, batches of %d MiB, %d CPUs\n",
			native.Backend(), *threads, *batchMiB, runtimeCPUs())
		tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
		fmt.Fprintln(tw, "block\tdirection\tblocks/batch\tcopier GB/s\tmemcpy GB/s\tratio\t")
		for _, r := range results {
			fmt.Fprintf(tw, "%s\t%s\t%d\t%.2f\t%.2f\t%.2fx\t\n", size(r.BlockBytes), r.Direction, r.Blocks, r.CopierGBps, r.MemcpyGBps, r.Ratio)
		}
		tw.Flush()
	})
}

// finish exits on err, else prints results as JSON or with table.
func finish[T any](results []T, err error, jsonOut bool, table func([]T)) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "nativebench:", err)
		os.Exit(1)
	}
	if jsonOut {
		printJSON(results)
		return
	}
	table(results)
}

func run(regionSize, batch uint64, iters, threads int, dir string) ([]result, error) {
	if dir == "" {
		dir = os.TempDir()
		if st, err := os.Stat("/dev/shm"); err == nil && st.IsDir() {
			dir = "/dev/shm"
		}
	}
	f, err := os.CreateTemp(dir, "pegaflow-nativebench-*")
	if err != nil {
		return nil, err
	}
	path := f.Name()
	defer os.Remove(path)
	defer f.Close()
	if err := f.Truncate(int64(regionSize)); err != nil {
		return nil, err
	}
	// The baseline reads and writes the very same pages through its own
	// mapping of the file.
	mem, err := syscall.Mmap(int(f.Fd()), 0, int(regionSize), syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_SHARED)
	if err != nil {
		return nil, err
	}
	defer syscall.Munmap(mem)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < len(mem); i += 4096 {
		mem[i] = byte(rng.Uint32()) // fault every page in
	}

	region, err := native.OpenShmRegion(filepath.Clean(path), regionSize)
	if err != nil {
		return nil, err
	}
	defer region.Close()
	pool, err := native.NewPool(batch, -1, 0, native.PoolHugePages)
	if err != nil {
		return nil, err
	}
	defer pool.Close()
	copier, err := native.NewCopier(threads)
	if err != nil {
		return nil, err
	}
	defer copier.Close()
	poolMem := pool.Bytes()
	ctx := context.Background()

	var results []result
	for _, bs := range []uint64{16 << 10, 256 << 10, 2 << 20} {
		n := batch / bs
		// Blocks at random distinct region slots, packed in the pool, like
		// a save of non-contiguous KV blocks.
		slots := rng.Perm(int(regionSize / bs))[:n]
		ops := make([]native.CopyOp, n)
		for i := range ops {
			ops[i] = native.CopyOp{RegionOffset: uint64(slots[i]) * bs, PoolOffset: uint64(i) * bs, Len: bs}
		}
		for _, d := range []native.Direction{native.RegionToPool, native.PoolToRegion} {
			memcpy := func() {
				for _, op := range ops {
					r, p := mem[op.RegionOffset:op.RegionOffset+op.Len], poolMem[op.PoolOffset:op.PoolOffset+op.Len]
					if d == native.RegionToPool {
						copy(p, r)
					} else {
						copy(r, p)
					}
				}
			}
			// Warm both paths, then interleave the timed runs so drift in
			// machine load hits both alike.
			if err := copier.Copy(ctx, region, pool, d, ops); err != nil {
				return nil, err
			}
			memcpy()
			var tc, tm time.Duration
			for range iters {
				start := time.Now()
				if err := copier.Copy(ctx, region, pool, d, ops); err != nil {
					return nil, err
				}
				tc += time.Since(start)
				start = time.Now()
				memcpy()
				tm += time.Since(start)
			}
			bytes := float64(batch) * float64(iters)
			res := result{BlockBytes: int(bs), Direction: dirName(d), Blocks: int(n),
				CopierGBps: bytes / tc.Seconds() / 1e9, MemcpyGBps: bytes / tm.Seconds() / 1e9}
			res.Ratio = res.CopierGBps / res.MemcpyGBps
			results = append(results, res)
		}
	}
	return results, nil
}

func printJSON(v any) {
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

func dirName(d native.Direction) string {
	if d == native.RegionToPool {
		return "region->pool"
	}
	return "pool->region"
}

func size(b int) string {
	if b >= 1<<20 {
		return fmt.Sprintf("%dMiB", b>>20)
	}
	return fmt.Sprintf("%dKiB", b>>10)
}
