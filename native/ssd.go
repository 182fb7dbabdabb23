package native

/*
#include <stdlib.h>
#include "pegaflow_ssd.h"
*/
import "C"

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"unsafe"
)

// SSD I/O (pegaflow_ssd.h): batched positioned reads and writes between the
// pool and files, O_DIRECT where the file system has it. No policy: the
// caller picks files, offsets and what to read or write.

// ErrShortRead means a read met the end of the file (it was truncated);
// ErrNoSpace that the file system is full.
var (
	ErrShortRead = errors.New("native: short read: the file ended first")
	ErrNoSpace   = errors.New("native: no space left on the file system")
)

// SSD bounds, the C side's: offsets, lengths and pool addresses are
// multiples of SSDAlign; a batch has 1..MaxSSDOps ops of at most
// MaxSSDOpLen bytes.
const (
	SSDAlign    = C.PF_SSD_ALIGN
	MaxSSDOps   = C.PF_SSD_MAX_OPS
	MaxSSDOpLen = C.PF_SSD_MAX_OP_LEN
)

// SSDBackend picks the engine's I/O backend.
type SSDBackend int

const (
	SSDAuto    SSDBackend = C.PF_SSD_AUTO    // io_uring when built and allowed, else threads
	SSDThreads SSDBackend = C.PF_SSD_THREADS // pread/pwrite on a thread pool
	SSDURing   SSDBackend = C.PF_SSD_URING   // io_uring, ErrNotSupported when unavailable
)

func (b SSDBackend) String() string {
	switch b {
	case SSDThreads:
		return "threads"
	case SSDURing:
		return "io_uring"
	}
	return "auto"
}

// SSDURingBuilt reports whether the library was built with liburing.
func SSDURingBuilt() bool { return C.pf_ssd_uring_built() != 0 }

// SSDOp moves Len bytes between FileOffset of a file and PoolOffset of the
// pool. Its layout is pf_ssd_op's.
type SSDOp struct{ FileOffset, PoolOffset, Len uint64 }

var (
	_ [unsafe.Sizeof(SSDOp{}) - unsafe.Sizeof(C.pf_ssd_op{})]struct{}
	_ [unsafe.Sizeof(C.pf_ssd_op{}) - unsafe.Sizeof(SSDOp{})]struct{}
)

// SSDFile is a file the engine reads and writes; every op is checked
// against its capacity.
type SSDFile struct {
	mu       sync.RWMutex // held shared by submits, exclusively by Close
	f        *C.pf_ssd_file
	direct   bool
	capacity uint64
	path     string
}

// OpenSSDFile opens path read-write (created 0600 when create is set),
// with O_DIRECT when the file system supports it (Direct reports it;
// requireDirect refuses the buffered fallback with ErrNotSupported). The
// file is not resized.
func OpenSSDFile(path string, capacity uint64, create, requireDirect bool) (*SSDFile, error) {
	cpath := C.CString(path)
	defer C.free(unsafe.Pointer(cpath))
	var flags C.uint32_t
	if create {
		flags |= C.PF_SSD_CREATE
	}
	if requireDirect {
		flags |= C.PF_SSD_REQUIRE_DIRECT
	}
	f := &SSDFile{capacity: capacity, path: path}
	if rc, errno := C.pf_ssd_file_open(cpath, C.uint64_t(capacity), flags, &f.f); rc != C.PF_OK {
		err := codeErr(int64(rc), fmt.Sprintf("open ssd file %q (capacity %d)", path, capacity))
		if rc == C.PF_EIO && errno != nil {
			err = fmt.Errorf("%w: %w", err, errno)
		}
		return nil, err
	}
	f.direct = C.pf_ssd_file_direct(f.f) != 0
	return f, nil
}

// Direct reports whether the file was opened with O_DIRECT.
func (f *SSDFile) Direct() bool { return f.direct }

// Capacity is the bound every op's file extent is checked against.
func (f *SSDFile) Capacity() uint64 { return f.capacity }

// Close closes the file once batches using it completed; repeated calls
// are no-ops.
func (f *SSDFile) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.f == nil {
		return nil
	}
	rc := C.pf_ssd_file_close(f.f)
	f.f = nil
	return codeErr(int64(rc), "close ssd file")
}

