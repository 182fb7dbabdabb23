package main

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/pegaflow/pegaflow/native"
)

// ioBench is the test file, the pool every reader and writer uses, and
// one native engine per backend this build and kernel run.
type ioBench struct {
	cfg        config
	path       string
	pool       *native.Pool
	file       *native.SSDFile
	engines    map[native.SSDBackend]*native.SSDEngine
	direct     bool
	registered bool
	closed     bool
}

func newIOBench(ctx context.Context, cfg config, path string) (*ioBench, error) {
	maxBlock := cfg.blocks[len(cfg.blocks)-1]
	pool, err := native.NewPool(uint64(max(cfg.inflight*cfg.batch, cfg.depth))*maxBlock, -1, -1, 0)
	if err != nil {
		return nil, fmt.Errorf("pool: %w", err)
	}
	b := &ioBench{cfg: cfg, path: path, pool: pool, engines: map[native.SSDBackend]*native.SSDEngine{}}
	mem := pool.Bytes()
	for i := range mem {
		mem[i] = byte(i*7 + i>>12)
	}
	backends := []native.SSDBackend{native.SSDThreads}
	if native.SSDURingBuilt() {
		backends = append(backends, native.SSDURing)
	}
	for _, be := range backends {
		e, err := native.NewSSDEngine(pool, be, cfg.depth)
		if err != nil {
			fmt.Fprintf(os.Stderr, "ssdbench: %s engine refused here, not measured: %v\n", be, err)
			continue
		}
		b.engines[be] = e
		b.registered = b.registered || e.Registered()
	}
	if b.file, err = native.OpenSSDFile(path, cfg.fileBytes, true, false); err != nil {
		b.close()
		return nil, fmt.Errorf("test file: %w", err)
	}
	b.direct = b.file.Direct()
	// Every byte is written once, so reads hit the device, not an
	// unwritten extent the file system answers with zeros.
	e := b.engines[native.SSDThreads]
	if e == nil {
		b.close()
		return nil, errors.New("no native SSD engine")
	}
	ops := make([]native.SSDOp, 0, cfg.batch)
	for off := uint64(0); off < cfg.fileBytes; off += maxBlock {
		ops = append(ops, native.SSDOp{FileOffset: off, PoolOffset: uint64(len(ops)) * maxBlock, Len: min(maxBlock, cfg.fileBytes-off)})
		if len(ops) == cap(ops) || off+maxBlock >= cfg.fileBytes {
			if err := e.Do(ctx, b.file, true, ops); err != nil {
				b.close()
				return nil, fmt.Errorf("fill the test file: %w", err)
			}
			ops = ops[:0]
		}
	}
	return b, nil
}

func (b *ioBench) close() {
	if b.closed {
		return
	}
	b.closed = true
	for _, e := range b.engines {
		_ = e.Close()
	}
	if b.file != nil {
		_ = b.file.Close()
	}
	_ = b.pool.Close()
	_ = os.Remove(b.path)
}

// order is the blocks in the order every reader and writer of one size
// and direction takes them: a random permutation for reads (promotes hit
// scattered slots), file order for writes (the slot ring).
func (b *ioBench) order(bs uint64, write bool) []uint64 {
	n := b.cfg.fileBytes / bs
	out := make([]uint64, n)
	for i := range out {
		out[i] = uint64(i) * bs
	}
	if !write {
		rand.New(rand.NewPCG(uint64(bs), 1)).Shuffle(len(out), func(i, j int) { out[i], out[j] = out[j], out[i] })
	}
	return out
}

