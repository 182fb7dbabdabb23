//go:build noucx

package native

import (
	"testing"

	"github.com/stretchr/testify/require"
)

func TestXferNotBuilt(t *testing.T) {
	_, err := NewXferAgent()
	require.ErrorIs(t, err, ErrNotSupported)
}
