package server

import (
	"net"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/stretchr/testify/require"
)

// nobody is the uid/gid that tests needing another user run as.
const nobody = 65534

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: makes files owned by another user")
	}
}

func TestSocketDirIsCreatedPrivate(t *testing.T) {
	for _, tc := range []struct {
		name  string
		group string
		mode  os.FileMode
	}{
		{"no group", "", 0o700},
		{"socket group", "0", 0o750},
	} {
		t.Run(tc.name, func(t *testing.T) {
			old := syscall.Umask(0)
			defer syscall.Umask(old)
			sock := filepath.Join(t.TempDir(), "new", "engine.sock")
			lis, err := listenUnix(Config{SocketPath: sock, SocketMode: 0o600, SocketGroup: tc.group})
			require.NoError(t, err)
			defer lis.Close()
			fi, err := os.Stat(filepath.Dir(sock))
			require.NoError(t, err)
			require.Equal(t, tc.mode, fi.Mode().Perm())
		})
	}
}

// dirWithMode makes dir/s with mode, whatever the umask.
func dirWithMode(mode os.FileMode) func(t *testing.T, dir string) string {
	return func(t *testing.T, dir string) string {
		d := filepath.Join(dir, "s")
		require.NoError(t, os.Mkdir(d, 0o700))
		require.NoError(t, os.Chmod(d, mode))
		return d
	}
}

func TestServerRefusesUnsafeSocketDir(t *testing.T) {
	cases := []struct {
		name  string
		root  bool
		setup func(t *testing.T, dir string) string // returns the socket dir
		want  string
	}{
		{"world-writable", false, dirWithMode(0o777), "world-writable"},
		{"group-writable", false, dirWithMode(0o770), "group- or world-writable"},
		{"symlink", false, func(t *testing.T, dir string) string {
			real := filepath.Join(dir, "real")
			require.NoError(t, os.Mkdir(real, 0o700))
			d := filepath.Join(dir, "s")
			require.NoError(t, os.Symlink(real, d))
			return d
		}, "is a symlink"},
		{"not a directory", false, func(t *testing.T, dir string) string {
			d := filepath.Join(dir, "s")
			require.NoError(t, os.WriteFile(d, nil, 0o600))
			return d
		}, "not a directory"},
		{"another user's", true, func(t *testing.T, dir string) string {
			d := filepath.Join(dir, "s")
			require.NoError(t, os.Mkdir(d, 0o700))
			require.NoError(t, os.Chown(d, nobody, nobody))
			return d
		}, "owned by uid 65534"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if tc.root {
				requireRoot(t)
			}
			d := tc.setup(t, t.TempDir())
			_, err := listenUnix(Config{SocketPath: filepath.Join(d, "engine.sock"), SocketMode: 0o600})
			require.ErrorIs(t, err, ErrUnsafeSocket)
			require.ErrorContains(t, err, tc.want)
			require.ErrorContains(t, err, d)
		})
	}
}

func TestStaleSocketRemovedOnlyWhenOurs(t *testing.T) {
	stale := func(t *testing.T) string {
		sock := filepath.Join(t.TempDir(), "engine.sock")
		lis, err := net.Listen("unix", sock)
		require.NoError(t, err)
		lis.(*net.UnixListener).SetUnlinkOnClose(false)
		require.NoError(t, lis.Close())
		return sock
	}
	t.Run("ours", func(t *testing.T) {
		sock := stale(t)
		lis, err := listenUnix(Config{SocketPath: sock, SocketMode: 0o600})
		require.NoError(t, err)
		require.NoError(t, lis.Close())
	})
	t.Run("another user's", func(t *testing.T) {
		requireRoot(t)
		sock := stale(t)
		require.NoError(t, os.Lchown(sock, nobody, nobody))
		_, err := listenUnix(Config{SocketPath: sock, SocketMode: 0o600})
		require.ErrorIs(t, err, ErrUnsafeSocket)
		require.ErrorContains(t, err, "another user")
		_, err = os.Lstat(sock)
		require.NoError(t, err, "left in place")
	})
}
