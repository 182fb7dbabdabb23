package peer

import (
	"net"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/pegaflow/pegaflow/engine"
)

// A chunk's destinations that follow each other in one array are read as
// one; anything else (a gap, another array, the array's end) starts a new
// read, and the reads cover exactly the destinations, in order.
func TestCoalesce(t *testing.T) {
	pool := make([]byte, 100)
	other := make([]byte, 100)
	at := func(b []byte, off, n int) engine.PeerShareRead {
		return engine.PeerShareRead{Dst: b[off : off+n]}
	}
	for _, tc := range []struct {
		name  string
		reads []engine.PeerShareRead
		want  [][]byte
	}{
		{"one", []engine.PeerShareRead{at(pool, 0, 10)}, [][]byte{pool[0:10]}},
		{"adjacent run", []engine.PeerShareRead{at(pool, 0, 10), at(pool, 10, 10), at(pool, 20, 10)}, [][]byte{pool[0:30]}},
		{"gap", []engine.PeerShareRead{at(pool, 0, 10), at(pool, 11, 10)}, [][]byte{pool[0:10], pool[11:21]}},
		{"backwards", []engine.PeerShareRead{at(pool, 10, 10), at(pool, 0, 10)}, [][]byte{pool[10:20], pool[0:10]}},
		{"another array", []engine.PeerShareRead{at(pool, 0, 10), at(other, 0, 10), at(other, 10, 5)},
			[][]byte{pool[0:10], other[0:15]}},
		{"capped slice", []engine.PeerShareRead{{Dst: pool[0:10:10]}, at(pool, 10, 10)}, [][]byte{pool[0:10], pool[10:20]}},
		{"to the end", []engine.PeerShareRead{at(pool, 80, 10), at(pool, 90, 10)}, [][]byte{pool[80:100]}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := coalesce(tc.reads)
			require.Len(t, got, len(tc.want))
			for i := range got {
				require.Equal(t, len(tc.want[i]), len(got[i]), "read %d", i)
				require.Same(t, &tc.want[i][0], &got[i][0], "read %d", i)
			}
		})
	}
}

// The stream server writes an answer through portMux's slotConn; its
// buffers must reach the *net.TCPConn itself, the only writer net.Buffers
// sends with one writev (else one write per share).
func TestRawConnUnwrapsTheSlot(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer lis.Close()
	c, err := net.Dial("tcp", lis.Addr().String())
	require.NoError(t, err)
	defer c.Close()
	require.IsType(t, &net.TCPConn{}, rawConn(&slotConn{Conn: c, release: func() {}}))
	require.Same(t, c, rawConn(c))
}
