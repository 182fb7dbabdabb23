package ssd

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"

	"github.com/stretchr/testify/require"
)

var testClasses = []Class{{MaxPayload: 1000, Slots: 64}, {MaxPayload: 9000, Slots: 32}}

type block struct {
	key     Key
	shares  []uint64
	payload []byte
}

// blocks makes n blocks of both classes with random bytes and 1-4 shares.
func blocks(seed uint64, n int) []block {
	r := rand.New(rand.NewPCG(seed, 1))
	out := make([]block, n)
	for i := range out {
		size := 1 + r.IntN(1000)
		if i%3 == 0 {
			size = 1001 + r.IntN(8000)
		}
		nShares := 1 + r.IntN(4)
		b := block{key: Key{Namespace: "ns-test", Group: uint32(i % 3), Hash: fmt.Sprintf("hash-%d-%d", seed, i)}, payload: make([]byte, size)}
		for j := range b.payload {
			b.payload[j] = byte(r.Uint32())
		}
		left := uint64(size)
		for j := range nShares - 1 {
			n := left / uint64(nShares-j)
			b.shares = append(b.shares, n)
			left -= n
		}
		out[i] = block{key: b.key, payload: b.payload, shares: append(b.shares, left)}
	}
	return out
}

// smallBlocks are those of blocks(seed, n) that fit the 1000-byte class.
func smallBlocks(seed uint64, n int) []block {
	var out []block
	for _, b := range blocks(seed, n) {
		if len(b.payload) <= 1000 {
			out = append(out, b)
		}
	}
	return out
}

func open(t testing.TB, cfg Config) *Store {
	t.Helper()
	s, err := Open(context.Background(), cfg)
	require.NoError(t, err)
	// No Close: a test that wants a clean stop closes itself; the others
	// simulate kill -9 (the files are closed, nothing is flushed or
	// checkpointed).
	t.Cleanup(func() { s.closeFiles() })
	return s
}

func put(t testing.TB, s *Store, bs []block) {
	t.Helper()
	for _, b := range bs {
		require.NoError(t, s.Put(context.Background(), b.key, b.shares, b.payload))
	}
}

func requireBack(t *testing.T, s *Store, bs []block) {
	t.Helper()
	for _, b := range bs {
		dst := make([]byte, 9000)
		h, err := s.Get(context.Background(), b.key, dst)
		require.NoError(t, err, b.key)
		require.Equal(t, b.payload, dst[:h.PayloadLen])
		require.Equal(t, b.shares, h.Shares)
		require.Equal(t, b.key, h.Key)
	}
}

// The blocks come back byte-exact after a kill -9 (no Close), with and
// without a checkpoint before or amid the writes, and after a clean stop.
func TestReopenBringsBlocksBack(t *testing.T) {
	for _, tc := range []struct {
		name       string
		checkpoint int // after this many puts; -1: none
		clean      bool
	}{
		{"kill9-no-checkpoint", -1, false},
		{"kill9-checkpoint-before", 0, false},
		{"kill9-checkpoint-amid", 40, false},
		{"kill9-checkpoint-after", 90, false},
		{"clean-close", -1, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := Config{Dir: t.TempDir(), Classes: testClasses, Window: 4}
			s := open(t, cfg)
			bs := blocks(1, 90)
			for i, b := range bs {
				if i == tc.checkpoint {
					require.NoError(t, s.Checkpoint(context.Background()))
				}
				put(t, s, []block{b})
			}
			if tc.checkpoint == len(bs) {
				require.NoError(t, s.Checkpoint(context.Background()))
			}
			if tc.clean {
				require.NoError(t, s.Close(context.Background()))
			}
			s2 := open(t, cfg)
			requireBack(t, s2, bs)
			st := s2.Stats()
			require.Equal(t, 90, st.Live)
			require.Zero(t, st.RecoveryDroppedSlot)
			if tc.checkpoint > 0 || tc.clean {
				require.Positive(t, st.RecoveredFromCkpt, "the checkpoint spared the scan")
			}
			// Written after the reopen, then reopened again: the ring
			// went on where it stood, nothing older was overwritten.
			more := blocks(2, 5)
			put(t, s2, more)
			s3 := open(t, cfg)
			requireBack(t, s3, append(bs, more...))
		})
	}
}

