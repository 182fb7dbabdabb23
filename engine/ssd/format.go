package ssd

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
)

// The slot format. A slot is HeaderSize bytes of header followed by the
// payload, padded to Align; every slot of a class has the same size, so
// slot i of a class file starts at i*slotSize. The header has a page of
// its own so that the payload starts 4096-aligned on disk and an O_DIRECT
// read can land it straight in its pool extent while the header goes to a
// small buffer. All integers are little-endian.
//
//	off  len  field
//	0    8    magic "PGFSLOT\x00"
//	8    2    format version
//	10   2    share count (TP ranks), 1..MaxShares
//	12   4    group
//	16   8    write sequence number (> 0)
//	24   8    payload length
//	32   4    payload checksum (CRC-32C)
//	36   2    namespace key length
//	38   2    hash length
//	40   128  namespace key (MaxNamespaceLen, zero padded)
//	168  64   hash (MaxHashLen, zero padded)
//	232  512  share lengths, MaxShares x 8 (summing to the payload length)
//	...       zero
//	4092 4    header checksum (CRC-32C of bytes 0..4092)
const (
	// Align is the alignment of slots, of payloads and of slot sizes: the
	// logical block size O_DIRECT needs on every current NVMe.
	Align = 4096
	// HeaderSize is the header's page.
	HeaderSize = Align
	// FormatVersion is written in every header; a scan drops other
	// versions (a format change is a cold start, never a misread).
	FormatVersion = 1
	// MaxNamespaceLen, MaxHashLen and MaxShares bound the key fields.
	MaxNamespaceLen = 128
	MaxHashLen      = 64
	MaxShares       = 64
)

const slotMagic = "PGFSLOT\x00"

const (
	offVersion  = 8
	offShares   = 10
	offGroup    = 12
	offSeq      = 16
	offPayload  = 24
	offCRC      = 32
	offNSLen    = 36
	offHashLen  = 38
	offNS       = 40
	offHash     = offNS + MaxNamespaceLen
	offShareLen = offHash + MaxHashLen
	offHdrCRC   = HeaderSize - 4
)

// castagnoli is CRC-32C, hardware-accelerated on amd64 and arm64. A
// table is immutable after creation, so sharing it is not mutable state.
var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Checksum is the payload checksum written in the header (CRC-32C).
func Checksum(p []byte) uint32 { return crc32.Checksum(p, castagnoli) }

// ChecksumUpdate extends crc (a Checksum of earlier bytes, 0 for none)
// with p: a payload read in pieces checks as it would whole.
func ChecksumUpdate(crc uint32, p []byte) uint32 { return crc32.Update(crc, castagnoli, p) }

// Key names a block across restarts: the namespace's persistent key
// (the engine's namespace id, derived from the model's compatibility
// fields), the KV cache group and the block hash.
type Key struct {
	Namespace string
	Group     uint32
	Hash      string
}

func (k Key) validate() error {
	switch {
	case len(k.Namespace) == 0 || len(k.Namespace) > MaxNamespaceLen:
		return fmt.Errorf("%w: namespace key of %d bytes, want 1..%d", ErrInvalid, len(k.Namespace), MaxNamespaceLen)
	case len(k.Hash) == 0 || len(k.Hash) > MaxHashLen:
		return fmt.Errorf("%w: hash of %d bytes, want 1..%d", ErrInvalid, len(k.Hash), MaxHashLen)
	}
	return nil
}

// Header is a slot's decoded header.
type Header struct {
	Key    Key
	Seq    uint64
	Shares []uint64 // per TP rank, summing to PayloadLen
	// PayloadLen and PayloadCRC describe the bytes after the header.
	PayloadLen uint64
	PayloadCRC uint32
}

// Errors. Callers test them with errors.Is.
var (
	ErrInvalid  = errors.New("ssd: invalid argument")
	ErrCorrupt  = errors.New("ssd: corrupt slot")
	ErrNotFound = errors.New("ssd: not found")
	ErrFull     = errors.New("ssd: no slot free")
	ErrClosed   = errors.New("ssd: store closed")
	ErrExists   = errors.New("ssd: key present")
	ErrTooLarge = errors.New("ssd: payload larger than every class")
)

