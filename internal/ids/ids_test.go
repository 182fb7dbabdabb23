package ids

import (
	"encoding/hex"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestHex(t *testing.T) {
	for _, n := range []int{0, 1, 16, 32, 33, 64} {
		h := Hex(n)
		require.Len(t, h, 2*n)
		_, err := hex.DecodeString(h)
		require.NoError(t, err)
		if n >= 16 {
			require.NotEqual(t, h, Hex(n), "random")
		}
	}
}