// A ring that wrapped (more puts than slots) keeps its newest blocks and
// evicts the oldest, FIFO, before and after a reopen with a checkpoint
// taken before the wrap.
func TestRingEvictsOldestAndRecoversAfterWrap(t *testing.T) {
	cfg := Config{Dir: t.TempDir(), Classes: []Class{{MaxPayload: 1000, Slots: 16}}, Window: 2}
	s := open(t, cfg)
	bs := smallBlocks(3, 200)
	put(t, s, bs[:5])
	require.NoError(t, s.Checkpoint(context.Background()))
	put(t, s, bs[5:])
	newest := bs[len(bs)-16:]
	requireBack(t, s, newest)
	_, err := s.Get(context.Background(), bs[0].key, make([]byte, 1000))
	require.ErrorIs(t, err, ErrNotFound)
	require.Equal(t, uint64(len(bs)-16), s.Stats().Evicted)

	s2 := open(t, cfg)
	requireBack(t, s2, newest)
	require.Equal(t, 16, s2.Stats().Live)
}

// corrupt writes p at off of the class file of maxPayload.
func corrupt(t *testing.T, dir string, maxPayload uint64, off int64, p []byte) {
	t.Helper()
	f, err := os.OpenFile(filepath.Join(dir, fmt.Sprintf("slots-%d.pgf", maxPayload)), os.O_RDWR, 0)
	require.NoError(t, err)
	_, err = f.WriteAt(p, off)
	require.NoError(t, err)
	require.NoError(t, f.Close())
}

func flipByte(t *testing.T, dir string, maxPayload uint64, off int64) {
	t.Helper()
	f, err := os.OpenFile(filepath.Join(dir, fmt.Sprintf("slots-%d.pgf", maxPayload)), os.O_RDWR, 0)
	require.NoError(t, err)
	b := []byte{0}
	_, err = f.ReadAt(b, off)
	require.NoError(t, err)
	b[0] ^= 0x40
	_, err = f.WriteAt(b, off)
	require.NoError(t, err)
	require.NoError(t, f.Close())
}

// A torn header and a flipped payload byte are found and dropped, never
// served: at recovery, and (the payload) on a Get of a running store.
func TestTornAndCorruptSlotsAreDropped(t *testing.T) {
	const slotSize = HeaderSize + 4096 // class 1000
	for _, tc := range []struct {
		name      string
		reopen    bool
		checkpt   bool
		wantFound int
	}{
		{"at-recovery-scan", true, false, 8},
		{"at-recovery-after-checkpoint", true, true, 8},
		{"on-get", false, false, 8},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := Config{Dir: t.TempDir(), Classes: testClasses, Window: 64}
			s := open(t, cfg)
			bs := smallBlocks(4, 15)[:10]
			if tc.checkpt {
				require.NoError(t, s.Checkpoint(context.Background()))
			}
			put(t, s, bs)
			// Slot 3: a write torn inside its header page (the tail of
			// the page, where the header checksum lives, is garbage).
			corrupt(t, cfg.Dir, 1000, 3*slotSize+HeaderSize-512, make([]byte, 512))
			// Slot 5: one payload bit flipped.
			flipByte(t, cfg.Dir, 1000, 5*slotSize+HeaderSize+int64(len(bs[5].payload)/2))
			if tc.reopen {
				s = open(t, cfg)
				require.Equal(t, 2, s.Stats().RecoveryDroppedSlot)
			} else {
				// A live slot is served from its in-memory header, checked
				// against the payload's checksum: the flipped bit is caught;
				// the torn header page (payload intact) is caught at the
				// next Open.
				_, err := s.Get(context.Background(), bs[5].key, make([]byte, 1000))
				require.ErrorIs(t, err, ErrCorrupt)
				require.Equal(t, uint64(1), s.Stats().Corrupt)
				got := make([]byte, 1000)
				h, err := s.Get(context.Background(), bs[3].key, got)
				require.NoError(t, err)
				require.Equal(t, bs[3].payload, got[:h.PayloadLen])
				s = open(t, cfg)
				require.Equal(t, 2, s.Stats().RecoveryDroppedSlot, "both, the flipped one among the newest")
			}
			for _, i := range []int{3, 5} {
				_, err := s.Get(context.Background(), bs[i].key, make([]byte, 1000))
				require.ErrorIs(t, err, ErrNotFound, "a dropped slot is never served")
			}
			var rest []block
			for i, b := range bs {
				if i != 3 && i != 5 {
					rest = append(rest, b)
				}
			}
			requireBack(t, s, rest)
			require.Equal(t, tc.wantFound, s.Stats().Live)
		})
	}
}

