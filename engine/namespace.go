package engine

import (
	"bytes"
	"cmp"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"slices"

	pb "github.com/pegaflow/pegaflow/engine/api/pegaflowv1"
)

// namespace groups the blocks that are compatible with each other.
type namespace struct {
	id   string
	idx  uint32 // dense index, part of block keys
	desc *Namespace
	// serving is servingKey(desc): namespaces that differ only in TP size
	// or block size share it.
	serving string
	// allRanks has one bit per TP rank: a block is sealed when its saved
	// mask equals it.
	allRanks    uint64
	fingerprint []byte
	// Fixed by the first registration; later ones must match. shape and
	// layerGroup are per layer (segment lengths, group index).
	shape      [][]uint64
	layerGroup []uint32
	// segOffset[layer][segment] is the segment's offset inside a rank's
	// share of a block of the layer's group.
	segOffset [][]uint64
	// groups are the KV cache groups in the namespace's order (one, index
	// 0, full, without Namespace.Groups); byIndex finds them by index.
	// Each holds its own exact block index, so (group, hash) keys never
	// collide and group 0's is keyed by the hash alone, as before groups.
	groups  []*nsGroup
	byIndex [MaxGroups]*nsGroup
	// hybrid: the namespace lists groups; Query answers the hybrid
	// boundary (hybrid.go) instead of the sealed prefix.
	hybrid bool
	// feed is the namespace's block events for BlockEvents (events.go).
	feed blockFeed
}

// namespaceID derives the id from every compatibility field except the
// hash-seed fingerprint, which is checked separately so that a mismatch is
// reported instead of silently creating a disjoint namespace.
func namespaceID(ns *Namespace) string { return "ns-" + namespaceHash(ns, true) }

// servingKey is namespaceID without the fields a deployment chooses rather
// than the model dictates: TP size, block size and the per-rank KV head
// count (which follows TP). Two live namespaces with the same servingKey
// are the same model served with different parallelism: a P and a D that
// can never share a block, which registration reports instead of letting
// every lookup miss.
func servingKey(ns *Namespace) string { return namespaceHash(ns, false) }

func namespaceHash(ns *Namespace, parallelism bool) string {
	h := sha256.New()
	str := func(s string) {
		_ = binary.Write(h, binary.LittleEndian, uint32(len(s)))
		h.Write([]byte(s))
	}
	num := func(n uint32) { _ = binary.Write(h, binary.LittleEndian, n) }
	if parallelism {
		str("pegaflow-ns-v1")
	} else {
		str("pegaflow-serving-v1")
	}
	str(ns.Model)
	str(ns.ModelRevision)
	str(ns.Dtype)
	str(ns.KVLayout)
	if parallelism {
		num(ns.BlockSize)
		num(ns.TPSize)
	}
	num(ns.NumLayers)
	if parallelism {
		num(ns.NumKVHeads)
	}
	num(ns.HeadSize)
	str(ns.HashAlgo)
	keys := make([]string, 0, len(ns.Extra))
	for k := range ns.Extra {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		str(k)
		str(ns.Extra[k])
	}
	// Only when set, so namespaces without groups keep their ids.
	if len(ns.Groups) > 0 {
		str("groups")
		groups := slices.Clone(ns.Groups)
		slices.SortFunc(groups, func(a, b KVGroup) int { return cmp.Compare(a.Index, b.Index) })
		for _, g := range groups {
			num(g.Index)
			str(g.Kind)
			num(g.WindowTokens)
		}
	}
	return hex.EncodeToString(h.Sum(nil)[:16])
}

// openNamespaceLocked finds or creates the namespace for desc and checks its
// hash-seed fingerprint. Caller holds e.mu and validated desc.
func (e *Engine) openNamespaceLocked(desc *Namespace) (*namespace, error) {
	id := namespaceID(desc)
	ns, ok := e.namespaces[id]
	if !ok {
		ns = &namespace{
			id:          id,
			idx:         uint32(len(e.namespaces)),
			desc:        desc.clone(),
			serving:     servingKey(desc),
			allRanks:    rankMask(desc.TPSize),
			fingerprint: bytes.Clone(desc.HashSeedFingerprint),
		}
		ns.initGroups()
		e.namespaces[id] = ns
		e.log.Info("namespace created", "namespace", id, "model", desc.Model, "tp", desc.TPSize, "block_size", desc.BlockSize)
		return ns, nil
	}
	if len(desc.HashSeedFingerprint) > 0 {
		if len(ns.fingerprint) == 0 {
			ns.fingerprint = bytes.Clone(desc.HashSeedFingerprint)
		} else if !bytes.Equal(ns.fingerprint, desc.HashSeedFingerprint) {
			return nil, fmt.Errorf("%w: hash seed mismatch in namespace %s (model %s): fingerprint %x, namespace has %x; "+
				"P and D must share PYTHONHASHSEED and hash algorithm", ErrPrecondition, id, desc.Model,
				desc.HashSeedFingerprint, ns.fingerprint)
		}
	}
	return ns, nil
}

func rankMask(tp uint32) uint64 {
	if tp >= 64 {
		return ^uint64(0)
	}
	return 1<<tp - 1
}

// adoptShape fixes the namespace's block shape (each layer's segment
// lengths and group) on first registration, and so each group's share of
// a block, and checks later registrations against it.
func (ns *namespace) adoptShape(l *rankLayout) error {
	shape := l.blockShape()
	if ns.shape == nil {
		ns.shape = shape
		ns.layerGroup = make([]uint32, len(l.layers))
		ns.segOffset = make([][]uint64, len(shape))
		offs := map[uint32]uint64{}
		for i, segs := range shape {
			g := l.layers[i].group
			ns.layerGroup[i] = g
			for _, n := range segs {
				ns.segOffset[i] = append(ns.segOffset[i], offs[g])
				offs[g] += n
			}
		}
		for _, g := range ns.groups {
			g.rankBytes = offs[g.index]
		}
		return nil
	}
	if len(shape) != len(ns.shape) {
		return fmt.Errorf("%w: layout mismatch in namespace %s: %d layers, namespace has %d", ErrPrecondition, ns.id, len(shape), len(ns.shape))
	}
	for i := range shape {
		if g := l.layers[i].group; g != ns.layerGroup[i] {
			return fmt.Errorf("%w: layout mismatch in namespace %s: layer %d is in group %d, namespace has it in group %d",
				ErrPrecondition, ns.id, i, g, ns.layerGroup[i])
		}
		if !slices.Equal(shape[i], ns.shape[i]) {
			return fmt.Errorf("%w: layout mismatch in namespace %s: layer %d segments %v bytes, namespace has %v",
				ErrPrecondition, ns.id, i, shape[i], ns.shape[i])
		}
	}
	return nil
}

// OpenNamespace resolves a namespace descriptor to its id, creating it.
func (e *Engine) OpenNamespace(sessionID string, wire *pb.Namespace) (string, error) {
	desc := namespaceFromPB(wire)
	if err := validateNamespace(desc); err != nil {
		return "", err
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if err := e.checkOpen(); err != nil {
		return "", err
	}
	s, err := e.sessionLocked(sessionID)
	if err != nil {
		return "", err
	}
	if err := e.checkOpenParallelismLocked(desc); err != nil {
		return "", err
	}
	ns, err := e.openNamespaceLocked(desc)
	if err != nil {
		return "", err
	}
	s.opened[ns] = struct{}{}
	return ns.id, nil
}
