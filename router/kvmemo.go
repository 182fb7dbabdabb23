package router

import (
	"bytes"
	"encoding/binary"
	"hash/maphash"
	"sync"
	"unsafe"

	"github.com/pegaflow/pegaflow/internal/vllmhash"
)

// hashMemo remembers vLLM block hashes: (parent hash, block tokens) ->
// hash, for blocks whose extra keys are None (every block but a salted
// first one). With the router's algorithm fixed (one memo per kvHasher),
// those two determine the hash, the seed entering through NONE_HASH, the
// first block's parent.
//
// Never a wrong hash: an entry is used only when its stored parent (all
// 32 bytes) and tokens (all of them) equal the block's; the 64-bit
// maphash key only finds candidates, so a collision costs a recompute,
// never a wrong answer.
//
// Layout: a ring of fixed-size slots, written in batches (one prompt's
// new blocks, in chain order, in consecutive slots), the oldest slot
// overwritten first (FIFO). Only a batch's first entry is indexed by
// key; a walk down a prompt tries the slot after the previous hit first,
// which is where that block's successor was written, so a remembered
// prefix costs a comparison per block and sequential memory reads, not
// a hash and a map probe. A prefix that reaches the oldest half of the
// ring is written anew when hit (kvHasher.blockHashes), so a hot one
// survives.
//
// Memory: fixed at creation (the slots; the index holds at most one key
// per slot). Concurrency: walks share a read lock, inserts take the
// write lock; one of each per request.
type hashMemo struct {
	bs   int // tokens a block
	size int // slots
	seed maphash.Seed

	mu      sync.RWMutex
	parents []byte   // slot i: parents[i*HashLen:]
	hashes  []byte   // slot i: hashes[i*HashLen:]
	tokens  []uint32 // slot i: tokens[i*bs:]
	seq     []uint64 // slot i's insertion number; 0: empty
	// batch[i] is the insertion number of the first slot of slot i's
	// batch: consecutive slots of one batch chain (the later's parent is
	// the earlier's hash), so a walk along them compares tokens only, in
	// bulk (run).
	batch   []uint64
	key     []uint64 // slot i's index key, when head[i]
	head    []bool   // slot i is indexed (the first of its batch)
	index   map[uint64]int
	written uint64 // insertions so far; the next goes to slot written % size
}

// memoSlotOverhead is a slot's bytes besides its hashes and tokens: seq,
// batch, key, head and, at worst, an index entry.
const memoSlotOverhead = 8 + 8 + 8 + 1 + 32

// newHashMemo is a memo of at most maxBytes for blocks of bs tokens, nil
// when that holds too few slots to be of use.
func newHashMemo(bs int, maxBytes uint64) *hashMemo {
	slot := uint64(2*vllmhash.HashLen + 4*bs + memoSlotOverhead)
	size := maxBytes / slot
	if size < 64 {
		return nil
	}
	n := int(size)
	return &hashMemo{bs: bs, size: n, seed: maphash.MakeSeed(),
		parents: make([]byte, n*vllmhash.HashLen), hashes: make([]byte, n*vllmhash.HashLen),
		tokens: make([]uint32, n*bs), seq: make([]uint64, n), batch: make([]uint64, n), key: make([]uint64, n), head: make([]bool, n),
		index: map[uint64]int{}}
}

// keyOf finds a block's candidate slot in the index.
func (m *hashMemo) keyOf(parent []byte, block []uint32) uint64 {
	var h maphash.Hash
	h.SetSeed(m.seed)
	_, _ = h.Write(parent)
	var b [4]byte
	for _, t := range block {
		binary.LittleEndian.PutUint32(b[:], t)
		_, _ = h.Write(b[:])
	}
	return h.Sum64()
}

// holds: slot s is the block (parent, block).
func (m *hashMemo) holds(s int, parent []byte, block []uint32) bool {
	if m.seq[s] == 0 || !bytes.Equal(m.parents[s*vllmhash.HashLen:(s+1)*vllmhash.HashLen], parent) {
		return false
	}
	return m.holdsTokens(s, block)
}

func (m *hashMemo) holdsTokens(s int, block []uint32) bool {
	stored := m.tokens[s*m.bs : (s+1)*m.bs]
	stored = stored[:len(block)]
	for i, t := range block {
		if stored[i] != t {
			return false
		}
	}
	return true
}

