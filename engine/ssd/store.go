package ssd

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
)

// Class is one block size class: a file of Slots slots, each holding a
// payload of up to MaxPayload bytes.
type Class struct {
	MaxPayload uint64
	Slots      int
}

// DefaultWindow is Config.Window's default.
const DefaultWindow = 256

// Config configures a Store on one directory (one device).
type Config struct {
	// Dir is created 0700 if absent; the slot files and the checkpoint
	// in it are 0600.
	Dir string
	// Classes in ascending MaxPayload; a payload goes to the smallest
	// class that holds it. Changing them is a cold start for the changed
	// class files (their checkpoint is ignored, their slots rescanned).
	Classes []Class
	// Window bounds the writes in flight per class (default
	// DefaultWindow): Put
	// refuses past it, and recovery after a checkpoint scans on until it
	// has seen Window slots in a row that are older than the checkpoint.
	Window int
	// Open opens the slot files (default OpenOSFile).
	Open   Opener
	Logger *slog.Logger
}

// Stats is the store's space accounting and counters.
type Stats struct {
	Slots, Live         int
	CapacityBytes       uint64 // all slots, headers included
	UsedBytes           uint64 // live payload bytes
	Evicted, Refused    uint64
	Corrupt, IOErrors   uint64
	RecoveredFromCkpt   int // entries taken from the checkpoint
	RecoveredByScan     int // entries found by scanning slot headers
	RecoveryDroppedSlot int // slots dropped as torn or corrupt at Open
}

type slotState uint8

const (
	slotFree slotState = iota
	slotWriting
	slotLive
)

// slot is the in-memory state of one slot; hdr is its header when
// writing or live.
type slot struct {
	state slotState
	pins  int32 // reads in flight: the slot may not be reused
	hdr   *Header
}

type class struct {
	Class
	slotSize uint64
	file     File
	slots    []slot
	// cursor is the next slot to write: each class is a ring written in
	// order (FIFO eviction), which is what lets recovery scan only the
	// slots after the checkpoint's cursor.
	cursor   int
	inflight int
}

func (c *class) offset(i int) int64 { return int64(uint64(i) * c.slotSize) }

type loc struct{ class, slot int }

// Store is the SSD tier of one directory: slot files per class, an index
// (namespace, group, hash) -> slot, FIFO eviction per class.
//
// Concurrency: every method is safe for concurrent use. mu guards the
// index and the slot states, never I/O: a slot being written is out of
// the index's reach (slotWriting), a slot being read is pinned, so the
// I/O runs unlocked on slots no one else touches.
type Store struct {
	cfg     Config
	log     *slog.Logger
	mu      sync.Mutex
	closed  bool
	classes []*class
	index   map[Key]loc
	seq     uint64 // last sequence number handed out
	stats   Stats
}

