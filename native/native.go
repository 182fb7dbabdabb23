// Package native is the thin cgo boundary to libpegaflow_native: a host
// pool, producer memory regions and batched asynchronous copies. It holds
// no policy; the engine decides what to copy where.
//
// The default build links the CPU fallback; the `cuda` build tag links the
// CUDA build (pinned pool, CUDA IPC regions, copy streams). Run `make
// native` (or `make CUDA=1 native`) before `go build`.
package native

/*
#cgo CFLAGS: -I${SRCDIR}/include
#cgo !cuda LDFLAGS: ${SRCDIR}/../build/native/libpegaflow_native.a -lpthread
#cgo cuda LDFLAGS: ${SRCDIR}/../build/native-cuda/libpegaflow_native.a -lcudart -lstdc++ -lpthread
#include <stdlib.h>
#include "pegaflow_native.h"
*/
import "C"

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"unsafe"
)

// Errors returned by this package wrap one of these (errors.Is works).
var (
	ErrInvalid      = errors.New("native: invalid argument")
	ErrRange        = errors.New("native: offset or length out of range")
	ErrNoMem        = errors.New("native: out of memory")
	ErrIO           = errors.New("native: i/o or mapping failure")
	ErrNotSupported = errors.New("native: not supported by this build")
	ErrClosed       = errors.New("native: closed")
	ErrCopy         = errors.New("native: copy failed")
)

func codeErr(code C.int, what string) error {
	var kind error
	switch code {
	case C.PF_OK:
		return nil
	case C.PF_EINVAL:
		kind = ErrInvalid
	case C.PF_ERANGE:
		kind = ErrRange
	case C.PF_ENOMEM:
		kind = ErrNoMem
	case C.PF_EIO:
		kind = ErrIO
	case C.PF_ENOTSUP:
		kind = ErrNotSupported
	case C.PF_ECLOSED:
		kind = ErrClosed
	default:
		kind = ErrCopy
	}
	return fmt.Errorf("%w: %s", kind, what)
}

// Backend is "cpu" or "cuda".
func Backend() string { return C.GoString(C.pf_backend()) }

// PoolFlags are best-effort pool options.
type PoolFlags uint32

const (
	PoolHugePages PoolFlags = C.PF_POOL_HUGEPAGES
	PoolMlock     PoolFlags = C.PF_POOL_MLOCK
)

// Pool is the engine's host memory. Its pages are faulted in at creation.
type Pool struct {
	mu sync.Mutex
	p  *C.pf_pool
}

// NewPool allocates size bytes, on numaNode when >= 0 (best effort).
func NewPool(size uint64, numaNode, device int, flags PoolFlags) (*Pool, error) {
	var p *C.pf_pool
	if rc := C.pf_pool_create(C.uint64_t(size), C.int(numaNode), C.int(device), C.uint32_t(flags), &p); rc != C.PF_OK {
		return nil, codeErr(rc, fmt.Sprintf("pool of %d bytes", size))
	}
	return &Pool{p: p}, nil
}

// Size is the pool's capacity in bytes.
func (p *Pool) Size() uint64 { return uint64(C.pf_pool_size(p.p)) }

// Bytes is the host view of the whole pool, valid until Close.
func (p *Pool) Bytes() []byte {
	return unsafe.Slice((*byte)(C.pf_pool_base(p.p)), p.Size())
}

// Close frees the pool; it fails with ErrClosed while copies use it.
func (p *Pool) Close() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.p == nil {
		return nil
	}
	if rc := C.pf_pool_destroy(p.p); rc != C.PF_OK {
		return codeErr(rc, "destroy pool")
	}
	p.p = nil
	return nil
}

// Region is producer memory opened by the engine.
type Region struct {
	r    *C.pf_region
	once sync.Once
}

// OpenShmRegion maps size bytes of a shared-memory file.
func OpenShmRegion(path string, size uint64) (*Region, error) {
	cpath := C.CString(path)
	defer C.free(unsafe.Pointer(cpath))
	var r *C.pf_region
	if rc := C.pf_region_open_shm(cpath, C.uint64_t(size), &r); rc != C.PF_OK {
		return nil, codeErr(rc, fmt.Sprintf("open %s (%d bytes)", path, size))
	}
	return &Region{r: r}, nil
}

// OpenCUDAIPCRegion opens a CUDA IPC memory handle on device.
func OpenCUDAIPCRegion(handle []byte, device int, size uint64) (*Region, error) {
	if len(handle) == 0 {
		return nil, fmt.Errorf("%w: empty IPC handle", ErrInvalid)
	}
	var r *C.pf_region
	rc := C.pf_region_open_cuda_ipc((*C.uint8_t)(unsafe.Pointer(&handle[0])), C.uint64_t(len(handle)), C.int(device), C.uint64_t(size), &r)
	if rc != C.PF_OK {
		return nil, codeErr(rc, fmt.Sprintf("open CUDA IPC handle on device %d", device))
	}
	return &Region{r: r}, nil
}

// Size is the number of accessible bytes.
func (r *Region) Size() uint64 { return uint64(C.pf_region_size(r.r)) }

// Close releases the region; safe while copies are in flight (the mapping
// goes away after the last one).
func (r *Region) Close() error {
	var err error
	r.once.Do(func() {
		if rc := C.pf_region_close(r.r); rc != C.PF_OK {
			err = codeErr(rc, "close region")
		}
	})
	return err
}

// Direction of a copy.
type Direction int

const (
	RegionToPool Direction = C.PF_DIR_REGION_TO_POOL // save
	PoolToRegion Direction = C.PF_DIR_POOL_TO_REGION // load
)