// walk copies into out the hashes of the leading blocks of tokens (full
// blocks, chained from parent) that the memo holds, and returns how many;
// stale: one of them is in the ring's oldest half.
func (m *hashMemo) walk(parent []byte, tokens []uint32, out [][]byte) (hits int, stale bool) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	n := len(tokens) / m.bs
	prev := -1
	for i := 0; i < n; {
		block := tokens[i*m.bs : (i+1)*m.bs]
		if prev >= 0 {
			next := prev + 1
			if next == m.size {
				next = 0
			}
			if k := m.run(prev, next, tokens[i*m.bs:n*m.bs]); k > 0 {
				for j := range k {
					copy(out[i+j], m.hashes[(next+j)*vllmhash.HashLen:(next+j+1)*vllmhash.HashLen])
				}
				i += k
				prev = next + k - 1
				parent = out[i-1]
				continue
			}
			if m.holds(next, parent, block) {
				m.take(out[i], next, prev, &stale)
				parent, prev = out[i], next
				i++
				continue
			}
		}
		c, ok := m.index[m.keyOf(parent, block)]
		if !ok || !m.holds(c, parent, block) {
			return i, stale
		}
		m.take(out[i], c, prev, &stale)
		parent, prev = out[i], c
		i++
	}
	return n, stale
}

// take copies slot s's hash into h; a slot that starts another batch
// than prev's (the oldest of its batch on this walk) may be stale.
func (m *hashMemo) take(h []byte, s, prev int, stale *bool) {
	copy(h, m.hashes[s*vllmhash.HashLen:(s+1)*vllmhash.HashLen])
	if prev < 0 || m.batch[s] != m.batch[prev] {
		*stale = *stale || m.written-m.seq[s] >= uint64(m.size/2)
	}
}

// run is how many of the blocks of tokens (whole blocks) continue prev's
// batch from slot next on, in order and without wrapping the ring: their
// parents are implied (each is its predecessor's hash), so one bulk
// comparison of the tokens checks them all. 0 when next does not
// continue prev's batch or its first block differs.
func (m *hashMemo) run(prev, next int, tokens []uint32) int {
	k := min(len(tokens)/m.bs, m.size-next)
	b, q := m.batch[prev], m.seq[prev]
	for j := range k {
		if m.batch[next+j] != b || m.seq[next+j] != q+uint64(j)+1 {
			k = j
			break
		}
	}
	for k > 0 && !bytes.Equal(u32bytes(m.tokens[next*m.bs:(next+k)*m.bs]), u32bytes(tokens[:k*m.bs])) {
		// A block differs: the longest equal run, halving (the common
		// case, a follow-up's whole prefix, never gets here).
		k /= 2
	}
	return k
}

// u32bytes views tokens as their bytes, read-only, without a copy.
func u32bytes(tokens []uint32) []byte {
	if len(tokens) == 0 {
		return nil
	}
	return unsafe.Slice((*byte)(unsafe.Pointer(&tokens[0])), 4*len(tokens))
}

// insert writes the blocks of tokens, chained from parent, with their
// hashes, as one batch in consecutive slots: at most half the ring, the
// leading blocks (the prefix others share) kept.
func (m *hashMemo) insert(parent []byte, tokens []uint32, hashes [][]byte) {
	n := min(len(hashes), m.size/2)
	m.mu.Lock()
	defer m.mu.Unlock()
	batch := m.written + 1
	for i := range n {
		s := int(m.written % uint64(m.size))
		if m.head[s] {
			if m.index[m.key[s]] == s {
				delete(m.index, m.key[s])
			}
			m.head[s] = false
		}
		block := tokens[i*m.bs : (i+1)*m.bs]
		copy(m.parents[s*vllmhash.HashLen:], parent)
		copy(m.hashes[s*vllmhash.HashLen:], hashes[i])
		copy(m.tokens[s*m.bs:], block)
		m.written++
		m.seq[s], m.batch[s] = m.written, batch
		if i == 0 {
			k := m.keyOf(parent, block)
			m.index[k], m.key[s], m.head[s] = s, k, true
		}
		parent = hashes[i]
	}
}