// Open opens (or creates) the store in cfg.Dir and rebuilds its index
// from the checkpoint and the slots written after it, or from a scan of
// every slot header when there is no usable checkpoint.
func Open(ctx context.Context, cfg Config) (*Store, error) {
	if cfg.Window <= 0 {
		cfg.Window = DefaultWindow
	}
	if cfg.Open == nil {
		cfg.Open = OpenOSFile
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if len(cfg.Classes) == 0 {
		return nil, fmt.Errorf("%w: no size classes", ErrInvalid)
	}
	for i, c := range cfg.Classes {
		if c.MaxPayload == 0 || c.Slots <= 0 || (i > 0 && c.MaxPayload <= cfg.Classes[i-1].MaxPayload) {
			return nil, fmt.Errorf("%w: class %d (%d bytes x %d): want ascending sizes and slots > 0", ErrInvalid, i, c.MaxPayload, c.Slots)
		}
	}
	if err := os.MkdirAll(cfg.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("ssd dir: %w", err)
	}
	s := &Store{cfg: cfg, log: cfg.Logger, index: map[Key]loc{}}
	for _, cc := range cfg.Classes {
		c := &class{Class: cc, slotSize: HeaderSize + alignUp(cc.MaxPayload), slots: make([]slot, cc.Slots)}
		f, err := cfg.Open(filepath.Join(cfg.Dir, c.fileName()), int64(c.slotSize)*int64(cc.Slots))
		if err != nil {
			s.closeFiles()
			return nil, err
		}
		c.file = f
		s.classes = append(s.classes, c)
		s.stats.Slots += cc.Slots
		s.stats.CapacityBytes += c.slotSize * uint64(cc.Slots)
	}
	if err := s.recover(ctx); err != nil {
		s.closeFiles()
		return nil, err
	}
	return s, nil
}

func (c *class) fileName() string { return fmt.Sprintf("slots-%d.pgf", c.MaxPayload) }

// Abandon closes the files with no checkpoint and no sync: what a crash
// (kill -9) leaves behind, for tests of warm restart. The store is
// unusable after.
func (s *Store) Abandon() {
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
	s.closeFiles()
}

func (s *Store) closeFiles() {
	for _, c := range s.classes {
		_ = c.file.Close()
	}
}

// Close writes a checkpoint (so the next Open scans nothing) and closes
// the files. Writes and reads still in flight finish against closed
// files and fail; callers stop issuing them first.
func (s *Store) Close(ctx context.Context) error {
	err := s.Checkpoint(ctx)
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
	s.closeFiles()
	return err
}

// Stats returns a copy of the accounting.
func (s *Store) Stats() Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.stats
	st.Live = len(s.index)
	return st
}

// Contains says whether key is on the device (live or being written):
// the spill path skips such blocks.
func (s *Store) Contains(key Key) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, ok := s.index[key]
	return ok
}

// Put writes payload (the block's shares, concatenated in rank order,
// shares[i] bytes each) under key: Reserve, the payload written through
// the class's File, Commit. A key already present is left as it is
// (blocks are content-addressed: same key, same bytes).
func (s *Store) Put(ctx context.Context, key Key, shares []uint64, payload []byte) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("ssd put: %w", err)
	}
	r, err := s.Reserve(key, shares)
	if errors.Is(err, ErrExists) {
		return nil
	}
	if err != nil {
		return err
	}
	if uint64(len(payload)) != r.hdr.PayloadLen {
		s.Commit(r, 0, fmt.Errorf("%w: shares sum to %d, payload is %d bytes", ErrInvalid, r.hdr.PayloadLen, len(payload)))
		return fmt.Errorf("%w: shares sum to %d, payload is %d bytes", ErrInvalid, r.hdr.PayloadLen, len(payload))
	}
	var werr error
	if len(payload) > 0 {
		_, werr = s.classes[r.Class].file.WriteAt(payload, r.PayloadOffset)
	}
	return s.Commit(r, Checksum(payload), werr)
}

// Reservation is a slot taken by Reserve for one write: the caller writes
// the payload (PayloadLen bytes) at PayloadOffset of class Class's file
// (Files), then calls Commit exactly once.
type Reservation struct {
	Class         int
	PayloadOffset int64
	PayloadLen    uint64
	slot          int
	hdr           *Header
}

