package peer

import (
	"context"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/pegaflow/pegaflow/engine"
	pb "github.com/pegaflow/pegaflow/engine/api/pegaflowv1"
)

// servePeer runs an engine of cfg and its peer service (with token) until
// the test ends.
func servePeer(t *testing.T, cfg engine.Config, token []byte) (*engine.Engine, *Server) {
	t.Helper()
	eng, err := engine.New(cfg, nil, prometheus.NewRegistry())
	require.NoError(t, err)
	srv, err := New(Config{Addr: "127.0.0.1:0", Token: token}, eng, nil)
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		require.NoError(t, <-done)
		require.NoError(t, eng.Close())
	})
	return eng, srv
}

// The Lookup RPC under hostile calls: no token, a wrong one, malformed
// and oversized hash lists each get their status, and the engine keeps
// answering.
func TestLookupRPCHostile(t *testing.T) {
	token := []byte("0123456789abcdef0123456789abcdef")
	eng, srv := servePeer(t, engine.Config{PoolSize: 1 << 20, NUMANode: -1, Device: -1}, token)

	conn, err := grpc.NewClient("passthrough:///"+srv.Addr(), grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallSendMsgSize(64<<20)))
	require.NoError(t, err)
	defer conn.Close()
	api := pb.NewPeerClient(conn)
	good := func() *pb.PeerLookupRequest {
		return &pb.PeerLookupRequest{Model: "m", BlockSize: 16, HashAlgo: "sha256_cbor", HashSeedFingerprint: []byte("fp"),
			PackedHashes: make([]byte, 4*32), HashLen: 32}
	}
	for _, tc := range []struct {
		name  string
		token string // "" : none
		edit  func(r *pb.PeerLookupRequest)
		want  codes.Code
	}{
		{"no token", "", func(*pb.PeerLookupRequest) {}, codes.Unauthenticated},
		{"wrong token", "0123456789abcdef0123456789abcdeX", func(*pb.PeerLookupRequest) {}, codes.PermissionDenied},
		{"wrong token, huge body", "nope", func(r *pb.PeerLookupRequest) { r.PackedHashes = make([]byte, 32<<20) }, codes.PermissionDenied},
		{"good", string(token), func(*pb.PeerLookupRequest) {}, codes.OK},
		{"no hashes", string(token), func(r *pb.PeerLookupRequest) { r.PackedHashes, r.HashLen = nil, 0 }, codes.OK},
		{"hash_len 0", string(token), func(r *pb.PeerLookupRequest) { r.HashLen = 0 }, codes.InvalidArgument},
		{"hash_len 7", string(token), func(r *pb.PeerLookupRequest) { r.PackedHashes, r.HashLen = make([]byte, 14), 7 }, codes.InvalidArgument},
		{"hash_len 65", string(token), func(r *pb.PeerLookupRequest) { r.PackedHashes, r.HashLen = make([]byte, 130), 65 }, codes.InvalidArgument},
		{"ragged", string(token), func(r *pb.PeerLookupRequest) { r.PackedHashes = make([]byte, 33) }, codes.InvalidArgument},
		{"too many hashes", string(token), func(r *pb.PeerLookupRequest) {
			r.PackedHashes, r.HashLen = make([]byte, 8*(engine.MaxLookupHashes+1)), 8
		}, codes.InvalidArgument},
		{"over the message bound", string(token), func(r *pb.PeerLookupRequest) { r.PackedHashes = make([]byte, 16<<20) }, codes.ResourceExhausted},
		{"no fingerprint", string(token), func(r *pb.PeerLookupRequest) { r.HashSeedFingerprint = nil }, codes.InvalidArgument},
		{"block size 0", string(token), func(r *pb.PeerLookupRequest) { r.BlockSize = 0 }, codes.InvalidArgument},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cctx, ccancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer ccancel()
			if tc.token != "" {
				cctx = metadata.AppendToOutgoingContext(cctx, TokenHeader, tc.token)
			}
			req := good()
			tc.edit(req)
			resp, err := api.Lookup(cctx, req)
			require.Equal(t, tc.want, status.Code(err), "%v", err)
			if tc.want == codes.OK {
				require.Zero(t, resp.NumHit)
				require.Equal(t, eng.Epoch(), resp.Epoch)
			}
		})
	}
}
