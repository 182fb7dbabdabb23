package engine

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/pegaflow/pegaflow/native"
)

// DefaultShmDir is where producers' shared-memory files must live unless
// Config.ShmDir says otherwise.
const DefaultShmDir = "/dev/shm"

// Peer is the process on the other end of a request: its credentials as
// the kernel reported them for the socket (SO_PEERCRED), not as it claims.
type Peer struct {
	UID, GID uint32
	PID      int32
}

type peerKey struct{}

// WithPeer tells the engine who sent the request that ctx carries. The API
// layer sets it on every Register from the socket; an in-process caller
// that sets none (tests, tools linked with the engine) registers as the
// engine's own effective uid and gid.
func WithPeer(ctx context.Context, p Peer) context.Context {
	return context.WithValue(ctx, peerKey{}, p)
}

func peerFrom(ctx context.Context) Peer {
	if p, ok := ctx.Value(peerKey{}).(Peer); ok {
		return p
	}
	return Peer{UID: uint32(os.Geteuid()), GID: uint32(os.Getegid()), PID: int32(os.Getpid())}
}

// openShmFile opens a producer's shared-memory file for a peer, so that a
// client can register only memory it owns: the engine (often root) opens
// it read-write and maps it, so any file it could open would otherwise be
// readable (Save) and writable (Load) through the pool.
//
// The file must lie beneath dir, reached without any symlink (in any
// component) or magic link (/proc/*/fd), be a regular file owned by the
// peer's uid (root included: a root client names root's files), and live
// on tmpfs or hugetlbfs, whose pages never block on a disk. The checks are
// made on the open file, so a rename between check and use changes
// nothing.
func openShmFile(dir, path string, peer Peer) (*os.File, error) {
	rel, err := filepath.Rel(dir, path)
	if err != nil || rel == "." || rel == ".." || strings.HasPrefix(rel, "../") {
		return nil, fmt.Errorf("%w: shm_path %q is not beneath the engine's shared-memory directory %q (--shm-dir)",
			ErrPermission, path, dir)
	}
	dfd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("%w: shared-memory directory %q (--shm-dir): %w", ErrPrecondition, dir, err)
	}
	defer unix.Close(dfd)
	fd, err := unix.Openat2(dfd, rel, &unix.OpenHow{
		// O_NONBLOCK: opening whatever else sits there never waits.
		Flags:   unix.O_RDWR | unix.O_CLOEXEC | unix.O_NOFOLLOW | unix.O_NOCTTY | unix.O_NONBLOCK,
		Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS,
	})
	if err != nil {
		return nil, openShmError(path, dir, err)
	}
	f := os.NewFile(uintptr(fd), path)
	if err := checkShmFile(f, path, peer); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

func openShmError(path, dir string, err error) error {
	switch {
	case errors.Is(err, unix.ELOOP):
		return fmt.Errorf("%w: shm_path %q goes through a symlink; name the file itself", ErrPermission, path)
	case errors.Is(err, unix.EXDEV):
		return fmt.Errorf("%w: shm_path %q leaves the shared-memory directory %q", ErrPermission, path, dir)
	case errors.Is(err, unix.EACCES), errors.Is(err, unix.EPERM):
		return fmt.Errorf("%w: shm_path %q: %w", ErrPermission, path, err)
	case errors.Is(err, unix.ENOSYS):
		return fmt.Errorf("%w: shm_path %q: the kernel has no openat2 (Linux >= 5.6 needed)", ErrPrecondition, path)
	}
	return fmt.Errorf("%w: shm_path %q: %w", ErrInvalid, path, err)
}

func checkShmFile(f *os.File, path string, peer Peer) error {
	var st unix.Stat_t
	var fs unix.Statfs_t
	err := unix.Fstat(int(f.Fd()), &st)
	if err == nil {
		err = unix.Fstatfs(int(f.Fd()), &fs)
	}
	switch {
	case err != nil:
		return fmt.Errorf("%w: shm_path %q: %w", ErrInvalid, path, err)
	case st.Mode&unix.S_IFMT != unix.S_IFREG:
		return fmt.Errorf("%w: shm_path %q is not a regular file", ErrInvalid, path)
	case st.Uid != peer.UID:
		return fmt.Errorf("%w: shm_path %q is owned by uid %d, not by the registering process (uid %d)",
			ErrPermission, path, st.Uid, peer.UID)
	case fs.Type != unix.TMPFS_MAGIC && fs.Type != unix.HUGETLBFS_MAGIC:
		return fmt.Errorf("%w: shm_path %q is not on tmpfs or hugetlbfs (filesystem magic %#x)", ErrPermission, path, fs.Type)
	}
	return nil
}

// openShmRegion maps the first size bytes of a peer's shared-memory file.
func openShmRegion(dir, path string, size uint64, peer Peer) (*native.Region, error) {
	f, err := openShmFile(dir, path, peer)
	if err != nil {
		return nil, err
	}
	defer f.Close() // the mapping keeps the file
	r, err := native.OpenShmRegionFile(f, size)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	return r, nil
}
