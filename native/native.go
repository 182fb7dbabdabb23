// Package native is the thin cgo boundary to libpegaflow_native: a host
// pool, producer memory regions and batched asynchronous copies between
// them. It holds no policy; the engine decides what to copy where.
//
// The default build links the CPU fallback (build/native); the `cuda` build
// tag links the CUDA build (build/native-cuda: pinned pool, CUDA IPC
// regions, copy streams). Run `make native` (or `make CUDA=1 native`)
// before `go build`.
//
// Every method is safe for concurrent use. Closing an object never races
// with a call that uses it: the Go side serialises Close against calls into
// C, and the C side keeps regions and the pool alive while copies that use
// them are in flight.
package native

/*
#cgo CFLAGS: -I${SRCDIR}/include
#cgo !cuda LDFLAGS: ${SRCDIR}/../build/native/libpegaflow_native.a -lpthread
#cgo cuda LDFLAGS: ${SRCDIR}/../build/native-cuda/libpegaflow_native.a ${SRCDIR}/../build/native-cuda/libcudart_static.a -lstdc++ -ldl -lrt -lpthread
#include <stdlib.h>
#include "pegaflow_native.h"
*/
import "C"

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"unsafe"
)

// Errors returned by this package wrap one of these (errors.Is works).
var (
	ErrInvalid      = errors.New("native: invalid argument")
	ErrRange        = errors.New("native: offset or length out of range")
	ErrNoMem        = errors.New("native: out of memory")
	ErrIO           = errors.New("native: i/o, mapping or device failure")
	ErrNotSupported = errors.New("native: not supported by this build")
	ErrClosed       = errors.New("native: closed")
	ErrCopy         = errors.New("native: copy failed")
	ErrNoDevice     = errors.New("native: no visible CUDA device with that UUID")
	ErrPeer         = errors.New("native: transfer peer failed or its connection was closed")
	ErrCanceled     = errors.New("native: transfer cancelled")
)

func codeErr(code int64, what string) error {
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
	case C.PF_ECOPY:
		kind = ErrCopy
	case C.PF_ENODEV:
		kind = ErrNoDevice
	case C.PF_EPEER:
		kind = ErrPeer
	case C.PF_ECANCELED:
		kind = ErrCanceled
	default:
		return fmt.Errorf("%w: %s: unknown native status %d", ErrCopy, what, code)
	}
	return fmt.Errorf("%w: %s", kind, what)
}

// Backend is "cpu" or "cuda".
func Backend() string { return C.GoString(C.pf_backend()) }

// PoolFlags are best-effort pool options.
type PoolFlags uint32

const (
	// PoolHugePages asks for transparent huge pages (CPU build).
	PoolHugePages PoolFlags = C.PF_POOL_HUGEPAGES
	// PoolMlock locks the pool in RAM (CPU build; the CUDA pool is pinned).
	PoolMlock PoolFlags = C.PF_POOL_MLOCK
)

// Pool is the engine's host memory. Its pages are resident from creation
// on, so copies never take page faults on the request path.
type Pool struct {
	mu   sync.RWMutex // held shared by submits, exclusively by Close
	p    *C.pf_pool
	size uint64
	base unsafe.Pointer
}

// NewPool allocates size bytes, preferring numaNode when >= 0 (CPU build)
// or the NUMA node of device (CUDA build, device >= 0). Placement, huge
// pages and mlock are best effort; allocation failure is not.
func NewPool(size uint64, numaNode, device int, flags PoolFlags) (*Pool, error) {
	var p *C.pf_pool
	if rc := C.pf_pool_create(C.uint64_t(size), C.int(numaNode), C.int(device), C.uint32_t(flags), &p); rc != C.PF_OK {
		return nil, codeErr(int64(rc), fmt.Sprintf("pool of %d bytes", size))
	}
	return &Pool{p: p, size: size, base: C.pf_pool_base(p)}, nil
}

// Size is the pool's capacity in bytes.
func (p *Pool) Size() uint64 { return p.size }

