// Package ids makes the random identifiers PegaFlow hands out (sessions,
// leases, transfers, request ids, shm names): a prefix and 128 bits from
// crypto/rand in hex, so ids are unguessable as well as unique.
package ids

import (
	"crypto/rand"
	"encoding/hex"
)

// New returns prefix followed by 32 hex digits of crypto/rand output.
func New(prefix string) string { return prefix + Hex(16) }

// Hex returns n random bytes from crypto/rand as 2n hex digits.
// crypto/rand.Read never fails on Linux (it panics if the kernel cannot
// supply randomness), so there is no error to return.
//
// Up to 32 bytes it allocates only the string: it runs several times per
// routed request.
func Hex(n int) string {
	if n > 32 {
		b := make([]byte, n)
		_, _ = rand.Read(b)
		return hex.EncodeToString(b)
	}
	var raw [32]byte
	var out [64]byte
	_, _ = rand.Read(raw[:n])
	hex.Encode(out[:], raw[:n])
	return string(out[:2*n])
}
