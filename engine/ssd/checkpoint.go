package ssd

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"os"
	"path/filepath"
)

// The checkpoint file: a snapshot of the index and, per class, where the
// ring stood, so that Open reads it and scans only the slots written
// after it. Little-endian:
//
//	magic "PGFCKPT\x00", version u16, classes u16, seq u64
//	per class: max payload u64, slots u64, scan-from u64, entries u64,
//	  then per entry: slot u32, seq u64, group u32, payload length u64,
//	  payload crc u32, ns length u16, hash length u16, shares u16,
//	  ns, hash, shares x u64
//	CRC-32C of everything before it, u32
//
// seq is the newest write whose slot the snapshot accounts for: every
// write with a larger sequence number lies at or after its class's
// scan-from slot in ring order.
const (
	ckptMagic   = "PGFCKPT\x00"
	ckptVersion = 1
	ckptName    = "index.ckpt"
)

type ckptClass struct {
	maxPayload uint64
	slots      uint64
	scanFrom   uint64
	entries    map[int]*Header // by slot
}

type checkpoint struct {
	seq     uint64
	classes []ckptClass
}

// Checkpoint snapshots the index to Dir/index.ckpt (written to a
// temporary file, synced, renamed) after syncing the slot files, so a
// checkpoint never names a slot whose bytes are not durable.
func (s *Store) Checkpoint(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("ssd checkpoint: %w", err)
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return ErrClosed
	}
	cp := checkpoint{seq: s.seq}
	for _, c := range s.classes {
		cc := ckptClass{maxPayload: c.MaxPayload, slots: uint64(len(c.slots)), scanFrom: uint64(c.cursor), entries: map[int]*Header{}}
		// A write in flight is in neither the snapshot nor (were seq
		// taken as is) the scan: start the scan at the oldest one and
		// cut seq below it.
		oldest := uint64(0)
		for i := range c.slots {
			sl := &c.slots[i]
			switch sl.state {
			case slotLive:
				cc.entries[i] = sl.hdr
			case slotWriting:
				if oldest == 0 || sl.hdr.Seq < oldest {
					oldest, cc.scanFrom = sl.hdr.Seq, uint64(i)
				}
			}
		}
		if oldest != 0 && oldest-1 < cp.seq {
			cp.seq = oldest - 1
		}
		cp.classes = append(cp.classes, cc)
	}
	s.mu.Unlock()

	for _, c := range s.classes {
		if err := c.file.Sync(); err != nil {
			return fmt.Errorf("ssd checkpoint: sync %s: %w", c.fileName(), err)
		}
	}
	return writeCheckpoint(s.cfg.Dir, &cp)
}

func writeCheckpoint(dir string, cp *checkpoint) error {
	le := binary.LittleEndian
	b := []byte(ckptMagic)
	b = le.AppendUint16(b, ckptVersion)
	b = le.AppendUint16(b, uint16(len(cp.classes)))
	b = le.AppendUint64(b, cp.seq)
	for _, c := range cp.classes {
		b = le.AppendUint64(b, c.maxPayload)
		b = le.AppendUint64(b, c.slots)
		b = le.AppendUint64(b, c.scanFrom)
		b = le.AppendUint64(b, uint64(len(c.entries)))
		for i, h := range c.entries {
			b = le.AppendUint32(b, uint32(i))
			b = le.AppendUint64(b, h.Seq)
			b = le.AppendUint32(b, h.Key.Group)
			b = le.AppendUint64(b, h.PayloadLen)
			b = le.AppendUint32(b, h.PayloadCRC)
			b = le.AppendUint16(b, uint16(len(h.Key.Namespace)))
			b = le.AppendUint16(b, uint16(len(h.Key.Hash)))
			b = le.AppendUint16(b, uint16(len(h.Shares)))
			b = append(b, h.Key.Namespace...)
			b = append(b, h.Key.Hash...)
			for _, n := range h.Shares {
				b = le.AppendUint64(b, n)
			}
		}
	}
	b = le.AppendUint32(b, crc32.Checksum(b, castagnoli))

	tmp := filepath.Join(dir, ckptName+".tmp")
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("ssd checkpoint: %w", err)
	}
	_, err = f.Write(b)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, filepath.Join(dir, ckptName))
	}
	if err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("ssd checkpoint: %w", err)
	}
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		_ = d.Close()
	}
	return nil
}