// Bytes is the host view of the whole pool, valid until Close (nil after).
// It is for verification and debugging: reading bytes that a copy is
// writing is a data race.
func (p *Pool) Bytes() []byte {
	p.mu.RLock()
	defer p.mu.RUnlock()
	if p.p == nil {
		return nil
	}
	return unsafe.Slice((*byte)(p.base), p.size)
}

// Close frees the pool. It fails with ErrClosed, and keeps the pool, while
// copies that use it are in flight; closing a closed pool is a no-op.
func (p *Pool) Close() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.p == nil {
		return nil
	}
	if rc := C.pf_pool_destroy(p.p); rc != C.PF_OK {
		return codeErr(int64(rc), "destroy pool")
	}
	p.p = nil
	return nil
}

// Region is producer memory opened by the engine: a shared-memory file, or
// (CUDA build) a device allocation shared through a CUDA IPC handle.
type Region struct {
	mu   sync.RWMutex // held shared by submits, exclusively by Close
	r    *C.pf_region
	size uint64
}

// OpenShmRegion maps the first size bytes of a shared-memory file. It fails
// with ErrRange when the file is smaller than size.
func OpenShmRegion(path string, size uint64) (*Region, error) {
	cpath := C.CString(path)
	defer C.free(unsafe.Pointer(cpath))
	var r *C.pf_region
	if rc := C.pf_region_open_shm(cpath, C.uint64_t(size), &r); rc != C.PF_OK {
		return nil, codeErr(int64(rc), fmt.Sprintf("open shm region %q (%d bytes)", path, size))
	}
	return &Region{r: r, size: size}, nil
}

// OpenShmRegionFile maps the first size bytes of a shared-memory file the
// caller opened read-write (and checked). The size is checked against the
// file's own (fstat): ErrRange when it is smaller. f stays the caller's to
// close; the mapping outlives it.
func OpenShmRegionFile(f *os.File, size uint64) (*Region, error) {
	var r *C.pf_region
	var rc C.int
	// Control keeps the fd open and valid for the length of the call.
	err := controlFd(f, func(fd uintptr) { rc = C.pf_region_open_shm_fd(C.int(fd), C.uint64_t(size), &r) })
	if err != nil {
		return nil, fmt.Errorf("%w: shm file %s: %w", ErrInvalid, f.Name(), err)
	}
	if rc != C.PF_OK {
		return nil, codeErr(int64(rc), fmt.Sprintf("open shm region %q (%d bytes)", f.Name(), size))
	}
	return &Region{r: r, size: size}, nil
}

func controlFd(f *os.File, fn func(fd uintptr)) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	return rc.Control(fn)
}

// CUDADeviceByUUID returns the CUDA ordinal, in this process, of the device
// with the given UUID ("GPU-8e3c1a2b-...", as nvidia-smi and the connector
// print it). Ordinals depend on CUDA_VISIBLE_DEVICES; UUIDs do not. It fails
// with ErrNoDevice when no visible device has it, ErrInvalid when uuid is not
// a UUID, and ErrNotSupported in the CPU build.
func CUDADeviceByUUID(uuid string) (int, error) {
	cs := C.CString(uuid)
	defer C.free(unsafe.Pointer(cs))
	var dev C.int
	if rc := C.pf_cuda_device_by_uuid(cs, C.uint64_t(len(uuid)), &dev); rc != C.PF_OK {
		return -1, codeErr(int64(rc), fmt.Sprintf("CUDA device %q", uuid))
	}
	return int(dev), nil
}

// OpenCUDAIPCRegion opens a cudaIpcMemHandle_t (64 bytes) on device
// (device < 0: device 0). The allocation behind it must hold size bytes.
// The CPU build fails with ErrNotSupported.
func OpenCUDAIPCRegion(handle []byte, device int, size uint64) (*Region, error) {
	var hp *C.uint8_t
	if len(handle) > 0 {
		hp = (*C.uint8_t)(unsafe.Pointer(&handle[0]))
	}
	var r *C.pf_region
	if rc := C.pf_region_open_cuda_ipc(hp, C.uint64_t(len(handle)), C.int(device), C.uint64_t(size), &r); rc != C.PF_OK {
		return nil, codeErr(int64(rc), fmt.Sprintf("open CUDA IPC region on device %d (%d bytes)", device, size))
	}
	return &Region{r: r, size: size}, nil
}

