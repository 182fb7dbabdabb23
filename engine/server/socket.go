package server

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"syscall"
	"time"
)

// ErrUnsafeSocket: the socket's directory (or a file at the socket path)
// could let another user replace the socket, so the server refuses to
// start. pegaflow serve exits 2 on it: it is the operator's setup to fix.
var ErrUnsafeSocket = errors.New("unsafe socket location")

// listenUnix binds the socket in a directory only this user can change.
//
// Whoever can write the socket's directory can rename the socket away and
// bind their own, receiving every client's registrations, so the directory
// is created 0700 (0750 and owned by the socket group with one, so the
// group can reach the socket), and an existing one must be a real
// directory (not a symlink) owned by the effective uid and writable by
// nobody else. A stale socket is removed only when it is ours.
func listenUnix(cfg Config) (net.Listener, error) {
	gid := -1
	if cfg.SocketGroup != "" {
		g, err := lookupGroup(cfg.SocketGroup)
		if err != nil {
			return nil, fmt.Errorf("socket group %q: %w", cfg.SocketGroup, err)
		}
		gid = g
	}
	if err := prepareSocketDir(filepath.Dir(cfg.SocketPath), gid); err != nil {
		return nil, err
	}
	if err := removeStaleSocket(cfg.SocketPath); err != nil {
		return nil, err
	}
	lis, err := net.Listen("unix", cfg.SocketPath)
	if err != nil {
		return nil, fmt.Errorf("listen %s: %w", cfg.SocketPath, err)
	}
	if err := os.Chmod(cfg.SocketPath, cfg.SocketMode); err != nil {
		lis.Close()
		return nil, fmt.Errorf("chmod socket: %w", err)
	}
	if gid >= 0 {
		if err := os.Chown(cfg.SocketPath, -1, gid); err != nil {
			lis.Close()
			return nil, fmt.Errorf("socket group %q: %w", cfg.SocketGroup, err)
		}
	}
	return lis, nil
}

// prepareSocketDir creates dir (its parents 0755 as MkdirAll would) or
// checks the one that exists; gid >= 0 is the socket group.
func prepareSocketDir(dir string, gid int) error {
	if err := os.MkdirAll(filepath.Dir(dir), 0o755); err != nil {
		return fmt.Errorf("socket dir: %w", err)
	}
	mode := os.FileMode(0o700)
	if gid >= 0 {
		mode = 0o750
	}
	switch err := os.Mkdir(dir, mode); {
	case err == nil:
		// Mkdir applied the umask, and the group is the creator's.
		if err := os.Chmod(dir, mode); err != nil {
			return fmt.Errorf("socket dir: %w", err)
		}
		if gid >= 0 {
			if err := os.Chown(dir, -1, gid); err != nil {
				return fmt.Errorf("socket dir %s: group %d: %w", dir, gid, err)
			}
		}
	case !errors.Is(err, os.ErrExist):
		return fmt.Errorf("socket dir: %w", err)
	}
	// Checked after creating too: another user may have made it first.
	return checkSocketDir(dir)
}

// checkSocketDir refuses a directory another user could change.
func checkSocketDir(dir string) error {
	fi, err := os.Lstat(dir)
	if err != nil {
		return fmt.Errorf("socket dir: %w", err)
	}
	unsafe := func(why string, args ...any) error {
		return fmt.Errorf("%w: socket directory %s %s; remove it or choose another --socket",
			ErrUnsafeSocket, dir, fmt.Sprintf(why, args...))
	}
	switch {
	case fi.Mode()&os.ModeSymlink != 0:
		return unsafe("is a symlink")
	case !fi.IsDir():
		return unsafe("is not a directory")
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return unsafe("has no owner information")
	}
	if euid := os.Geteuid(); int(st.Uid) != euid {
		return unsafe("is owned by uid %d, not by this process (euid %d)", st.Uid, euid)
	}
	if perm := fi.Mode().Perm(); perm&0o022 != 0 {
		return unsafe("is group- or world-writable (mode %04o)", perm)
	}
	return nil
}

// removeStaleSocket removes a socket file left by a dead engine of ours.
// A live one must not be stolen, and another user's is not ours to remove.
func removeStaleSocket(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("socket: %w", err)
	}
	if fi.Mode()&os.ModeSocket == 0 {
		return fmt.Errorf("%w: %s exists and is not a socket", ErrUnsafeSocket, path)
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); !ok || int(st.Uid) != os.Geteuid() {
		return fmt.Errorf("%w: %s is a socket of another user; not removing it", ErrUnsafeSocket, path)
	}
	if c, err := net.DialTimeout("unix", path, 200*time.Millisecond); err == nil {
		c.Close()
		return fmt.Errorf("%s is in use by another engine", path)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("stale socket: %w", err)
	}
	return nil
}

func lookupGroup(name string) (int, error) {
	if gid, err := strconv.Atoi(name); err == nil {
		return gid, nil
	}
	g, err := user.LookupGroup(name)
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(g.Gid)
}
