package kvtest

import (
	"os"
	"testing"

	"github.com/stretchr/testify/require"
)

// The registered segments address exactly the bytes Segments returns, in
// every layout: what the engine copies is what tests fill and compare.
func TestRegisteredSegmentsAreTheBlockBytes(t *testing.T) {
	for _, layout := range []Layout{FlashAttn, FlashInfer, MLA} {
		t.Run(string(layout), func(t *testing.T) {
			spec := Spec{Layout: layout, Layers: 2, NumBlocks: 5, BlockSize: 4, Heads: 2, HeadSize: 8}
			c, err := New(t.TempDir(), "kv", spec)
			require.NoError(t, err)
			defer c.Close()
			spec = c.Spec // with the default element size
			c.Fill(3, 7)
			req := c.RegisterRequest("i", 0, spec.Namespace("m", 1))
			require.Len(t, req.Regions, spec.Layers)
			var got []byte
			for l, layer := range req.Layers {
				require.EqualValues(t, spec.LayerBytes(), req.Regions[l].Size)
				require.Len(t, layer.Segments, spec.NumSegments())
				for i, s := range layer.Segments {
					off := s.Offset + 3*s.Stride
					b := c.Layer(l)[off : off+s.Length]
					require.Equal(t, c.Segment(l, 3, i), b)
					got = append(got, b...)
				}
			}
			require.Equal(t, c.BlockBytes(3), got)
			require.Len(t, got, spec.BlockBytes())
			require.False(t, c.Equal(3, c, 2), "filled block differs from a zero one")
		})
	}
}

// A cache never truncates a file someone else may have mapped, and Close
// removes only its own files.
func TestNewRefusesAnExistingFile(t *testing.T) {
	dir := t.TempDir()
	spec := Spec{Layout: MLA, Layers: 2, NumBlocks: 1, BlockSize: 1, HeadSize: 4}
	a, err := New(dir, "kv", spec)
	require.NoError(t, err)
	_, err = New(dir, "kv", spec)
	require.ErrorIs(t, err, os.ErrExist)
	for _, p := range a.Paths {
		_, err := os.Stat(p)
		require.NoError(t, err, "the first cache's %s is still there", p)
	}
	a.Close()
	for _, p := range []string{dir + "/kv-L0", dir + "/kv-L1"} {
		_, err := os.Stat(p)
		require.ErrorIs(t, err, os.ErrNotExist)
	}
}

// An unnamed cache has no file in its directory but while Named runs, and
// then as often as Named runs after a Renew (a re-registration): the names
// reach the mapped bytes, a write through the mapping after Renew reaches
// the renewed file, and the names are gone when fn returns, even when it
// fails.
func TestUnnamedCacheIsNamedOnlyWhileRegistering(t *testing.T) {
	dir := TempShmDir(t)
	spec := Spec{Layout: MLA, Layers: 2, NumBlocks: 2, BlockSize: 1, HeadSize: 4}
	c, err := NewUnnamed(dir, "kv", spec)
	require.NoError(t, err)
	defer c.Close()
	requireEmpty := func(when string) {
		t.Helper()
		left, err := os.ReadDir(dir)
		require.NoError(t, err)
		require.Empty(t, left, when)
	}
	requireEmpty("after NewUnnamed")
	c.Fill(1, 7)
	for i, fail := range []error{nil, os.ErrClosed, nil} {
		if i > 0 {
			require.Error(t, c.Named(func() error { return nil }), "named twice without Renew")
			require.NoError(t, c.Renew())
			c.Fill(0, uint64(i))
		}
		err := c.Named(func() error {
			for l, p := range c.Paths {
				got, err := os.ReadFile(p)
				require.NoError(t, err)
				require.Equal(t, c.Layer(l), got, "%s holds layer %d's bytes", p, l)
			}
			return fail
		})
		require.ErrorIs(t, err, fail)
		requireEmpty("after Named")
	}
	c.Close()
	requireEmpty("after Close")
}
