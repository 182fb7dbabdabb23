package ssd

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// File is the I/O backend of one slot file: positional reads and writes
// of whole slots or their parts, safe for concurrent use at disjoint
// offsets. The native layer (io_uring with a pread/pwrite fallback, reads
// into registered pool buffers) implements it too; OSFile is the plain Go
// one the format and the tests use.
type File interface {
	ReadAt(p []byte, off int64) (int, error)
	WriteAt(p []byte, off int64) (int, error)
	// Sync makes every completed write durable (before a checkpoint).
	Sync() error
	Close() error
}

// Opener opens (creating it, 0600) a slot file of exactly size bytes,
// space reserved: a preallocated file never fails a write with ENOSPC.
type Opener func(path string, size int64) (File, error)

// OpenOSFile is the Opener over os.File. It reserves the space with
// fallocate, falling back to a sparse file where the file system has no
// fallocate (tmpfs on old kernels, some FUSE).
func OpenOSFile(path string, size int64) (File, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open slot file: %w", err)
	}
	fi, err := f.Stat()
	if err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("stat slot file: %w", err)
	}
	if fi.Size() != size {
		if err := preallocate(f, size); err != nil {
			_ = f.Close()
			return nil, fmt.Errorf("preallocate %s to %d bytes: %w", path, size, err)
		}
	}
	return f, nil
}

func preallocate(f *os.File, size int64) error {
	err := unix.Fallocate(int(f.Fd()), 0, 0, size)
	if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOSYS) {
		err = nil
	}
	if err != nil {
		return err
	}
	// fallocate never shrinks; a smaller size (the operator lowered
	// --ssd-size) truncates, dropping the slots past the end.
	return f.Truncate(size)
}