// faultFile injects errors and stalls into a File.
type faultFile struct {
	File
	mu        sync.Mutex
	writeErr  error
	readGate  chan struct{} // a ReadAt waits on it when set
	readEnter chan struct{}
}

func (f *faultFile) WriteAt(p []byte, off int64) (int, error) {
	f.mu.Lock()
	err := f.writeErr
	f.mu.Unlock()
	if err != nil {
		// A partial write, then the error, as a filling device does.
		n, _ := f.File.WriteAt(p[:len(p)/2], off)
		return n, err
	}
	return f.File.WriteAt(p, off)
}

func (f *faultFile) ReadAt(p []byte, off int64) (int, error) {
	f.mu.Lock()
	gate, enter := f.readGate, f.readEnter
	f.mu.Unlock()
	if gate != nil {
		enter <- struct{}{}
		<-gate
	}
	return f.File.ReadAt(p, off)
}

func faultOpener(files *[]*faultFile) Opener {
	return func(path string, size int64) (File, error) {
		f, err := OpenOSFile(path, size)
		if err != nil {
			return nil, err
		}
		ff := &faultFile{File: f}
		*files = append(*files, ff)
		return ff, nil
	}
}

// A device that fails writes (ENOSPC, EIO) refuses the new block with an
// error and corrupts none of the old ones, before and after a reopen.
func TestFailingDeviceRefusesWithoutCorrupting(t *testing.T) {
	for _, errno := range []syscall.Errno{syscall.ENOSPC, syscall.EIO} {
		t.Run(errno.Error(), func(t *testing.T) {
			var files []*faultFile
			cfg := Config{Dir: t.TempDir(), Classes: []Class{{MaxPayload: 1000, Slots: 8}}, Open: faultOpener(&files)}
			s := open(t, cfg)
			bs := smallBlocks(5, 30)
			put(t, s, bs[:5])
			files[0].writeErr = errno
			err := s.Put(context.Background(), bs[5].key, bs[5].shares, bs[5].payload)
			require.ErrorIs(t, err, errno)
			require.False(t, s.Contains(bs[5].key))
			require.Equal(t, uint64(1), s.Stats().IOErrors)
			requireBack(t, s, bs[:5])

			files = nil
			s2 := open(t, cfg)
			requireBack(t, s2, bs[:5])
			_, err = s2.Get(context.Background(), bs[5].key, make([]byte, 1000))
			require.ErrorIs(t, err, ErrNotFound, "the torn write is not served")
		})
	}
}

// A full ring whose oldest slot is being read refuses the new block
// (ErrFull) instead of overwriting the slot under the read.
func TestFullRingRefusesWhileOldestIsRead(t *testing.T) {
	var files []*faultFile
	cfg := Config{Dir: t.TempDir(), Classes: []Class{{MaxPayload: 1000, Slots: 2}}, Open: faultOpener(&files)}
	s := open(t, cfg)
	bs := smallBlocks(6, 10)
	put(t, s, bs[:2])
	gate, enter := make(chan struct{}), make(chan struct{})
	files[0].mu.Lock()
	files[0].readGate, files[0].readEnter = gate, enter
	files[0].mu.Unlock()
	done := make(chan error)
	dst := make([]byte, 1000)
	go func() {
		_, err := s.Get(context.Background(), bs[0].key, dst)
		done <- err
	}()
	<-enter
	err := s.Put(context.Background(), bs[2].key, bs[2].shares, bs[2].payload)
	require.ErrorIs(t, err, ErrFull)
	require.Equal(t, uint64(1), s.Stats().Refused)
	files[0].mu.Lock()
	files[0].readGate = nil
	files[0].mu.Unlock()
	close(gate)
	require.NoError(t, <-done)
	require.Equal(t, bs[0].payload, dst[:len(bs[0].payload)])
	requireBack(t, s, bs[:2])
}

