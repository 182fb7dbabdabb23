package engine

import "fmt"

// Hybrid namespaces: a model whose layers form several KV cache groups
// (vLLM's hybrid allocator: full attention beside sliding-window,
// chunked-local or Mamba/linear-attention state layers). Each group keeps
// its own block index, keyed by hash, so (group, hash) keys never collide;
// a block of a group holds that group's layers only, and its share per
// rank is the group's bytes. A Query answers the hybrid boundary: the
// largest k such that every group holds, sealed, what a hit of k blocks
// needs of it (neededFrom), and its lease pins exactly those blocks.

// The group kinds (KVGroup.Kind).
const (
	GroupFull          = "full"
	GroupSlidingWindow = "sliding_window"
	GroupChunkedLocal  = "chunked_local"
	GroupState         = "state"
)

// MaxGroups bounds a namespace's groups and their indices.
const MaxGroups = 64

type groupKind uint8

const (
	kindFull groupKind = iota
	kindSliding
	kindChunked
	kindState
	numKinds
)

var kindNames = [numKinds]string{GroupFull, GroupSlidingWindow, GroupChunkedLocal, GroupState}

func (k groupKind) String() string { return kindNames[k] }

func kindOf(name string) (groupKind, bool) {
	for k, n := range kindNames {
		if n == name {
			return groupKind(k), true
		}
	}
	return 0, false
}

// nsGroup is one KV cache group of a namespace.
type nsGroup struct {
	index uint32
	kind  groupKind
	// window is, in blocks, the sliding window's reach before the
	// boundary (ceil((W-1)/block_size)) or the chunk (C/block_size).
	window uint64
	// rankBytes is one rank's share of a block of this group, fixed by
	// the namespace's first registration (0 before).
	rankBytes uint64
	// blocks is the group's exact index, keyed by hash bytes.
	blocks map[string]*block
}

// initGroups makes the namespace's groups from its descriptor (validated).
func (ns *namespace) initGroups() {
	descs := ns.desc.Groups
	ns.hybrid = len(descs) > 0
	if !ns.hybrid {
		descs = []KVGroup{{Index: 0, Kind: GroupFull}}
	}
	bs := uint64(ns.desc.BlockSize)
	for _, d := range descs {
		kind, _ := kindOf(d.Kind)
		g := &nsGroup{index: d.Index, kind: kind, blocks: map[string]*block{}}
		switch kind {
		case kindSliding:
			g.window = (uint64(d.WindowTokens) - 1 + bs - 1) / bs
		case kindChunked:
			g.window = uint64(d.WindowTokens) / bs
		}
		ns.groups = append(ns.groups, g)
		ns.byIndex[d.Index] = g
	}
}

// group is the namespace's group of that index, nil when it has none.
func (ns *namespace) group(index uint32) *nsGroup {
	if index >= MaxGroups {
		return nil
	}
	return ns.byIndex[index]
}

// registered: a rank registered the namespace's layout, so every group's
// share size is known.
func (ns *namespace) registered() bool { return ns.shape != nil }

// validateGroups checks a namespace's groups (block_size already checked).
func validateGroups(ns *Namespace) error {
	if len(ns.Groups) > MaxGroups {
		return invalid("namespace has %d groups, max %d", len(ns.Groups), MaxGroups)
	}
	var seen uint64
	for i, g := range ns.Groups {
		if g.Index >= MaxGroups {
			return invalid("group %d: index %d, want < %d", i, g.Index, MaxGroups)
		}
		if seen&(1<<g.Index) != 0 {
			return invalid("group %d: index %d listed twice", i, g.Index)
		}
		seen |= 1 << g.Index
		kind, ok := kindOf(g.Kind)
		if !ok {
			return invalid("group %d (index %d): kind %q, want %s, %s, %s or %s", i, g.Index, g.Kind,
				GroupFull, GroupSlidingWindow, GroupChunkedLocal, GroupState)
		}
		switch kind {
		case kindSliding, kindChunked:
			if g.WindowTokens == 0 {
				return invalid("group %d (index %d, %s): window_tokens is 0", i, g.Index, g.Kind)
			}
			if kind == kindChunked && g.WindowTokens%ns.BlockSize != 0 {
				return invalid("group %d (index %d, %s): chunk of %d tokens is not a multiple of block_size %d",
					i, g.Index, g.Kind, g.WindowTokens, ns.BlockSize)
			}
		default:
			if g.WindowTokens != 0 {
				return invalid("group %d (index %d, %s): window_tokens %d, want 0", i, g.Index, g.Kind, g.WindowTokens)
			}
		}
	}
	return nil
}

