package ssd

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"
)

// BenchmarkRecovery100K: Open of a store of 100K live slots (4 KiB class,
// small payloads: recovery reads headers, not payloads, bar the Window
// newest), from a full header scan and from a checkpoint plus the 1000
// slots written after it. The files are in the page cache, so this is
// the CPU and syscall cost; a cold NVMe adds 100K 4 KiB reads (~0.2 s at
// 500K IOPS, queue depth permitting).
func BenchmarkRecovery100K(b *testing.B) {
	const n = 100_000
	dir := b.TempDir()
	cfg := Config{Dir: dir, Classes: []Class{{MaxPayload: 4096, Slots: n}}}
	s, err := Open(context.Background(), cfg)
	require.NoError(b, err)
	payload := make([]byte, 64)
	for i := range n {
		if i == n-1000 {
			require.NoError(b, s.Checkpoint(context.Background()))
		}
		k := Key{Namespace: "ns-bench", Hash: fmt.Sprintf("%032d", i)}
		require.NoError(b, s.Put(context.Background(), k, []uint64{64}, payload))
	}
	s.closeFiles() // kill -9: the checkpoint is 1000 writes old
	ckpt, err := os.ReadFile(filepath.Join(dir, ckptName))
	require.NoError(b, err)
	for _, mode := range []string{"checkpoint", "scan"} {
		b.Run(mode, func(b *testing.B) {
			if mode == "scan" {
				require.NoError(b, os.Remove(filepath.Join(dir, ckptName)))
			} else {
				require.NoError(b, os.WriteFile(filepath.Join(dir, ckptName), ckpt, 0o600))
			}
			for b.Loop() {
				s, err := Open(context.Background(), cfg)
				require.NoError(b, err)
				require.Equal(b, n, s.Stats().Live)
				s.closeFiles()
			}
		})
	}
}