// SSDEngine runs SSD batches for one pool, which cannot be closed before
// the engine. Completions come back on the completion pipe.
type SSDEngine struct {
	mu         sync.RWMutex // held shared by submits, exclusively by Close
	e          *C.pf_ssd_engine
	done       *completions
	backend    SSDBackend
	registered bool

	closeOnce sync.Once
	closeErr  error
}

// NewSSDEngine starts an engine on pool: depth is threads (SSDThreads) or
// ring entries (SSDURing), 1..4096.
func NewSSDEngine(pool *Pool, backend SSDBackend, depth int) (*SSDEngine, error) {
	if pool == nil {
		return nil, fmt.Errorf("%w: nil pool", ErrInvalid)
	}
	done, err := newCompletions("pegaflow-ssd-completions")
	if err != nil {
		return nil, err
	}
	e := &SSDEngine{done: done}
	pool.mu.RLock()
	rc := C.int(C.PF_ECLOSED)
	if pool.p != nil {
		rc = C.pf_ssd_engine_create(pool.p, C.int(backend), C.int(depth), C.int(done.writeFd), &e.e)
	}
	pool.mu.RUnlock()
	if rc != C.PF_OK {
		done.abort()
		return nil, codeErr(int64(rc), fmt.Sprintf("ssd engine (%s, depth %d)", backend, depth))
	}
	done.start()
	var b, reg C.int
	C.pf_ssd_engine_info(e.e, &b, &reg)
	e.backend, e.registered = SSDBackend(b), reg != 0
	return e, nil
}

// Backend is the backend in use (SSDThreads or SSDURing); Registered
// whether the pool is registered with the ring as fixed buffers.
func (e *SSDEngine) Backend() SSDBackend { return e.backend }

// Registered reports whether io_uring reads and writes use the pool as
// registered (fixed) buffers.
func (e *SSDEngine) Registered() bool { return e.registered }

// Submit validates the batch (alignment, the file's capacity, the pool's
// size, bounds on count and length) and starts it. On error nothing was
// issued and no Pending exists.
func (e *SSDEngine) Submit(f *SSDFile, write bool, ops []SSDOp) (*Pending, error) {
	if f == nil || len(ops) == 0 {
		return nil, fmt.Errorf("%w: nil file or empty batch", ErrInvalid)
	}
	dir, what := C.int(C.PF_SSD_READ), "ssd read"
	if write {
		dir, what = C.PF_SSD_WRITE, "ssd write"
	}
	e.mu.RLock()
	defer e.mu.RUnlock()
	if e.e == nil {
		return nil, fmt.Errorf("%w: ssd engine", ErrClosed)
	}
	f.mu.RLock()
	defer f.mu.RUnlock()
	if f.f == nil {
		return nil, fmt.Errorf("%w: ssd file", ErrClosed)
	}
	token, pend := e.done.add(fmt.Sprintf("%s of %q", what, f.path))
	// C copies the ops before returning, so the slice is not retained.
	rc := C.pf_ssd_submit(e.e, f.f, dir, (*C.pf_ssd_op)(unsafe.Pointer(&ops[0])), C.uint64_t(len(ops)), C.uint64_t(token))
	if rc != C.PF_OK {
		e.done.drop(token)
		return nil, codeErr(int64(rc), fmt.Sprintf("%s: %d ops (offsets, lengths and pool addresses must be multiples of %d, within the file's %d bytes and the pool)",
			what, len(ops), SSDAlign, f.capacity))
	}
	return pend, nil
}

// Do is Submit and wait. It always waits for the I/O to finish, even if
// ctx ends meanwhile, because the pool memory is in use until then; ctx
// only stops it before submission.
func (e *SSDEngine) Do(ctx context.Context, f *SSDFile, write bool, ops []SSDOp) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	pend, err := e.Submit(f, write, ops)
	if err != nil {
		return err
	}
	<-pend.done
	return pend.err
}

// Close stops new submits, waits for in-flight batches, stops the engine
// and releases the pool. Repeated calls return the first result.
func (e *SSDEngine) Close() error {
	e.closeOnce.Do(func() {
		e.mu.Lock()
		pe := e.e
		e.e = nil
		e.mu.Unlock()
		C.pf_ssd_engine_destroy(pe)
		e.closeErr = e.done.close()
	})
	return e.closeErr
}