// Size is the number of accessible bytes.
func (r *Region) Size() uint64 { return r.size }

// Close releases the region. It is safe while copies are in flight: the
// mapping goes away after the last one completes. Later submits fail with
// ErrClosed; closing twice is a no-op.
func (r *Region) Close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.r == nil {
		return nil
	}
	rc := C.pf_region_close(r.r)
	r.r = nil
	return codeErr(int64(rc), "close region")
}

// Event is a producer's interprocess CUDA event (CUDA build). A batch
// submitted with SubmitAfter starts its GPU copies only once the producer's
// stream has passed the event's latest record made before the submit.
type Event struct {
	mu sync.RWMutex // held shared by submits, exclusively by Close
	e  *C.pf_event
}

// OpenCUDAIPCEvent opens a cudaIpcEventHandle_t (64 bytes) on device
// (device < 0: device 0). The CPU build fails with ErrNotSupported.
func OpenCUDAIPCEvent(handle []byte, device int) (*Event, error) {
	var hp *C.uint8_t
	if len(handle) > 0 {
		hp = (*C.uint8_t)(unsafe.Pointer(&handle[0]))
	}
	var e *C.pf_event
	if rc := C.pf_event_open_ipc(hp, C.uint64_t(len(handle)), C.int(device), &e); rc != C.PF_OK {
		return nil, codeErr(int64(rc), fmt.Sprintf("open CUDA IPC event on device %d", device))
	}
	return &Event{e: e}, nil
}

// Close releases the event. Waits already submitted stay valid; later
// SubmitAfter calls with it fail with ErrClosed. Closing twice is a no-op.
func (e *Event) Close() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.e == nil {
		return nil
	}
	rc := C.pf_event_close(e.e)
	e.e = nil
	return codeErr(int64(rc), "close event")
}

// Direction of a copy.
type Direction int

const (
	RegionToPool Direction = C.PF_DIR_REGION_TO_POOL // save
	PoolToRegion Direction = C.PF_DIR_POOL_TO_REGION // load
)

// CopyOp moves Len bytes between a region offset and a pool offset. Its
// layout is pf_copy_op's, so a slice of ops is passed to C as is.
type CopyOp struct{ RegionOffset, PoolOffset, Len uint64 }

// Compile-time check that CopyOp and pf_copy_op have the same size.
var (
	_ [unsafe.Sizeof(CopyOp{}) - unsafe.Sizeof(C.pf_copy_op{})]struct{}
	_ [unsafe.Sizeof(C.pf_copy_op{}) - unsafe.Sizeof(CopyOp{})]struct{}
)

// Copier runs batches on native copy threads (CPU) or streams (CUDA).
// Completions come back on a pipe read through Go's poller (completions).
type Copier struct {
	mu   sync.RWMutex // held shared by submits, exclusively by Close
	c    *C.pf_copier
	done *completions

	closeOnce sync.Once
	closeErr  error
}

// NewCopier starts a copier with threads copy threads (CPU build) or
// streams per direction and device (CUDA build), 1..256.
func NewCopier(threads int) (*Copier, error) {
	done, err := newCompletions("pegaflow-copy-completions")
	if err != nil {
		return nil, err
	}
	cp := &Copier{done: done}
	if rc := C.pf_copier_create(C.int(threads), C.int(done.writeFd), &cp.c); rc != C.PF_OK {
		done.abort()
		return nil, codeErr(int64(rc), fmt.Sprintf("copier with %d threads", threads))
	}
	done.start()
	return cp, nil
}

