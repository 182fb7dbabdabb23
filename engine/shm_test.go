package engine

import (
	"context"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/stretchr/testify/require"

	pb "github.com/pegaflow/pegaflow/engine/api/pegaflowv1"
	"github.com/pegaflow/pegaflow/internal/kvtest"
)

// A client can register only shared-memory files it owns, beneath the shm
// directory, on tmpfs, reached without symlinks: the engine (root here)
// would otherwise read any file into the pool on Save and overwrite it
// on Load.
func TestRegisterOnlyOwnSharedMemory(t *testing.T) {
	e := newTestEngine(t, 4<<20)
	sid, err := e.OpenSession("intruder")
	require.NoError(t, err)
	c := newCache(t, smallSpec)
	good := c.Paths[0]
	dir := filepath.Dir(good)
	size := int64(smallSpec.LayerBytes())
	// A file of the same size elsewhere: what the attacker wants mapped.
	secret := filepath.Join(t.TempDir(), "secret")
	require.NoError(t, os.WriteFile(secret, make([]byte, size), 0o600))
	link := filepath.Join(dir, "link")
	require.NoError(t, os.Symlink(good, link))
	realDir := filepath.Join(dir, "real")
	require.NoError(t, os.Mkdir(realDir, 0o700))
	require.NoError(t, os.WriteFile(filepath.Join(realDir, "kv"), make([]byte, size), 0o600))
	require.NoError(t, os.Symlink(realDir, filepath.Join(dir, "dirlink")))
	fifo := filepath.Join(dir, "fifo")
	require.NoError(t, syscall.Mkfifo(fifo, 0o600))
	others := filepath.Join(dir, "others")
	require.NoError(t, os.WriteFile(others, make([]byte, size), 0o600))
	root := os.Geteuid() == 0
	if root {
		require.NoError(t, os.Chown(others, 65534, 65534))
	}

	cases := []struct {
		name   string
		path   string
		peer   *Peer // nil: in-process, the engine's own uid
		root   bool  // needs root (files of another user)
		kind   error
		reason string
	}{
		{"own file", good, nil, false, nil, ""},
		{"a file outside the shm dir", secret, nil, false, ErrPermission, "not beneath"},
		{"/etc/passwd", "/etc/passwd", nil, false, ErrPermission, "not beneath"},
		{"/proc", "/proc/self/mem", nil, false, ErrPermission, "not beneath"},
		{"/sys", "/sys/kernel/notes", nil, false, ErrPermission, "not beneath"},
		{"a device", "/dev/zero", nil, false, ErrPermission, "not beneath"},
		{"dot-dot out of the shm dir", dir + "/../../etc/passwd", nil, false, ErrPermission, "not beneath"},
		{"the shm dir itself", kvtest.ShmDir(), nil, false, ErrPermission, "not beneath"},
		{"a symlink", link, nil, false, ErrPermission, "symlink"},
		{"a symlinked directory", filepath.Join(dir, "dirlink", "kv"), nil, false, ErrPermission, "symlink"},
		{"a fifo", fifo, nil, false, ErrInvalid, "not a regular file"},
		{"a directory", realDir, nil, false, ErrInvalid, "is a directory"},
		{"another user's file", others, nil, true, ErrPermission, "owned by uid 65534"},
		{"root's file for another user", good, &Peer{UID: 65534, GID: 65534}, false, ErrPermission, "owned by uid"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if tc.root && !root {
				t.Skip("needs root: makes a file owned by another user")
			}
			req := c.RegisterRequest("I-"+tc.name, 0, smallSpec.Namespace("m", 1))
			req.SessionId = sid
			req.Regions[0].Source = &pb.MemoryRegion_ShmPath{ShmPath: tc.path}
			ctx := context.Background()
			if tc.peer != nil {
				ctx = WithPeer(ctx, *tc.peer)
			}
			_, err := e.Register(ctx, req)
			if tc.kind == nil {
				require.NoError(t, err)
				return
			}
			require.ErrorIs(t, err, tc.kind)
			require.ErrorContains(t, err, tc.reason)
		})
	}
}

// The shm directory must be on tmpfs (or hugetlbfs): a file on a disk
// could block a copy thread on I/O for as long as the disk likes.
func TestRegisterRefusesFilesOffTmpfs(t *testing.T) {
	dir := t.TempDir()
	var fs syscall.Statfs_t
	require.NoError(t, syscall.Statfs(dir, &fs))
	if fs.Type == 0x01021994 {
		t.Skip("the temp dir is on tmpfs here")
	}
	e, err := New(Config{PoolSize: 4 << 20, NUMANode: -1, Device: -1, ShmDir: dir}, nil, nil)
	require.NoError(t, err)
	defer e.Close()
	c, err := kvtest.New(dir, "kv", smallSpec)
	require.NoError(t, err)
	defer c.Close()
	sid, err := e.OpenSession("disk")
	require.NoError(t, err)
	req := c.RegisterRequest("I", 0, smallSpec.Namespace("m", 1))
	req.SessionId = sid
	_, err = e.Register(context.Background(), req)
	require.ErrorIs(t, err, ErrPermission)
	require.ErrorContains(t, err, "not on tmpfs")
}
