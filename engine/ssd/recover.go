package ssd

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"sync"
)

// recover rebuilds the index at Open. With a checkpoint whose classes
// match, a class takes the checkpoint's entries and scans its ring from
// the checkpoint's scan-from slot on, until it has seen Window slots in a
// row that are not newer than the checkpoint (a write is allocated only
// while fewer than Window are in flight, so a run of Window stale slots
// means nothing was written past it). Without one, it scans every slot.
//
// Only a crash tears writes, and only those in flight then: at most
// Window per class, all among the newest. So the scan verifies the
// payloads of the Window newest slots per class and the headers of all
// it reads; the rest are verified on every Get.
func (s *Store) recover(ctx context.Context) error {
	cp, err := readCheckpoint(s.cfg.Dir)
	if err != nil {
		s.log.Warn("ssd: checkpoint unusable, scanning every slot", "dir", s.cfg.Dir, "err", err)
		cp = nil
	}
	hdr := make([]byte, HeaderSize)
	for ci, c := range s.classes {
		var cc *ckptClass
		if cp != nil && ci < len(cp.classes) && cp.classes[ci].maxPayload == c.MaxPayload && cp.classes[ci].slots == uint64(len(c.slots)) {
			cc = &cp.classes[ci]
		}
		var (
			from, limit = 0, len(c.slots)
			ckptSeq     uint64
		)
		if cc != nil {
			from, ckptSeq = int(cc.scanFrom), cp.seq
			for i, h := range cc.entries {
				c.slots[i] = slot{state: slotLive, hdr: h}
				s.stats.RecoveredFromCkpt++
			}
			s.seq = max(s.seq, cp.seq)
		}
		var (
			stale  int
			newest []int // scanned slots newer than the checkpoint
		)
		header := func(i int) (*Header, bool, error) { return readHeader(c, i, hdr) }
		if cc == nil {
			// Every slot: read the headers in parallel first.
			hdrs, dropped, err := readHeaders(ctx, c)
			if err != nil {
				return err
			}
			header = func(i int) (*Header, bool, error) { return hdrs[i], dropped[i], nil }
		}
		for n := 0; n < limit; n++ {
			if n%4096 == 0 {
				if err := ctx.Err(); err != nil {
					return fmt.Errorf("ssd recovery: %w", err)
				}
			}
			i := (from + n) % len(c.slots)
			if cc != nil && stale >= s.cfg.Window {
				break
			}
			if cc != nil && c.slots[i].state == slotLive {
				s.stats.RecoveredFromCkpt--
			}
			c.slots[i] = slot{}
			h, dropped, err := header(i)
			if err != nil {
				return err
			}
			if h == nil {
				if dropped {
					s.stats.RecoveryDroppedSlot++
				}
				stale++
				continue
			}
			if h.Seq <= ckptSeq {
				stale++
			} else {
				stale = 0
			}
			c.slots[i] = slot{state: slotLive, hdr: h}
			s.stats.RecoveredByScan++
			newest = append(newest, i)
			s.seq = max(s.seq, h.Seq)
		}
		if err := s.verifyNewest(c, newest); err != nil {
			return err
		}
		// The ring goes on after its newest slot.
		best := uint64(0)
		for i := range c.slots {
			if sl := &c.slots[i]; sl.state == slotLive && sl.hdr.Seq > best {
				best, c.cursor = sl.hdr.Seq, (i+1)%len(c.slots)
			}
		}
	}
	s.indexSlots()
	return nil
}

// verifyNewest checks the payloads of the Window newest scanned slots of
// c, the only ones a crash can have torn, and frees those that fail.
func (s *Store) verifyNewest(c *class, scanned []int) error {
	sort.Slice(scanned, func(a, b int) bool { return c.slots[scanned[a]].hdr.Seq > c.slots[scanned[b]].hdr.Seq })
	scanned = scanned[:min(len(scanned), s.cfg.Window)]
	buf := make([]byte, c.MaxPayload)
	for _, i := range scanned {
		if _, err := readSlot(c, i, buf); err != nil {
			s.log.Warn("ssd: dropping a torn or corrupt slot", "file", c.fileName(), "slot", i, "err", err)
			c.slots[i] = slot{}
			s.stats.RecoveredByScan--
			s.stats.RecoveryDroppedSlot++
		}
	}
	return nil
}

// indexSlots enters the live slots in the index; of two slots with one
// key (a block written again after its slot was evicted, the old slot
// left intact) the newer wins and the older is freed.
func (s *Store) indexSlots() {
	for ci, c := range s.classes {
		for i := range c.slots {
			sl := &c.slots[i]
			if sl.state != slotLive {
				continue
			}
			if old, ok := s.index[sl.hdr.Key]; ok {
				o := &s.classes[old.class].slots[old.slot]
				if o.hdr.Seq > sl.hdr.Seq {
					sl.state, sl.hdr = slotFree, nil
					continue
				}
				s.stats.UsedBytes -= o.hdr.PayloadLen
				o.state, o.hdr = slotFree, nil
			}
			s.index[sl.hdr.Key] = loc{ci, i}
			s.stats.UsedBytes += sl.hdr.PayloadLen
		}
	}
}

// isBlank: a slot never written (preallocated zeroes) is not a drop.
func isBlank(p []byte) bool {
	for _, b := range p {
		if b != 0 {
			return false
		}
	}
	return true
}

// readHeader reads and decodes slot i's header into buf: nil when the
// slot holds none, dropped when what it holds is not blank (torn or
// corrupt).
func readHeader(c *class, i int, buf []byte) (h *Header, dropped bool, err error) {
	if _, err := c.file.ReadAt(buf, c.offset(i)); err != nil {
		return nil, false, fmt.Errorf("ssd recovery: read %s slot %d: %w", c.fileName(), i, err)
	}
	h, err = decodeHeader(buf, c.MaxPayload)
	if err != nil {
		return nil, !isBlank(buf), nil
	}
	return h, false, nil
}

// scanReaders is how many header reads a full scan keeps in flight: a
// cold device serves many small reads at once, and one at a time a
// million slots take most of a minute.
const scanReaders = 16

// readHeaders reads every slot header of c with scanReaders readers.
func readHeaders(ctx context.Context, c *class) ([]*Header, []bool, error) {
	n := len(c.slots)
	hdrs, dropped := make([]*Header, n), make([]bool, n)
	errs := make([]error, scanReaders)
	chunk := (n + scanReaders - 1) / scanReaders
	var wg sync.WaitGroup
	for w := range scanReaders {
		lo, hi := w*chunk, min(n, (w+1)*chunk)
		wg.Go(func() {
			buf := make([]byte, HeaderSize)
			for i := lo; i < hi; i++ {
				if (i-lo)%4096 == 0 && ctx.Err() != nil {
					errs[w] = fmt.Errorf("ssd recovery: %w", ctx.Err())
					return
				}
				h, d, err := readHeader(c, i, buf)
				if err != nil {
					errs[w] = err
					return
				}
				hdrs[i], dropped[i] = h, d
			}
		})
	}
	wg.Wait()
	return hdrs, dropped, errors.Join(errs...)
}
