package vllmhash

// cborBlock appends the canonical CBOR (cbor2.dumps(x, canonical=True))
// of (parent, tuple(tokens), extra_keys): tuples are arrays, extra_keys
// is None or ((saltKey, salt),).
func cborBlock(b, parent []byte, tokens []uint32, salt string) []byte {
	b = append(b, 0x83) // array(3)
	b = cborHead(b, 2, uint64(len(parent)))
	b = append(b, parent...)
	b = cborHead(b, 4, uint64(len(tokens)))
	for _, t := range tokens {
		b = cborHead(b, 0, uint64(t))
	}
	if salt == "" {
		return append(b, 0xf6) // None
	}
	b = append(b, 0x81, 0x82) // ((key, salt),)
	b = cborText(b, saltKey)
	return cborText(b, salt)
}

func cborText(b []byte, s string) []byte {
	b = cborHead(b, 3, uint64(len(s)))
	return append(b, s...)
}

// cborHead appends a canonical (shortest) CBOR head of major type major.
func cborHead(b []byte, major byte, v uint64) []byte {
	m := major << 5
	switch {
	case v < 24:
		return append(b, m|byte(v))
	case v <= 0xff:
		return append(b, m|24, byte(v))
	case v <= 0xffff:
		return append(b, m|25, byte(v>>8), byte(v))
	case v <= 0xffffffff:
		return append(b, m|26, byte(v>>24), byte(v>>16), byte(v>>8), byte(v))
	default:
		return append(b, m|27, byte(v>>56), byte(v>>48), byte(v>>40), byte(v>>32), byte(v>>24), byte(v>>16), byte(v>>8), byte(v))
	}
}