func (b *ioBench) measure(ctx context.Context, bs uint64, write bool, fio *fioRunner) result {
	r := result{threads: -1, uring: -1, fio: -1, loop1: -1, loopN: -1}
	order := b.order(bs, write)
	rate := func(f func() (uint64, time.Duration, error), what string) float64 {
		dropCaches()
		n, d, err := f()
		if err != nil {
			fmt.Fprintf(os.Stderr, "ssdbench: %s, %s blocks: %v\n", what, size(bs), err)
			return -1
		}
		return float64(n) / d.Seconds() / 1e9
	}
	for be, e := range b.engines {
		v := rate(func() (uint64, time.Duration, error) { return b.native(ctx, e, bs, write, order) }, "native "+be.String())
		if be == native.SSDThreads {
			r.threads = v
		} else {
			r.uring = v
		}
	}
	if fio != nil {
		r.fio = rate(func() (uint64, time.Duration, error) { return fio.run(ctx, b.path, bs, write) }, "fio")
	}
	r.loop1 = rate(func() (uint64, time.Duration, error) { return b.loop(bs, write, order, 1) }, "pread loop")
	r.loopN = rate(func() (uint64, time.Duration, error) { return b.loop(bs, write, order, b.cfg.depth) }, "parallel pread loop")
	return r
}

// native keeps cfg.inflight batches of cfg.batch blocks in flight on e,
// each in its own pool extent, until cfg.dur has passed.
func (b *ioBench) native(ctx context.Context, e *native.SSDEngine, bs uint64, write bool, order []uint64) (uint64, time.Duration, error) {
	var (
		next  int
		bytes uint64
		pend  = make([]*native.Pending, b.cfg.inflight)
		ops   = make([]native.SSDOp, b.cfg.batch)
		start = time.Now()
		end   = start.Add(b.cfg.dur)
		first error
	)
	submit := func(k int) error {
		for j := range ops {
			ops[j] = native.SSDOp{FileOffset: order[next], PoolOffset: uint64(k*b.cfg.batch+j) * bs, Len: bs}
			next = (next + 1) % len(order)
		}
		p, err := e.Submit(b.file, write, ops)
		pend[k] = p
		return err
	}
	for k := range pend {
		if err := submit(k); err != nil {
			first = err
			break
		}
	}
	for k := 0; ; k = (k + 1) % len(pend) {
		if pend[k] == nil {
			if allNil(pend) {
				break
			}
			continue
		}
		<-pend[k].Done()
		if err := pend[k].Err(); err != nil && first == nil {
			first = err
		}
		pend[k] = nil
		bytes += uint64(b.cfg.batch) * bs
		if first == nil && ctx.Err() == nil && time.Now().Before(end) {
			if err := submit(k); err != nil {
				first = err
			}
		}
	}
	return bytes, time.Since(start), first
}

func allNil(p []*native.Pending) bool {
	for _, x := range p {
		if x != nil {
			return false
		}
	}
	return true
}

// loop is the plain baseline: workers goroutines, each with an O_DIRECT
// fd (when the file system has it) and a pool extent of its own, taking
// the next block of order and pread/pwrite-ing it until cfg.dur has
// passed.
func (b *ioBench) loop(bs uint64, write bool, order []uint64, workers int) (uint64, time.Duration, error) {
	flags := syscall.O_RDWR | syscall.O_CLOEXEC
	if b.direct {
		flags |= syscall.O_DIRECT
	}
	var (
		next, total atomic.Uint64
		wg          sync.WaitGroup
		errOnce     sync.Once
		first       error
		mem         = b.pool.Bytes()
		start       = time.Now()
		end         = start.Add(b.cfg.dur)
	)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			fd, err := syscall.Open(b.path, flags, 0)
			if err != nil {
				errOnce.Do(func() { first = fmt.Errorf("open: %w", err) })
				return
			}
			defer syscall.Close(fd)
			buf := mem[uint64(w)*bs : uint64(w+1)*bs]
			for time.Now().Before(end) {
				off := int64(order[(next.Add(1)-1)%uint64(len(order))])
				var n int
				if write {
					n, err = syscall.Pwrite(fd, buf, off)
				} else {
					n, err = syscall.Pread(fd, buf, off)
				}
				if err != nil || n != len(buf) {
					errOnce.Do(func() { first = fmt.Errorf("%d of %d bytes at %d: %w", n, len(buf), off, err) })
					return
				}
				total.Add(uint64(n))
			}
		}()
	}
	wg.Wait()
	return total.Load(), time.Since(start), first
}