// Reserve takes the slot at its class's ring cursor for key, evicting
// the block in it (FIFO). It never blocks on other writes: with the
// cursor slot busy (pinned by a read, or Window writes in flight) it
// returns ErrFull; with key present, ErrExists. Until Commit the key is
// in the index as being written: Contains says true, Acquire not found.
func (s *Store) Reserve(key Key, shares []uint64) (*Reservation, error) {
	if err := key.validate(); err != nil {
		return nil, err
	}
	if len(shares) == 0 || len(shares) > MaxShares {
		return nil, fmt.Errorf("%w: %d shares, want 1..%d", ErrInvalid, len(shares), MaxShares)
	}
	var sum uint64
	for _, n := range shares {
		if n > 1<<40 {
			return nil, fmt.Errorf("%w: share of %d bytes", ErrInvalid, n)
		}
		sum += n
	}
	ci := s.classFor(sum)
	if ci < 0 {
		return nil, fmt.Errorf("%w (%w): payload of %d bytes", ErrInvalid, ErrTooLarge, sum)
	}
	h := &Header{Key: key, Shares: append([]uint64(nil), shares...), PayloadLen: sum}
	c := s.classes[ci]

	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, ErrClosed
	}
	if _, ok := s.index[key]; ok {
		return nil, ErrExists
	}
	i := c.cursor
	sl := &c.slots[i]
	if sl.state == slotWriting || sl.pins > 0 || c.inflight >= s.cfg.Window {
		s.stats.Refused++
		return nil, fmt.Errorf("%w: class %d bytes, slot %d busy", ErrFull, c.MaxPayload, i)
	}
	if sl.state == slotLive {
		s.dropLocked(sl)
		s.stats.Evicted++
	}
	s.seq++
	h.Seq = s.seq
	sl.state, sl.hdr = slotWriting, h
	s.index[key] = loc{ci, i}
	c.cursor = (i + 1) % len(c.slots)
	c.inflight++
	return &Reservation{Class: ci, PayloadOffset: c.offset(i) + HeaderSize, PayloadLen: sum, slot: i, hdr: h}, nil
}

// Commit ends a Reservation. With ioErr nil the payload is in place and
// crc is its checksum: the header is written after it (a crash between
// leaves the slot's old header over new bytes, which its payload
// checksum rejects) and the block is live. With ioErr set, or when the
// header write fails, the slot is freed and the error counted.
func (s *Store) Commit(r *Reservation, crc uint32, ioErr error) error {
	c := s.classes[r.Class]
	err := ioErr
	if err == nil {
		r.hdr.PayloadCRC = crc
		buf := make([]byte, HeaderSize)
		encodeHeader(buf, r.hdr)
		_, err = c.file.WriteAt(buf, c.offset(r.slot))
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	c.inflight--
	sl := &c.slots[r.slot]
	if err != nil {
		delete(s.index, r.hdr.Key)
		sl.state, sl.hdr = slotFree, nil
		if !errors.Is(err, ErrInvalid) {
			s.stats.IOErrors++
		}
		return fmt.Errorf("ssd write %s slot %d: %w", c.fileName(), r.slot, err)
	}
	sl.state = slotLive
	s.stats.UsedBytes += r.hdr.PayloadLen
	return nil
}

// Fits says whether a payload of n bytes has a class.
func (s *Store) Fits(n uint64) bool { return s.classFor(n) >= 0 }

func (s *Store) classFor(n uint64) int {
	for i, c := range s.classes {
		if n <= c.MaxPayload {
			return i
		}
	}
	return -1
}

// dropLocked takes a live slot out of the index.
func (s *Store) dropLocked(sl *slot) {
	delete(s.index, sl.hdr.Key)
	s.stats.UsedBytes -= sl.hdr.PayloadLen
	sl.state, sl.hdr = slotFree, nil
}

// Lookup returns the header of a live key (to size the read buffer).
// Headers are shared and immutable: callers must not modify them.
func (s *Store) Lookup(key Key) (*Header, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	l, ok := s.index[key]
	if !ok {
		return nil, false
	}
	sl := &s.classes[l.class].slots[l.slot]
	if sl.state != slotLive {
		return nil, false
	}
	return sl.hdr, true
}

// Get reads key's payload into dst (at least its PayloadLen bytes) and
// returns its header: Acquire, the payload read through the class's
// File, Finish. The payload is verified against its checksum on every
// read; a slot that fails is dropped from the index (ErrCorrupt), never
// served.
func (s *Store) Get(ctx context.Context, key Key, dst []byte) (*Header, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("ssd get: %w", err)
	}
	r, err := s.Acquire(key)
	if err != nil {
		return nil, err
	}
	if uint64(len(dst)) < r.Header.PayloadLen {
		s.Finish(r, r.Header.PayloadCRC, nil)
		return nil, fmt.Errorf("%w: buffer of %d bytes for a payload of %d", ErrInvalid, len(dst), r.Header.PayloadLen)
	}
	p := dst[:r.Header.PayloadLen]
	var rerr error
	if len(p) > 0 {
		_, rerr = s.classes[r.Class].file.ReadAt(p, r.PayloadOffset)
	}
	if err := s.Finish(r, Checksum(p), rerr); err != nil {
		return nil, err
	}
	return r.Header, nil
}

