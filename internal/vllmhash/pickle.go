package vllmhash

import "encoding/binary"

// Pickle opcodes of protocol 5 that a block's tuple uses.
const (
	opProto          = 0x80
	opFrame          = 0x95
	opStop           = '.'
	opMark           = '('
	opTuple          = 't'
	opTuple1         = 0x85
	opMemoize        = 0x94
	opNone           = 'N'
	opBinInt1        = 'K'
	opBinInt2        = 'M'
	opBinInt         = 'J'
	opLong1          = 0x8a
	opShortBinBytes  = 'C'
	opShortBinUnicde = 0x8c
	opBinUnicode     = 'X'
)

// frameTarget is CPython's _FRAME_SIZE_TARGET: a frame is closed, at the
// start of the next object, once it holds this many bytes.
const frameTarget = 64 << 10

// pickler writes what CPython's C pickler writes for
// pickle.dumps(x, protocol=5) (vLLM's pickle.HIGHEST_PROTOCOL on Python
// 3.8+) for the few types a block's tuple holds: bytes under 256 bytes,
// ints in 0..2^32-1, str under MaxSaltBytes, None, tuples, each bytes, str
// and tuple memoized, and the output cut into frames. The frame rule,
// checked against CPython 3.11: a frame is committed when an object's
// save starts and the frame holds frameTarget bytes or more; the last
// one at the end.
type pickler struct {
	b     []byte
	frame int // offset of the open frame's header
}

func newPickler(b []byte) *pickler {
	p := &pickler{b: append(b, opProto, 5)}
	p.open()
	return p
}

func (p *pickler) open() {
	p.frame = len(p.b)
	p.b = append(p.b, opFrame, 0, 0, 0, 0, 0, 0, 0, 0)
}

func (p *pickler) commit() {
	binary.LittleEndian.PutUint64(p.b[p.frame+1:], uint64(len(p.b)-p.frame-9))
}

// boundary is the start of an object's save.
func (p *pickler) boundary() {
	if len(p.b)-p.frame-9 >= frameTarget {
		p.commit()
		p.open()
	}
}

func (p *pickler) finish() []byte {
	p.b = append(p.b, opStop)
	p.commit()
	return p.b
}

func (p *pickler) uint(v uint32) {
	switch {
	case v <= 0xff:
		p.b = append(p.b, opBinInt1, byte(v))
	case v <= 0xffff:
		p.b = append(p.b, opBinInt2, byte(v), byte(v>>8))
	case v < 1<<31:
		p.b = append(p.b, opBinInt, byte(v), byte(v>>8), byte(v>>16), byte(v>>24))
	default: // two's complement needs a fifth, zero, byte
		p.b = append(p.b, opLong1, 5, byte(v), byte(v>>8), byte(v>>16), byte(v>>24), 0)
	}
}

// shortBytes: len(v) < 256 (a hash).
func (p *pickler) shortBytes(v []byte) {
	p.b = append(p.b, opShortBinBytes, byte(len(v)))
	p.b = append(p.b, v...)
	p.b = append(p.b, opMemoize)
}

// text: len(s) <= MaxSaltBytes.
func (p *pickler) text(s string) {
	if len(s) < 256 {
		p.b = append(p.b, opShortBinUnicde, byte(len(s)))
	} else {
		p.b = append(p.b, opBinUnicode)
		p.b = binary.LittleEndian.AppendUint32(p.b, uint32(len(s)))
	}
	p.b = append(p.b, s...)
	p.b = append(p.b, opMemoize)
}

// pickleBlock appends the pickle of (parent, tuple(tokens), extra_keys),
// extra_keys None or ((saltKey, salt),). len(tokens) >= 1.
func pickleBlock(b, parent []byte, tokens []uint32, salt string) []byte {
	p := newPickler(b)
	p.boundary() // the outer tuple
	p.boundary()
	p.shortBytes(parent)
	p.boundary() // tuple(tokens)
	if len(tokens) > 3 {
		p.b = append(p.b, opMark)
	}
	for _, t := range tokens {
		p.boundary()
		p.uint(t)
	}
	p.endTuple(len(tokens))
	p.boundary() // extra_keys
	if salt == "" {
		p.b = append(p.b, opNone)
	} else {
		p.boundary() // (saltKey, salt)
		p.boundary()
		p.text(saltKey)
		p.boundary()
		p.text(salt)
		p.endTuple(2)
		p.endTuple(1)
	}
	p.endTuple(3)
	return p.finish()
}

// endTuple closes a tuple of n >= 1 items (opened with opMark when n > 3).
func (p *pickler) endTuple(n int) {
	if n <= 3 {
		p.b = append(p.b, byte(opTuple1+n-1), opMemoize)
		return
	}
	p.b = append(p.b, opTuple, opMemoize)
}