// neededFrom is where the blocks group g needs for a hit of k blocks
// begin: it needs hashes[lo:k] (an empty range when lo == k). first is
// the request's block index of hashes[0] (QueryRequest.first_block);
// chunks start at absolute block multiples.
func (g *nsGroup) neededFrom(k int, first uint64) int {
	switch g.kind {
	case kindSliding:
		return k - int(min(uint64(k), g.window))
	case kindChunked:
		abs := first + uint64(k)
		start := abs / g.window * g.window
		return int(max(start, first) - first)
	case kindState:
		return max(k-1, 0)
	}
	return 0
}

// Bits of boundaryLocked's per-k verdicts.
const (
	okSealed  = 1 << iota // every group holds its needed blocks sealed
	okPresent             // ... sealed or being saved
)

// boundaryLocked is the hybrid boundary of a Query: the largest k whose
// needed blocks every group holds sealed (hit), and how much further it
// moves once the saves in flight seal (inflight). One pass per group with
// the run of held blocks ending at each position (a needed range [lo, k)
// is held iff that run reaches back k-lo), so the work is
// O(len(hashes) x groups); the full groups go first, and k never goes past
// the largest boundary still possible. Caller holds e.mu.
func (e *Engine) boundaryLocked(ns *namespace, hashes [][]byte, first uint32) (hit, inflight int) {
	ok := make([]uint8, len(hashes)+1)
	for k := range ok {
		ok[k] = okSealed | okPresent
	}
	limit := len(hashes)
	for pass := range 2 {
		for _, g := range ns.groups {
			if (g.kind == kindFull) != (pass == 0) {
				continue
			}
			sealedRun, presentRun := 0, 0
			for k := 1; k <= limit; k++ {
				b := g.blocks[string(hashes[k-1])]
				switch {
				case b != nil && b.sealed:
					sealedRun++
					presentRun++
				case b != nil && (b.saving != 0 || b.saved != 0):
					sealedRun = 0
					presentRun++
				default:
					sealedRun, presentRun = 0, 0
				}
				need := k - g.neededFrom(k, uint64(first))
				if need > sealedRun {
					ok[k] &^= okSealed
				}
				if need > presentRun {
					ok[k] &^= okPresent
				}
			}
			for limit > 0 && ok[limit]&okPresent == 0 {
				limit--
			}
		}
	}
	present := limit
	for hit = present; hit > 0 && ok[hit]&okSealed == 0; hit-- {
	}
	return hit, present - hit
}

// neededLocked calls fn for every block a hit of k blocks needs, by
// group: group g's hashes[lo:k]. Each must be held (boundaryLocked found
// them). Caller holds e.mu.
func (e *Engine) neededLocked(ns *namespace, hashes [][]byte, first uint32, k int, fn func(g *nsGroup, i int, b *block)) {
	for _, g := range ns.groups {
		for i := g.neededFrom(k, uint64(first)); i < k; i++ {
			fn(g, i, g.blocks[string(hashes[i])])
		}
	}
}

// hitLocked is a Query's answer in ns: the hybrid boundary with groups,
// else the sealed prefix as before groups existed.
func (e *Engine) hitLocked(ns *namespace, hashes [][]byte, first uint32) (hit, inflight int) {
	if ns.hybrid {
		return e.boundaryLocked(ns, hashes, first)
	}
	return e.prefixLocked(ns.groups[0], hashes)
}

// leaseBlocksLocked lists (and touches) the blocks a hit of k blocks
// needs: the sealed prefix without groups, every group's needed blocks
// with them. Caller holds e.mu.
func (e *Engine) leaseBlocksLocked(ns *namespace, hashes [][]byte, first uint32, k int) []*block {
	out := make([]*block, 0, k)
	e.neededLocked(ns, hashes, first, k, func(_ *nsGroup, _ int, b *block) {
		e.policy.touch(b)
		out = append(out, b)
	})
	return out
}

// groupErr is the error for a block ref naming a group ns does not have.
func groupErr(ns *namespace, i int, group uint32) error {
	if !ns.hybrid {
		return invalid("block %d: group %d, but namespace %s has no groups (group 0 only)", i, group, ns.id)
	}
	return invalid("block %d: group %d is not a group of namespace %s", i, group, ns.id)
}

// groupLabel names a group in logs and errors.
func (g *nsGroup) String() string { return fmt.Sprintf("%d (%s)", g.index, g.kind) }
