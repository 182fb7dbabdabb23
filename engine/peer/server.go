// Package peer is the engine's control plane to other engines across
// hosts: a gRPC service on TCP (--peer-addr) over which a reader
// handshakes (UCX worker address, pools' remote keys, epoch), opens a
// transfer (the extents of each rank's share of a sealed prefix, pinned)
// and releases it; and the Client a reading engine uses (it implements
// engine.PeerControl). The bytes move over UCX, engine side.
//
// Trust: every call carries a shared token (TokenHeader), compared in
// constant time. The token and the UCX traffic are not encrypted, and
// over TCP a connected UCX peer can read outside the registered pools, so
// the peer and UCX ports belong on the KV network, firewalled to the peer
// engines (docs/multi-host.md).
package peer

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"time"

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
}

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

// Server serves the Peer service of one engine.
type Server struct {
	grpc *grpc.Server
	lis  net.Listener
	log  *slog.Logger
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
	g := grpc.NewServer(
		grpc.ChainUnaryInterceptor(authInterceptor(token)),
		grpc.MaxRecvMsgSize(64<<20), grpc.MaxSendMsgSize(64<<20),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: 10 * time.Second, Timeout: 5 * time.Second}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 5 * time.Second, PermitWithoutStream: true}),
	)
	pb.RegisterPeerServer(g, &service{eng: eng})
	return &Server{grpc: g, lis: lis, log: log}, nil
}

// Addr is the address actually listened on.
func (s *Server) Addr() string { return s.lis.Addr().String() }

// Serve serves until ctx ends, then stops gracefully (bounded).
func (s *Server) Serve(ctx context.Context) error {
	errc := make(chan error, 1)
	go func() { errc <- s.grpc.Serve(s.lis) }()
	s.log.Info("peer API listening", "addr", s.Addr())
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
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

func (s *service) ReleaseTransfer(_ context.Context, req *pb.PeerReleaseTransferRequest) (*pb.PeerReleaseTransferResponse, error) {
	if err := s.eng.ReleasePeerTransfer(req.Handle); err != nil {
		return nil, toStatus(err)
	}
	return &pb.PeerReleaseTransferResponse{}, nil
}