// encodeHeader writes h into buf (HeaderSize bytes), zeroing the rest.
func encodeHeader(buf []byte, h *Header) {
	clear(buf[:HeaderSize])
	copy(buf, slotMagic)
	le := binary.LittleEndian
	le.PutUint16(buf[offVersion:], FormatVersion)
	le.PutUint16(buf[offShares:], uint16(len(h.Shares)))
	le.PutUint32(buf[offGroup:], h.Key.Group)
	le.PutUint64(buf[offSeq:], h.Seq)
	le.PutUint64(buf[offPayload:], h.PayloadLen)
	le.PutUint32(buf[offCRC:], h.PayloadCRC)
	le.PutUint16(buf[offNSLen:], uint16(len(h.Key.Namespace)))
	le.PutUint16(buf[offHashLen:], uint16(len(h.Key.Hash)))
	copy(buf[offNS:offNS+MaxNamespaceLen], h.Key.Namespace)
	copy(buf[offHash:offHash+MaxHashLen], h.Key.Hash)
	for i, s := range h.Shares {
		le.PutUint64(buf[offShareLen+8*i:], s)
	}
	le.PutUint32(buf[offHdrCRC:], crc32.Checksum(buf[:offHdrCRC], castagnoli))
}

// decodeHeader parses and checks a header: every field is bounded before
// it is used, so a torn or hostile page yields ErrCorrupt, never a panic
// or an oversized allocation. maxPayload is the slot's payload capacity.
func decodeHeader(buf []byte, maxPayload uint64) (*Header, error) {
	if len(buf) < HeaderSize {
		return nil, fmt.Errorf("%w: header of %d bytes", ErrCorrupt, len(buf))
	}
	le := binary.LittleEndian
	if string(buf[:8]) != slotMagic {
		return nil, fmt.Errorf("%w: bad magic", ErrCorrupt)
	}
	if got, want := le.Uint32(buf[offHdrCRC:]), crc32.Checksum(buf[:offHdrCRC], castagnoli); got != want {
		return nil, fmt.Errorf("%w: header checksum %08x, want %08x", ErrCorrupt, got, want)
	}
	if v := le.Uint16(buf[offVersion:]); v != FormatVersion {
		return nil, fmt.Errorf("%w: format version %d, want %d", ErrCorrupt, v, FormatVersion)
	}
	nShares := int(le.Uint16(buf[offShares:]))
	nsLen, hashLen := int(le.Uint16(buf[offNSLen:])), int(le.Uint16(buf[offHashLen:]))
	h := &Header{
		Seq:        le.Uint64(buf[offSeq:]),
		PayloadLen: le.Uint64(buf[offPayload:]),
		PayloadCRC: le.Uint32(buf[offCRC:]),
	}
	switch {
	case nShares < 1 || nShares > MaxShares:
		return nil, fmt.Errorf("%w: %d shares", ErrCorrupt, nShares)
	case nsLen < 1 || nsLen > MaxNamespaceLen || hashLen < 1 || hashLen > MaxHashLen:
		return nil, fmt.Errorf("%w: key lengths %d/%d", ErrCorrupt, nsLen, hashLen)
	case h.Seq == 0:
		return nil, fmt.Errorf("%w: sequence 0", ErrCorrupt)
	case h.PayloadLen > maxPayload:
		return nil, fmt.Errorf("%w: payload of %d bytes in a slot of %d", ErrCorrupt, h.PayloadLen, maxPayload)
	}
	h.Key = Key{
		Namespace: string(buf[offNS : offNS+nsLen]),
		Group:     le.Uint32(buf[offGroup:]),
		Hash:      string(buf[offHash : offHash+hashLen]),
	}
	h.Shares = make([]uint64, nShares)
	var sum uint64
	for i := range h.Shares {
		h.Shares[i] = le.Uint64(buf[offShareLen+8*i:])
		sum += h.Shares[i]
		if h.Shares[i] > h.PayloadLen {
			return nil, fmt.Errorf("%w: share %d of %d bytes", ErrCorrupt, i, h.Shares[i])
		}
	}
	if sum != h.PayloadLen {
		return nil, fmt.Errorf("%w: shares sum to %d, payload is %d", ErrCorrupt, sum, h.PayloadLen)
	}
	return h, nil
}

// alignUp rounds n up to a multiple of Align.
func alignUp(n uint64) uint64 { return (n + Align - 1) &^ (Align - 1) }
