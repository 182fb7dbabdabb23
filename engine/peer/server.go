// Package peer is how engines on different hosts reach each other, on one
// TCP port (--peer-addr): a gRPC control plane over which a reader
// handshakes (epoch; with --peer-transport=rdma also the UCX worker address
// and pools' remote keys), opens a transfer (the extents of each rank's
// share of a sealed prefix, pinned) and releases it, and a router looks
// up how much of a prompt the engine holds (Lookup); the validated stream
// over which it reads whole shares of a transfer it opened; and the Client
// a reading engine uses for both (it implements engine.PeerControl).
//
// Files: server.go the service and its gRPC server; listener.go the port
// (protocol sniffing, connection bound); auth.go the token and its check
// before a request body is read; stream.go the stream's wire format and
// token exchange; streamserver.go and streamclient.go its two ends;
// client.go the Client; metrics.go the stream's counters.
//
// Trust: every gRPC call carries a shared token (TokenHeader), checked in
// constant time from the stream's headers before its message is read;
// stream connections prove the token both ways by HMAC without sending it.
// A stream read names an open transfer's handle (a 128-bit capability
// handed out over the authenticated control plane) and gets only whole
// shares of that transfer (engine.OpenPeerRead). Nothing is encrypted: the
// port belongs on the KV network, firewalled to the peer engines
// (docs/multi-host.md, docs/security.md).
package peer

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/status"

	"github.com/pegaflow/pegaflow/engine"
	pb "github.com/pegaflow/pegaflow/engine/api/pegaflowv1"
	"github.com/pegaflow/pegaflow/engine/server"
)

// Config of the peer service.
type Config struct {
	// Addr is the TCP host:port to serve on.
	Addr string
	// Token is the shared peer token (LoadToken); calls without it are
	// refused. Empty only with Insecure on a loopback Addr.
	Token []byte
	// Insecure serves without a token; Validate allows it on loopback only.
	Insecure bool
	// Registerer takes the stream's metrics (metrics.go); nil: none.
	Registerer prometheus.Registerer
}

// maxRecvMsg bounds a request message: a bounded OpenTransfer
// (engine.MaxPeerOpenHashes hashes of at most 64 bytes) and its framing;
// a bounded Lookup (engine.MaxLookupHashes, packed) is smaller.
const maxRecvMsg = engine.MaxPeerOpenHashes*80 + 4096

// maxStreamsPerConn bounds the concurrent calls of one connection (the
// connections themselves are bounded by MaxConns).
const maxStreamsPerConn = 64

// Validate refuses an address that is not host:port and a service without
// a token unless Insecure on loopback.
func (c Config) Validate() error {
	host, _, err := net.SplitHostPort(c.Addr)
	if err != nil {
		return fmt.Errorf("--peer-addr %q: %w", c.Addr, err)
	}
	if len(c.Token) == 0 && !(c.Insecure && IsLoopback(host)) {
		return fmt.Errorf("%w; --peer-addr is %q", errInsecure, c.Addr)
	}
	return nil
}

// Server serves the Peer service and the validated stream of one engine.
type Server struct {
	grpc   *grpc.Server
	mux    *portMux
	stream *streamServer
	log    *slog.Logger
}

// New listens on cfg.Addr.
func New(cfg Config, eng *engine.Engine, log *slog.Logger) (*Server, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	lis, err := net.Listen("tcp", cfg.Addr)
	if err != nil {
		return nil, fmt.Errorf("listen %s: %w", cfg.Addr, err)
	}
	var token []byte
	if len(cfg.Token) > 0 {
		token = cfg.Token
	}
	m, err := newStreamMetrics(cfg.Registerer)
	if err != nil {
		_ = lis.Close()
		return nil, err
	}
	ss := &streamServer{eng: eng, token: token, log: log, m: m}
	g := grpc.NewServer(
		grpc.InTapHandle(authTap(token)),
		grpc.ChainUnaryInterceptor(authInterceptor(token)),
		grpc.MaxRecvMsgSize(maxRecvMsg), grpc.MaxSendMsgSize(64<<20),
		grpc.MaxConcurrentStreams(maxStreamsPerConn),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: 10 * time.Second, Timeout: 5 * time.Second}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 5 * time.Second, PermitWithoutStream: true}),
	)
	pb.RegisterPeerServer(g, &service{eng: eng})
	return &Server{grpc: g, mux: newPortMux(lis, ss.serve), stream: ss, log: log}, nil
}

// Addr is the address actually listened on.
func (s *Server) Addr() string { return s.mux.lis.Addr().String() }

// Serve serves until ctx ends, then stops gracefully (bounded).
func (s *Server) Serve(ctx context.Context) error {
	errc := make(chan error, 2)
	go func() { errc <- s.grpc.Serve(s.mux.grpc) }()
	go func() { errc <- s.mux.serve() }()
	s.log.Info("peer API and stream listening", "addr", s.Addr(), "max_conns", MaxConns)
	select {
	case err := <-errc:
		s.mux.close()
		s.grpc.Stop()
		return err
	case <-ctx.Done():
	}
	s.mux.close()
	stopped := make(chan struct{})
	go func() { s.grpc.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(5 * time.Second):
		s.grpc.Stop()
	}
	return nil
}

type service struct {
	pb.UnimplementedPeerServer
	eng *engine.Engine
}

// toStatus is the engine API's mapping, plus Aborted for a changed epoch
// (the reader handshakes again).
func toStatus(err error) error {
	if errors.Is(err, engine.ErrPeerEpoch) {
		return status.Error(codes.Aborted, err.Error())
	}
	return server.Status(err)
}

func (s *service) Handshake(context.Context, *pb.PeerHandshakeRequest) (*pb.PeerHandshakeResponse, error) {
	resp, err := s.eng.PeerHandshake()
	if err != nil {
		return nil, toStatus(err)
	}
	return resp, nil
}

func (s *service) OpenTransfer(ctx context.Context, req *pb.PeerOpenTransferRequest) (*pb.PeerOpenTransferResponse, error) {
	resp, err := s.eng.OpenPeerTransfer(ctx, req)
	if err != nil {
		return nil, toStatus(err)
	}
	return resp, nil
}

func (s *service) Lookup(_ context.Context, req *pb.PeerLookupRequest) (*pb.PeerLookupResponse, error) {
	resp, err := s.eng.PeerLookup(req)
	if err != nil {
		return nil, toStatus(err)
	}
	return resp, nil
}

func (s *service) ReleaseTransfer(_ context.Context, req *pb.PeerReleaseTransferRequest) (*pb.PeerReleaseTransferResponse, error) {
	if err := s.eng.ReleasePeerTransfer(req.Handle); err != nil {
		return nil, toStatus(err)
	}
	return &pb.PeerReleaseTransferResponse{}, nil
}