// ckptReader decodes with bounds checks: a truncated or hostile file is
// an error, never a panic or an allocation beyond the file's size.
type ckptReader struct {
	b   []byte
	err error
}

func (r *ckptReader) take(n int) []byte {
	if r.err != nil || n > len(r.b) {
		r.err = errors.New("truncated")
		return make([]byte, n+8) // n is bounded by the callers (<= MaxNamespaceLen)
	}
	p := r.b[:n]
	r.b = r.b[n:]
	return p
}

func (r *ckptReader) u16() uint16 { return binary.LittleEndian.Uint16(r.take(2)) }
func (r *ckptReader) u32() uint32 { return binary.LittleEndian.Uint32(r.take(4)) }
func (r *ckptReader) u64() uint64 { return binary.LittleEndian.Uint64(r.take(8)) }

// readCheckpoint loads Dir/index.ckpt; (nil, nil) when there is none.
func readCheckpoint(dir string) (*checkpoint, error) {
	b, err := os.ReadFile(filepath.Join(dir, ckptName))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read checkpoint: %w", err)
	}
	if len(b) < len(ckptMagic)+4 || string(b[:len(ckptMagic)]) != ckptMagic {
		return nil, errors.New("checkpoint: bad magic")
	}
	body := b[:len(b)-4]
	if got, want := binary.LittleEndian.Uint32(b[len(b)-4:]), crc32.Checksum(body, castagnoli); got != want {
		return nil, fmt.Errorf("checkpoint: checksum %08x, want %08x", got, want)
	}
	r := &ckptReader{b: body[len(ckptMagic):]}
	if v := r.u16(); v != ckptVersion {
		return nil, fmt.Errorf("checkpoint: version %d, want %d", v, ckptVersion)
	}
	cp := &checkpoint{}
	n := int(r.u16())
	cp.seq = r.u64()
	for range n {
		c := ckptClass{maxPayload: r.u64(), slots: r.u64(), scanFrom: r.u64(), entries: map[int]*Header{}}
		entries := r.u64()
		if r.err == nil && (c.slots == 0 || c.scanFrom >= c.slots) {
			return nil, fmt.Errorf("checkpoint: class %d: scan from slot %d of %d", len(cp.classes), c.scanFrom, c.slots)
		}
		for e := uint64(0); e < entries && r.err == nil; e++ {
			slot := int(r.u32())
			h := &Header{Seq: r.u64()}
			h.Key.Group = r.u32()
			h.PayloadLen = r.u64()
			h.PayloadCRC = r.u32()
			nsLen, hashLen, shares := int(r.u16()), int(r.u16()), int(r.u16())
			if nsLen > MaxNamespaceLen || hashLen > MaxHashLen || shares > MaxShares {
				return nil, fmt.Errorf("checkpoint: entry %d: field lengths %d/%d/%d", e, nsLen, hashLen, shares)
			}
			h.Key.Namespace = string(r.take(nsLen))
			h.Key.Hash = string(r.take(hashLen))
			for range shares {
				h.Shares = append(h.Shares, r.u64())
			}
			if uint64(slot) >= c.slots {
				return nil, fmt.Errorf("checkpoint: entry %d: slot %d of %d", e, slot, c.slots)
			}
			c.entries[slot] = h
		}
		cp.classes = append(cp.classes, c)
	}
	if r.err != nil {
		return nil, fmt.Errorf("checkpoint: %w", r.err)
	}
	return cp, nil
}
