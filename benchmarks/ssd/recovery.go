package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/pegaflow/pegaflow/engine/ssd"
)

// afterCkpt is how many slots are written after the checkpoint.
const afterCkpt = 1000

// recovery fills a store of cfg.recoverySlots slots (fewer when the disk
// is short: it says so), "kills" it (never closes it, so no final
// checkpoint), and times Open from the checkpoint and from a scan.
func recovery(ctx context.Context, cfg config, free uint64) error {
	const payload = 4096 // the smallest class, one page of payload
	slotBytes := uint64(ssd.HeaderSize + payload)
	n := cfg.recoverySlots
	if budget := (free - min(free, 2<<30)) / slotBytes; uint64(n) > budget {
		fmt.Printf("recovery: only %d MiB free, scaled down from %d to %d slots\n", free>>20, n, budget)
		n = int(budget)
	}
	if n <= afterCkpt {
		return fmt.Errorf("recovery: %d slots, need more than %d", n, afterCkpt)
	}
	dir := filepath.Join(cfg.dir, "pegaflow-bench-ssd-store")
	defer os.RemoveAll(dir)
	scfg := ssd.Config{Dir: dir, Classes: []ssd.Class{{MaxPayload: payload, Slots: n}}}
	s, err := ssd.Open(ctx, scfg)
	if err != nil {
		return fmt.Errorf("recovery store: %w", err)
	}
	start := time.Now()
	if err := fill(ctx, s, 0, n-afterCkpt); err != nil {
		return err
	}
	if err := s.Checkpoint(ctx); err != nil {
		return fmt.Errorf("checkpoint: %w", err)
	}
	if err := fill(ctx, s, n-afterCkpt, n); err != nil {
		return err
	}
	fillTime := time.Since(start)
	// kill -9: the store is dropped unclosed, its checkpoint afterCkpt
	// writes old.
	s = nil
	runtime.GC()

	fmt.Printf("recovery: %d live slots of %d KiB (%d MiB file), filled by Put in %.1f s; Open after a kill -9 (never closed):\n",
		n, slotBytes>>10, uint64(n)*slotBytes>>20, fillTime.Seconds())
	tw := tabwriter.NewWriter(os.Stdout, 2, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "recovery from\tcache\tOpen s\ts per 1M blocks\tfrom checkpoint\tby scan\tdropped\t")
	for _, mode := range []string{"checkpoint + 1000", "header scan"} {
		if mode == "header scan" {
			if err := os.Remove(filepath.Join(dir, "index.ckpt")); err != nil {
				return fmt.Errorf("remove the checkpoint: %w", err)
			}
		}
		for _, cold := range []bool{true, false} {
			cache := "warm"
			if cold {
				cache = "warm (no drop)"
				if dropCaches() {
					cache = "dropped"
				}
			}
			t := time.Now()
			r, err := ssd.Open(ctx, scfg)
			d := time.Since(t)
			if err != nil {
				return fmt.Errorf("recovery (%s): %w", mode, err)
			}
			st := r.Stats()
			if st.Live != n {
				return fmt.Errorf("recovery (%s): %d live slots, want %d", mode, st.Live, n)
			}
			fmt.Fprintf(tw, "%s\t%s\t%.2f\t%.2f\t%d\t%d\t%d\t\n", mode, cache, d.Seconds(), d.Seconds()*1e6/float64(n),
				st.RecoveredFromCkpt, st.RecoveredByScan, st.RecoveryDroppedSlot)
			runtime.GC()
		}
	}
	return tw.Flush()
}

// fill puts keys [from, to) from a few goroutines (fewer than the store's
// write window, so none is refused).
func fill(ctx context.Context, s *ssd.Store, from, to int) error {
	const workers = 8
	payload := make([]byte, 4096)
	var (
		wg      sync.WaitGroup
		errOnce sync.Once
		first   error
	)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := from + w; i < to; i += workers {
				k := ssd.Key{Namespace: "pegaflow-bench", Hash: fmt.Sprintf("%032x", i)}
				if err := s.Put(ctx, k, []uint64{uint64(len(payload))}, payload); err != nil {
					errOnce.Do(func() { first = fmt.Errorf("put %d: %w", i, err) })
					return
				}
			}
		}()
	}
	wg.Wait()
	return first
}