// Bad input is an ErrInvalid, never a panic.
func TestPutRejectsBadInput(t *testing.T) {
	s := open(t, Config{Dir: t.TempDir(), Classes: testClasses})
	long := string(make([]byte, 200))
	for _, tc := range []struct {
		name    string
		key     Key
		shares  []uint64
		payload []byte
	}{
		{"empty namespace", Key{Hash: "h"}, []uint64{1}, []byte{1}},
		{"long namespace", Key{Namespace: long, Hash: "h"}, []uint64{1}, []byte{1}},
		{"empty hash", Key{Namespace: "n"}, []uint64{1}, []byte{1}},
		{"long hash", Key{Namespace: "n", Hash: long[:65]}, []uint64{1}, []byte{1}},
		{"no shares", Key{Namespace: "n", Hash: "h"}, nil, []byte{1}},
		{"shares mismatch", Key{Namespace: "n", Hash: "h"}, []uint64{2}, []byte{1}},
		{"too large", Key{Namespace: "n", Hash: "h"}, []uint64{9001}, make([]byte, 9001)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			require.ErrorIs(t, s.Put(context.Background(), tc.key, tc.shares, tc.payload), ErrInvalid)
		})
	}
}

// A corrupt checkpoint is ignored: the full scan brings everything back.
func TestCorruptCheckpointFallsBackToScan(t *testing.T) {
	cfg := Config{Dir: t.TempDir(), Classes: testClasses}
	s := open(t, cfg)
	bs := blocks(7, 30)
	put(t, s, bs)
	require.NoError(t, s.Checkpoint(context.Background()))
	b, err := os.ReadFile(filepath.Join(cfg.Dir, ckptName))
	require.NoError(t, err)
	b[len(b)/2] ^= 1
	require.NoError(t, os.WriteFile(filepath.Join(cfg.Dir, ckptName), b, 0o600))
	s2 := open(t, cfg)
	require.Zero(t, s2.Stats().RecoveredFromCkpt)
	requireBack(t, s2, bs)
}

func FuzzDecodeHeader(f *testing.F) {
	buf := make([]byte, HeaderSize)
	encodeHeader(buf, &Header{Key: Key{Namespace: "ns", Group: 1, Hash: "hash"}, Seq: 1, Shares: []uint64{3, 4}, PayloadLen: 7})
	f.Add(buf[:512])
	f.Fuzz(func(t *testing.T, head []byte) {
		p := make([]byte, HeaderSize)
		copy(p, head)
		h, err := decodeHeader(p, 1<<20)
		if err == nil {
			require.NoError(t, h.Key.validate())
			out := make([]byte, HeaderSize)
			encodeHeader(out, h)
			require.Equal(t, p, out, "a header that decodes re-encodes to the same page")
		}
	})
}

// A checkpoint whose checksum holds but whose ring position is out of
// range is refused (a full scan follows), never a panic.
func TestOutOfRangeCheckpointIsRefused(t *testing.T) {
	cfg := Config{Dir: t.TempDir(), Classes: []Class{{MaxPayload: 1000, Slots: 8}}}
	s := open(t, cfg)
	bs := smallBlocks(8, 6)
	put(t, s, bs)
	require.NoError(t, writeCheckpoint(cfg.Dir, &checkpoint{seq: 1, classes: []ckptClass{{maxPayload: 1000, slots: 8, scanFrom: 1 << 63}}}))
	s2 := open(t, cfg)
	require.Zero(t, s2.Stats().RecoveredFromCkpt)
	requireBack(t, s2, bs)
}
