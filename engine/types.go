package engine

import (
	"bytes"
	"maps"
	"slices"

	pb "github.com/pegaflow/pegaflow/engine/api/pegaflowv1"
)

// Namespace describes which KV blocks are interchangeable: the model, its
// KV layout and parallelism, and the hash that names blocks. It is the
// engine's own copy of a pegaflow.v1.Namespace, so the state the engine
// keeps for as long as it runs holds no protobuf message.
type Namespace struct {
	Model, ModelRevision string
	Dtype                string // e.g. "bfloat16"
	KVLayout             string // e.g. "flash_attn", "flashinfer", "mla" (+ "_hnd")
	BlockSize            uint32 // tokens per block
	TPSize               uint32
	NumLayers            uint32
	NumKVHeads           uint32 // per rank
	HeadSize             uint32
	HashAlgo             string // "sha256", "sha256_cbor", "xxhash", ...
	// HashSeedFingerprint is not part of the key: a different one in the
	// same namespace is rejected instead of missing every lookup.
	HashSeedFingerprint []byte
	// Extra holds further compatibility keys; the id sorts them.
	Extra map[string]string
	// Groups are a hybrid model's KV cache groups (hybrid.go); empty for a
	// model with one group, which is then group 0, full attention.
	Groups []KVGroup
}

// KVGroup is one KV cache group of a hybrid namespace (pegaflow.v1.KVGroup).
type KVGroup struct {
	Index        uint32 // vLLM's group index, < MaxGroups
	Kind         string // GroupFull, GroupSlidingWindow, GroupChunkedLocal or GroupState
	WindowTokens uint32 // the window or chunk in tokens; 0 for full and state
}

func (ns *Namespace) clone() *Namespace {
	c := *ns
	c.HashSeedFingerprint = bytes.Clone(ns.HashSeedFingerprint)
	c.Extra = maps.Clone(ns.Extra)
	c.Groups = slices.Clone(ns.Groups)
	return &c
}

// registration is a RegisterRequest in engine terms, validated: the rank
// it registers, its namespace and its memory layout.
type registration struct {
	sessionID  string
	instanceID string
	rank       uint32
	ns         *Namespace
	layout     *rankLayout
	// event is the worker's CUDA IPC event handle (empty: none sent).
	event []byte
	// peer registers: shared-memory files must be its own.
	peer Peer
}

// namespaceFromPB is where a wire namespace becomes an engine one (nil
// stays nil, for validateNamespace to report). The copy shares nothing
// with the message.
func namespaceFromPB(ns *pb.Namespace) *Namespace {
	if ns == nil {
		return nil
	}
	c := &Namespace{
		Model: ns.Model, ModelRevision: ns.ModelRevision, Dtype: ns.Dtype, KVLayout: ns.KvLayout,
		BlockSize: ns.BlockSize, TPSize: ns.TpSize, NumLayers: ns.NumLayers, NumKVHeads: ns.NumKvHeads,
		HeadSize: ns.HeadSize, HashAlgo: ns.HashAlgo, HashSeedFingerprint: ns.HashSeedFingerprint, Extra: ns.Extra,
	}
	for _, g := range ns.Groups {
		if g == nil {
			// validateNamespace refuses it: a kind no group has.
			c.Groups = append(c.Groups, KVGroup{})
			continue
		}
		c.Groups = append(c.Groups, KVGroup{Index: g.Index, Kind: g.Kind, WindowTokens: g.WindowTokens})
	}
	return c.clone()
}