// coalesce merges ops adjacent in both the region and the pool. It never
// merges across a wrap-around, so an invalid op cannot turn valid.
func coalesce(ops []CopyOp) []CopyOp {
	if len(ops) < 2 {
		return ops
	}
	out := make([]CopyOp, 0, len(ops))
	cur := ops[0]
	for _, op := range ops[1:] {
		rEnd, pEnd, n := cur.RegionOffset+cur.Len, cur.PoolOffset+cur.Len, cur.Len+op.Len
		if op.RegionOffset == rEnd && op.PoolOffset == pEnd &&
			rEnd >= cur.RegionOffset && pEnd >= cur.PoolOffset && n >= cur.Len {
			cur.Len = n
			continue
		}
		out = append(out, cur)
		cur = op
	}
	return append(out, cur)
}

// Submit validates the batch (every op against the region and pool sizes)
// and starts it, returning at once. On error nothing was copied and no
// Pending exists. Ops adjacent in both region and pool are merged first.
func (c *Copier) Submit(r *Region, p *Pool, dir Direction, ops []CopyOp) (*Pending, error) {
	return c.SubmitAfter(r, p, dir, ops, nil)
}

// SubmitAfter is Submit whose GPU copies wait (on the GPU, not the host)
// for after's most recent record; after == nil is Submit. Only CUDA IPC
// regions can wait: a shm region with an event fails with ErrInvalid, and
// the CPU build, which has no events, with ErrNotSupported.
func (c *Copier) SubmitAfter(r *Region, p *Pool, dir Direction, ops []CopyOp, after *Event) (*Pending, error) {
	if r == nil || p == nil {
		return nil, fmt.Errorf("%w: nil region or pool", ErrInvalid)
	}
	ops = coalesce(ops)
	var opsPtr *C.pf_copy_op
	if len(ops) > 0 {
		opsPtr = (*C.pf_copy_op)(unsafe.Pointer(&ops[0]))
	}

	c.mu.RLock()
	defer c.mu.RUnlock()
	if c.c == nil {
		return nil, fmt.Errorf("%w: copier", ErrClosed)
	}
	r.mu.RLock()
	defer r.mu.RUnlock()
	if r.r == nil {
		return nil, fmt.Errorf("%w: region", ErrClosed)
	}
	p.mu.RLock()
	defer p.mu.RUnlock()
	if p.p == nil {
		return nil, fmt.Errorf("%w: pool", ErrClosed)
	}
	var ev *C.pf_event
	if after != nil {
		after.mu.RLock()
		defer after.mu.RUnlock()
		if after.e == nil {
			return nil, fmt.Errorf("%w: event", ErrClosed)
		}
		ev = after.e
	}

	token, pend := c.done.add("copy batch")
	// C copies the ops before returning, so the slice is not retained.
	rc := C.pf_copier_submit_after(c.c, r.r, p.p, C.int(dir), opsPtr, C.uint64_t(len(ops)), ev, C.uint64_t(token))
	if rc != C.PF_OK {
		c.done.drop(token)
		return nil, codeErr(int64(rc), fmt.Sprintf("submit %d ops", len(ops)))
	}
	return pend, nil
}

// Copy is Submit and wait. It always waits for the copy to finish, even if
// ctx ends meanwhile, because the memory is in use until then; ctx only
// stops it before submission.
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

// HoldForTest, for tests only, keeps the copy threads from starting any
// more work while hold is true: submitted shm batches stay in flight, as
// a copy stuck on a dead producer would, until HoldForTest(false).
func (c *Copier) HoldForTest(hold bool) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	if c.c == nil {
		return
	}
	h := C.int(0)
	if hold {
		h = 1
	}
	C.pf_copier_test_hold(c.c, h)
}

// Close stops new submits, waits for in-flight batches (their Pendings are
// done when it returns), then stops the copier. Concurrent and repeated
// calls all wait and return the same result.
func (c *Copier) Close() error {
	c.closeOnce.Do(func() {
		c.mu.Lock()
		pc := c.c
		c.c = nil
		c.mu.Unlock()
		C.pf_copier_destroy(pc)
		c.closeErr = c.done.close()
	})
	return c.closeErr
}