// CopyOp moves Len bytes between a region offset and a pool offset. Its
// layout matches pf_copy_op.
type CopyOp struct{ RegionOffset, PoolOffset, Len uint64 }

var _ [unsafe.Sizeof(CopyOp{}) - unsafe.Sizeof(C.pf_copy_op{})]struct{}
var _ [unsafe.Sizeof(C.pf_copy_op{}) - unsafe.Sizeof(CopyOp{})]struct{}

// Pending is a submitted batch.
type Pending struct {
	done chan struct{}
	err  error
}

// Done is closed when the batch finished.
func (p *Pending) Done() <-chan struct{} { return p.done }

// Err is the batch's outcome; valid after Done is closed.
func (p *Pending) Err() error { return p.err }

// Copier runs batches on native copy threads. Completions come back through
// a pipe read by one goroutine via Go's poller, so no OS thread blocks per
// copy.
type Copier struct {
	c       *C.pf_copier
	readEnd *os.File
	writeFd int
	next    atomic.Uint64
	mu      sync.Mutex
	pending map[uint64]*Pending
	closed  bool
	reader  sync.WaitGroup
}

// NewCopier starts threads copy threads.
func NewCopier(threads int) (*Copier, error) {
	var fds [2]int
	if err := syscall.Pipe2(fds[:], syscall.O_CLOEXEC); err != nil {
		return nil, fmt.Errorf("%w: pipe: %v", ErrIO, err)
	}
	if err := syscall.SetNonblock(fds[0], true); err != nil {
		syscall.Close(fds[0])
		syscall.Close(fds[1])
		return nil, fmt.Errorf("%w: pipe: %v", ErrIO, err)
	}
	cp := &Copier{readEnd: os.NewFile(uintptr(fds[0]), "pegaflow-copy-completions"), writeFd: fds[1], pending: map[uint64]*Pending{}}
	if rc := C.pf_copier_create(C.int(threads), C.int(fds[1]), &cp.c); rc != C.PF_OK {
		cp.readEnd.Close()
		syscall.Close(fds[1])
		return nil, codeErr(rc, fmt.Sprintf("copier with %d threads", threads))
	}
	cp.reader.Add(1)
	go cp.readCompletions()
	return cp, nil
}

func (c *Copier) readCompletions() {
	defer c.reader.Done()
	var buf [16]byte
	for {
		if _, err := io.ReadFull(c.readEnd, buf[:]); err != nil {
			return
		}
		token := *(*uint64)(unsafe.Pointer(&buf[0]))
		status := *(*int64)(unsafe.Pointer(&buf[8]))
		c.mu.Lock()
		p := c.pending[token]
		delete(c.pending, token)
		c.mu.Unlock()
		if p == nil {
			continue
		}
		if status != 0 {
			p.err = codeErr(C.int(status), "copy batch")
		}
		close(p.done)
	}
}

// coalesce merges ops adjacent in both the region and the pool.
func coalesce(ops []CopyOp) []CopyOp {
	if len(ops) < 2 {
		return ops
	}
	out := make([]CopyOp, 0, len(ops))
	cur := ops[0]
	for _, op := range ops[1:] {
		if op.RegionOffset == cur.RegionOffset+cur.Len && op.PoolOffset == cur.PoolOffset+cur.Len {
			cur.Len += op.Len
			continue
		}
		out = append(out, cur)
		cur = op
	}
	return append(out, cur)
}

// Submit validates the batch and starts it. On error nothing was copied.
func (c *Copier) Submit(r *Region, p *Pool, dir Direction, ops []CopyOp) (*Pending, error) {
	if r == nil || p == nil {
		return nil, fmt.Errorf("%w: nil region or pool", ErrInvalid)
	}
	ops = coalesce(ops)
	pend := &Pending{done: make(chan struct{})}
	token := c.next.Add(1)
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil, fmt.Errorf("%w: copier", ErrClosed)
	}
	c.pending[token] = pend
	c.mu.Unlock()
	var opsPtr *C.pf_copy_op
	if len(ops) > 0 {
		opsPtr = (*C.pf_copy_op)(unsafe.Pointer(&ops[0]))
	}
	p.mu.Lock()
	pool := p.p
	p.mu.Unlock()
	if pool == nil {
		c.forget(token)
		return nil, fmt.Errorf("%w: pool", ErrClosed)
	}
	rc := C.pf_copier_submit(c.c, r.r, pool, C.int(dir), opsPtr, C.uint64_t(len(ops)), C.uint64_t(token))
	if rc != C.PF_OK {
		c.forget(token)
		return nil, codeErr(rc, fmt.Sprintf("submit %d ops", len(ops)))
	}
	return pend, nil
}

func (c *Copier) forget(token uint64) {
	c.mu.Lock()
	delete(c.pending, token)
	c.mu.Unlock()
}

// Copy submits and waits. It always waits for the copy to finish, even if
// ctx ends, because the memory is in use until then; ctx only stops it
// before submission.
func (c *Copier) Copy(ctx context.Context, r *Region, p *Pool, dir Direction, ops []CopyOp) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	pend, err := c.Submit(r, p, dir, ops)
	if err != nil {
		return err
	}
	<-pend.done
	return pend.err
}

// Close waits for in-flight batches, then stops the threads.
func (c *Copier) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.closed = true
	c.mu.Unlock()
	C.pf_copier_destroy(c.c)
	// Every completion is in the pipe; closing the write end lets the
	// reader drain it and stop at EOF.
	syscall.Close(c.writeFd)
	c.reader.Wait()
	return c.readEnd.Close()
}