// Read is a live slot pinned by Acquire for one read: the caller reads
// Header.PayloadLen bytes at PayloadOffset of class Class's file, then
// calls Finish exactly once. Header is shared and immutable.
type Read struct {
	Class         int
	PayloadOffset int64
	Header        *Header
	slot          int
}

// Acquire pins key's live slot for a read (the ring will not reuse it
// until Finish); ErrNotFound when key is absent or still being written.
func (s *Store) Acquire(key Key) (*Read, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, ErrClosed
	}
	l, ok := s.index[key]
	if !ok {
		return nil, ErrNotFound
	}
	c := s.classes[l.class]
	sl := &c.slots[l.slot]
	if sl.state != slotLive {
		return nil, ErrNotFound
	}
	sl.pins++
	return &Read{Class: l.class, PayloadOffset: c.offset(l.slot) + HeaderSize, Header: sl.hdr, slot: l.slot}, nil
}

// Finish ends a Read: crc is the checksum of the payload bytes read (or
// ioErr the read's failure). A mismatch is ErrCorrupt; either failure
// drops the slot from the index, so it is never served again.
func (s *Store) Finish(r *Read, crc uint32, ioErr error) error {
	err := ioErr
	if err == nil && crc != r.Header.PayloadCRC {
		err = fmt.Errorf("%w: payload checksum %08x, want %08x", ErrCorrupt, crc, r.Header.PayloadCRC)
	}
	c := s.classes[r.Class]
	s.mu.Lock()
	defer s.mu.Unlock()
	sl := &c.slots[r.slot]
	sl.pins--
	if err == nil {
		return nil
	}
	if errors.Is(err, ErrCorrupt) {
		s.stats.Corrupt++
	} else {
		s.stats.IOErrors++
	}
	// Pinned, the slot cannot have been reused, but an error of another
	// read of it may have dropped it already.
	if sl.state == slotLive && sl.hdr == r.Header {
		s.dropLocked(sl)
	}
	return fmt.Errorf("ssd read %s slot %d: %w", c.fileName(), r.slot, err)
}

// Files lists the class files, by class index, with their sizes: what
// a native I/O layer opens to move payloads (Reservation, Read).
func (s *Store) Files() []FileInfo {
	out := make([]FileInfo, len(s.classes))
	for i, c := range s.classes {
		out[i] = FileInfo{Path: filepath.Join(s.cfg.Dir, c.fileName()), Size: c.slotSize * uint64(len(c.slots)), MaxPayload: c.MaxPayload}
	}
	return out
}

// FileInfo is one class file.
type FileInfo struct {
	Path             string
	Size, MaxPayload uint64
}

// readSlot reads and verifies slot i of c: header into a page of its
// own, payload straight into dst.
func readSlot(c *class, i int, dst []byte) (*Header, error) {
	buf := make([]byte, HeaderSize)
	if _, err := c.file.ReadAt(buf, c.offset(i)); err != nil {
		return nil, err
	}
	h, err := decodeHeader(buf, c.MaxPayload)
	if err != nil {
		return nil, err
	}
	if uint64(len(dst)) < h.PayloadLen {
		return nil, fmt.Errorf("%w: buffer of %d bytes for a payload of %d", ErrInvalid, len(dst), h.PayloadLen)
	}
	p := dst[:h.PayloadLen]
	if len(p) > 0 {
		if _, err := c.file.ReadAt(p, c.offset(i)+HeaderSize); err != nil {
			return nil, err
		}
	}
	if got := Checksum(p); got != h.PayloadCRC {
		return nil, fmt.Errorf("%w: payload checksum %08x, want %08x", ErrCorrupt, got, h.PayloadCRC)
	}
	return h, nil
}
