package peer

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/pegaflow/pegaflow/engine"
	pb "github.com/pegaflow/pegaflow/engine/api/pegaflowv1"
)

func writeToken(t *testing.T, mode os.FileMode, tok string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "token")
	require.NoError(t, os.WriteFile(p, []byte(tok+"\n"), mode))
	require.NoError(t, os.Chmod(p, mode))
	return p
}

func TestLoadTokenAndValidate(t *testing.T) {
	good := "0123456789abcdef0123456789abcdef"
	tok, err := LoadToken(writeToken(t, 0o600, good))
	require.NoError(t, err)
	require.Equal(t, good, string(tok))
	_, err = LoadToken(writeToken(t, 0o644, good))
	require.ErrorContains(t, err, "group or others")
	_, err = LoadToken(writeToken(t, 0o600, "short"))
	require.ErrorContains(t, err, "at least")

	cases := []struct {
		cfg Config
		ok  bool
	}{
		{Config{Addr: "10.0.0.1:7000", Token: tok}, true},
		{Config{Addr: "10.0.0.1:7000"}, false},
		{Config{Addr: "10.0.0.1:7000", Insecure: true}, false},
		{Config{Addr: "127.0.0.1:7000", Insecure: true}, true},
		{Config{Addr: "localhost:7000", Insecure: true}, true},
		{Config{Addr: "[::1]:7000", Insecure: true}, true},
		{Config{Addr: "127.0.0.1:7000"}, false},
		{Config{Addr: "nonsense", Token: tok}, false},
	}
	for _, tc := range cases {
		err := tc.cfg.Validate()
		if tc.ok {
			require.NoError(t, err, "%+v", tc.cfg)
		} else {
			require.Error(t, err, "%+v", tc.cfg)
		}
	}
}

// The service over real TCP: the token is required, transfers are
// NotFound once released, an old epoch is refused so the reader
// handshakes again.
func TestPeerServiceAuthAndErrors(t *testing.T) {
	token := []byte("0123456789abcdef0123456789abcdef")
	eng, srv := servePeer(t, engine.Config{PoolSize: 4 << 20, NUMANode: -1, Device: -1, Peers: NewClient(token)}, token)

	cctx, ccancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer ccancel()
	for _, tc := range []struct {
		name  string
		token []byte
		want  error
	}{{"missing token", nil, engine.ErrPermission}, {"wrong token", []byte("nope-nope-nope-nope-nope-nope-nope"), engine.ErrPermission}} {
		c := NewClient(tc.token)
		_, err := c.Handshake(cctx, srv.Addr())
		require.ErrorIs(t, err, tc.want, tc.name)
		c.Close()
	}
	c := NewClient(token)
	defer c.Close()
	hs, err := c.Handshake(cctx, srv.Addr())
	require.NoError(t, err)
	require.Equal(t, eng.Epoch(), hs.Epoch)
	require.Empty(t, hs.WorkerAddress, "--peer-transport=tcp exports no UCX worker")
	require.Empty(t, hs.Pools, "nor any pool address or key")

	require.ErrorIs(t, c.ReleaseTransfer(cctx, srv.Addr(), "pt-unknown"), engine.ErrNotFound)
	_, err = c.OpenTransfer(cctx, srv.Addr(), &pb.PeerOpenTransferRequest{Epoch: "ep-old", NamespaceId: "ns-x", Hashes: [][]byte{[]byte("12345678")}})
	require.ErrorIs(t, err, engine.ErrPeerEpoch)
	_, err = c.OpenTransfer(cctx, srv.Addr(), &pb.PeerOpenTransferRequest{Epoch: hs.Epoch, NamespaceId: "ns-x", Hashes: [][]byte{[]byte("12345678")}})
	require.ErrorIs(t, err, engine.ErrNotFound, "unknown namespace")
	_, err = c.OpenTransfer(cctx, srv.Addr(), &pb.PeerOpenTransferRequest{Epoch: hs.Epoch, TransferId: "t-unknown"})
	require.ErrorIs(t, err, engine.ErrNotFound, "unknown transfer")
}
