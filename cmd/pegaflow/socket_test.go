package main

import (
	"bytes"
	"context"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// pegaflow serve refuses a socket directory another user could change
// (exit 2, naming it) instead of serving a socket that can be swapped.
func TestServeRefusesUnsafeSocketDir(t *testing.T) {
	cases := []struct {
		name  string
		root  bool
		setup func(t *testing.T, dir string) string
		want  string
	}{
		{"pre-created 0777", false, func(t *testing.T, dir string) string {
			d := filepath.Join(dir, "pegaflow-0")
			require.NoError(t, os.Mkdir(d, 0o777))
			require.NoError(t, os.Chmod(d, 0o777))
			return d
		}, "group- or world-writable"},
		{"symlink", false, func(t *testing.T, dir string) string {
			real := filepath.Join(dir, "real")
			require.NoError(t, os.Mkdir(real, 0o700))
			d := filepath.Join(dir, "pegaflow-0")
			require.NoError(t, os.Symlink(real, d))
			return d
		}, "symlink"},
		{"another user's", true, func(t *testing.T, dir string) string {
			d := filepath.Join(dir, "pegaflow-0")
			require.NoError(t, os.Mkdir(d, 0o755))
			require.NoError(t, os.Chown(d, 65534, 65534))
			return d
		}, "owned by uid 65534"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if tc.root && os.Geteuid() != 0 {
				t.Skip("needs root: makes a directory owned by another user")
			}
			d := tc.setup(t, t.TempDir())
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
			defer cancel()
			var stderr bytes.Buffer
			code := dispatch(ctx, []string{"serve", "--socket", filepath.Join(d, "engine.sock"),
				"--http-addr", "127.0.0.1:0", "--pool-size", "1MiB"}, io.Discard, &stderr)
			require.Equal(t, 2, code, "stderr: %s", &stderr)
			require.Contains(t, stderr.String(), tc.want)
			require.Contains(t, stderr.String(), d)
		})
	}
}
