package engine

import (
	"slices"
)

// allocAlign keeps every extent aligned for DMA-friendly copies;
// ssdAlign (the SSD tier's O_DIRECT unit) is the alignment of pools whose
// extents are read from and written to SSD in place.
const (
	allocAlign = 256
	ssdAlign   = 4096
)

type extent struct {
	off, size uint64
}

// allocator hands out extents of the pool. Blocks of one namespace all have
// the same size, so freed extents go to exact-size free lists and are reused
// in O(1); the untouched tail of the pool is bump-allocated. Only when both
// miss (mixed sizes) are the free lists coalesced, which is O(n log n) and
// rare. Not safe for concurrent use: the engine's lock guards it.
type allocator struct {
	align    uint64 // a power of two
	capacity uint64
	bump     uint64 // everything at or above bump is free
	free     map[uint64][]uint64
	freeSum  uint64 // bytes in free lists
	used     uint64
}

func newAllocator(capacity uint64) *allocator { return newAlignedAllocator(capacity, allocAlign) }

// newAlignedAllocator hands out extents whose offsets and sizes are
// multiples of align (a power of two).
func newAlignedAllocator(capacity, align uint64) *allocator {
	return &allocator{align: align, capacity: capacity, free: map[uint64][]uint64{}}
}

func alignUp(n uint64) uint64 { return alignTo(n, allocAlign) }

func alignTo(n, align uint64) uint64 { return (n + align - 1) &^ (align - 1) }

// alloc returns an extent of at least size bytes, or false when no
// contiguous space exists.
func (a *allocator) alloc(size uint64) (extent, bool) {
	if size == 0 || size > a.capacity {
		return extent{}, false
	}
	size = alignTo(size, a.align)
	if offs := a.free[size]; len(offs) > 0 {
		off := offs[len(offs)-1]
		a.setFree(size, offs[:len(offs)-1])
		a.freeSum -= size
		a.used += size
		return extent{off, size}, true
	}
	if a.capacity-a.bump >= size {
		e := extent{a.bump, size}
		a.bump += size
		a.used += size
		return e, true
	}
	if a.freeSum+(a.capacity-a.bump) < size {
		return extent{}, false
	}
	a.coalesce()
	return a.carve(size)
}

func (a *allocator) setFree(size uint64, offs []uint64) {
	if len(offs) == 0 {
		delete(a.free, size)
		return
	}
	a.free[size] = offs
}

// release returns an extent obtained from alloc.
func (a *allocator) release(e extent) {
	a.used -= e.size
	if e.off+e.size == a.bump {
		a.bump = e.off
		return
	}
	a.free[e.size] = append(a.free[e.size], e.off)
	a.freeSum += e.size
}

// coalesce merges adjacent free extents (and folds a free run touching the
// bump pointer back into the tail).
func (a *allocator) coalesce() {
	all := make([]extent, 0, len(a.free))
	for size, offs := range a.free {
		for _, off := range offs {
			all = append(all, extent{off, size})
		}
	}
	slices.SortFunc(all, func(x, y extent) int {
		switch {
		case x.off < y.off:
			return -1
		case x.off > y.off:
			return 1
		}
		return 0
	})
	merged := all[:0]
	for _, e := range all {
		if n := len(merged); n > 0 && merged[n-1].off+merged[n-1].size == e.off {
			merged[n-1].size += e.size
			continue
		}
		merged = append(merged, e)
	}
	for n := len(merged); n > 0 && merged[n-1].off+merged[n-1].size == a.bump; n = len(merged) {
		a.bump = merged[n-1].off
		a.freeSum -= merged[n-1].size
		merged = merged[:n-1]
	}
	clear(a.free)
	for _, e := range merged {
		a.free[e.size] = append(a.free[e.size], e.off)
	}
}

// carve takes size bytes from the first free extent (or the tail) that is
// large enough, returning the remainder to the free lists.
func (a *allocator) carve(size uint64) (extent, bool) {
	if a.capacity-a.bump >= size {
		e := extent{a.bump, size}
		a.bump += size
		a.used += size
		return e, true
	}
	for fsize, offs := range a.free {
		if fsize < size {
			continue
		}
		off := offs[len(offs)-1]
		a.setFree(fsize, offs[:len(offs)-1])
		a.freeSum -= fsize
		if rest := fsize - size; rest > 0 {
			a.free[rest] = append(a.free[rest], off+size)
			a.freeSum += rest
		}
		a.used += size
		return extent{off, size}, true
	}
	return extent{}, false
}
