// Package ssd is the on-disk format and index of the engine's SSD tier:
// fixed-size slots per block size class in one preallocated file per
// class in a directory (one per device), an index (namespace, group,
// hash) -> slot with FIFO eviction per class and space accounting, and
// warm restart from a checkpoint plus the slots written after it.
// docs/ssd.md describes the whole tier this is the bottom of.
//
// The I/O goes through File, so the native layer (io_uring, O_DIRECT,
// registered pool buffers) can replace the plain os.File one.
//
// Files:
//   - doc.go: this index.
//   - format.go: the slot header (layout, encode, bounded decode), keys,
//     checksums, errors.
//   - backend.go: File, the I/O interface, and OpenOSFile, its os.File
//     implementation with preallocation.
//   - store.go: Store: Open, Put, Get, Lookup, Contains, the ring per
//     class, slot states and pins.
//   - checkpoint.go: the checkpoint file (index snapshot + sequence
//     number): writing and bounded reading.
//   - recover.go: rebuilding the index at Open from the checkpoint and a
//     scan, dropping torn and corrupt slots.
package ssd
