package engine

import (
	"testing"

	"github.com/stretchr/testify/require"

	pb "github.com/pegaflow/pegaflow/engine/api/pegaflowv1"
)

// TestNamespaceIDPinned pins the canonical form of namespaceHash: ids are
// compared across engine restarts, metrics and P/D hosts, so changing the
// encoding (or the Go type it reads) must not change them.
func TestNamespaceIDPinned(t *testing.T) {
	full := &pb.Namespace{Model: "m", ModelRevision: "r1", Dtype: "bfloat16", KvLayout: "flash_attn", BlockSize: 16, TpSize: 2,
		NumLayers: 32, NumKvHeads: 4, HeadSize: 128, HashAlgo: "sha256_cbor", Extra: map[string]string{"b": "2", "a": "1"},
		HashSeedFingerprint: []byte{1, 2, 3}}
	for _, tc := range []struct {
		name        string
		ns          *pb.Namespace
		id, serving string
	}{
		{"every field", full, "ns-c7d46887b0d41f9c479c5bbedfed24db", "ea46c872cb6c4acedc59f858358e69e9"},
		{"minimal", &pb.Namespace{Model: "m", BlockSize: 4, TpSize: 1}, "ns-f8d45877b893ae619dff07efb9157f42", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ns := namespaceFromPB(tc.ns)
			require.Equal(t, tc.id, namespaceID(ns))
			if tc.serving != "" {
				require.Equal(t, tc.serving, servingKey(ns))
			}
		})
	}
}
