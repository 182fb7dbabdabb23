// Package server serves the engine's gRPC API on a UNIX socket.
//
// Files: server.go the Server, its service (one method per RPC) and the
// engine-error to gRPC-code mapping; socket.go the socket and the checks
// on its directory (ErrUnsafeSocket); peercred.go each connection's peer
// credentials (SO_PEERCRED), passed on to the engine; convert.go the
// engine's types to and from the wire messages; events.go the BlockEvents
// RPC (a namespace's block feed, for the connector's KV events).
package server

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/status"

	"github.com/pegaflow/pegaflow/engine"
	pb "github.com/pegaflow/pegaflow/engine/api/pegaflowv1"
)

// Config for the socket.
type Config struct {
	SocketPath string
	// SocketMode is the file mode of the socket (default 0600).
	SocketMode os.FileMode
	// SocketGroup, when set, is the group (name or gid) owning the socket.
	SocketGroup string
	// MaxMessageBytes bounds one request (default 64 MiB).
	MaxMessageBytes int
}

// Server is the gRPC front of an engine.
type Server struct {
	cfg  Config
	eng  *engine.Engine
	log  *slog.Logger
	grpc *grpc.Server
	lis  net.Listener
	rpc  *prometheus.HistogramVec
	// closing ends every Attach stream so a graceful stop need not wait
	// for clients to hang up.
	closing chan struct{}
}

// New listens on the socket (replacing a stale one) and prepares the server.
func New(cfg Config, eng *engine.Engine, log *slog.Logger, reg prometheus.Registerer) (*Server, error) {
	if cfg.SocketPath == "" {
		return nil, errors.New("socket path is empty")
	}
	if cfg.SocketMode == 0 {
		cfg.SocketMode = 0o600
	}
	if cfg.MaxMessageBytes <= 0 {
		cfg.MaxMessageBytes = 64 << 20
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	lis, err := listenUnix(cfg)
	if err != nil {
		return nil, err
	}
	s := &Server{cfg: cfg, eng: eng, log: log, lis: lis, closing: make(chan struct{}),
		rpc: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: "pegaflow_engine", Name: "rpc_duration_seconds",
			Help:    "Engine RPC duration by method and status code.",
			Buckets: prometheus.ExponentialBuckets(20e-6, 2, 20),
		}, []string{"method", "code"}),
	}
	if reg != nil {
		if err := reg.Register(s.rpc); err != nil {
			lis.Close()
			return nil, err
		}
	}
	s.grpc = grpc.NewServer(
		grpc.Creds(peerCreds{}),
		grpc.MaxRecvMsgSize(cfg.MaxMessageBytes),
		grpc.MaxSendMsgSize(cfg.MaxMessageBytes),
		grpc.ChainUnaryInterceptor(s.observe),
		// A 1000-hash query is ~34 KB: large windows and buffers let it go
		// out in one write instead of waiting on flow control.
		grpc.InitialWindowSize(4<<20),
		grpc.InitialConnWindowSize(8<<20),
		grpc.ReadBufferSize(256<<10),
		grpc.WriteBufferSize(256<<10),
		// Detect dead peers even on an idle connection.
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: 10 * time.Second, Timeout: 5 * time.Second}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 5 * time.Second, PermitWithoutStream: true}),
	)
	pb.RegisterEngineServer(s.grpc, &service{eng: eng, log: log, closing: s.closing})
	return s, nil
}

// Serve serves until ctx ends, then stops gracefully (bounded).
func (s *Server) Serve(ctx context.Context) error {
	errc := make(chan error, 1)
	go func() { errc <- s.grpc.Serve(s.lis) }()
	s.log.Info("engine API listening", "socket", s.cfg.SocketPath)
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	close(s.closing)
	stopped := make(chan struct{})
	go func() { s.grpc.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(5 * time.Second):
		s.grpc.Stop()
	}
	_ = os.Remove(s.cfg.SocketPath)
	return nil
}

func (s *Server) observe(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	start := time.Now()
	resp, err := handler(ctx, req)
	s.rpc.WithLabelValues(filepath.Base(info.FullMethod), status.Code(err).String()).Observe(time.Since(start).Seconds())
	return resp, err
}

// toStatus maps engine error kinds to gRPC codes.
func toStatus(err error) error {
	if err == nil {
		return nil
	}
	code := codes.Internal
	switch {
	case errors.Is(err, engine.ErrInvalid):
		code = codes.InvalidArgument
	case errors.Is(err, engine.ErrNotFound):
		code = codes.NotFound
	case errors.Is(err, engine.ErrPermission):
		code = codes.PermissionDenied
	case errors.Is(err, engine.ErrPrecondition):
		code = codes.FailedPrecondition
	case errors.Is(err, engine.ErrAlreadyExists):
		code = codes.AlreadyExists
	case errors.Is(err, engine.ErrExhausted):
		code = codes.ResourceExhausted
	case errors.Is(err, engine.ErrClosed):
		code = codes.Unavailable
	case errors.Is(err, context.DeadlineExceeded):
		code = codes.DeadlineExceeded
	case errors.Is(err, context.Canceled):
		code = codes.Canceled
	}
	return status.Error(code, err.Error())
}

type service struct {
	pb.UnimplementedEngineServer
	eng     *engine.Engine
	log     *slog.Logger
	closing <-chan struct{}
}

func (s *service) Attach(req *pb.AttachRequest, stream grpc.ServerStreamingServer[pb.SessionEvent]) error {
	id, err := s.eng.OpenSession(req.ClientName)
	if err != nil {
		return toStatus(err)
	}
	defer s.eng.CloseSession(id)
	if err := stream.Send(&pb.SessionEvent{SessionId: id, EngineVersion: s.eng.Version(), Backend: s.eng.Backend(),
		PeerAddress: s.eng.PeerAddress()}); err != nil {
		return err
	}
	select {
	case <-stream.Context().Done():
	case <-s.closing:
	}
	return nil
}

func (s *service) OpenNamespace(_ context.Context, req *pb.OpenNamespaceRequest) (*pb.OpenNamespaceResponse, error) {
	id, err := s.eng.OpenNamespace(req.SessionId, req.Namespace)
	if err != nil {
		return nil, toStatus(err)
	}
	return &pb.OpenNamespaceResponse{NamespaceId: id}, nil
}

func (s *service) Register(ctx context.Context, req *pb.RegisterRequest) (*pb.RegisterResponse, error) {
	// Shared-memory files must belong to the registering process's user.
	ctx, err := withPeer(ctx)
	if err != nil {
		return nil, toStatus(err)
	}
	resp, err := s.eng.Register(ctx, req)
	return resp, toStatus(err)
}

func (s *service) Unregister(_ context.Context, req *pb.UnregisterRequest) (*pb.UnregisterResponse, error) {
	if err := s.eng.Unregister(req); err != nil {
		return nil, toStatus(err)
	}
	return &pb.UnregisterResponse{}, nil
}

func (s *service) Save(ctx context.Context, req *pb.SaveRequest) (*pb.SaveResponse, error) {
	resp, err := s.eng.Save(ctx, req)
	return resp, toStatus(err)
}

func (s *service) Load(ctx context.Context, req *pb.LoadRequest) (*pb.LoadResponse, error) {
	resp, err := s.eng.Load(ctx, req)
	return resp, toStatus(err)
}

func (s *service) Query(ctx context.Context, req *pb.QueryRequest) (*pb.QueryResponse, error) {
	resp, err := s.eng.Query(ctx, req)
	return resp, toStatus(err)
}

func (s *service) Release(_ context.Context, req *pb.ReleaseRequest) (*pb.ReleaseResponse, error) {
	if err := s.eng.Release(req); err != nil {
		return nil, toStatus(err)
	}
	return &pb.ReleaseResponse{}, nil
}

func (s *service) Health(context.Context, *pb.HealthRequest) (*pb.HealthResponse, error) {
	return healthToPB(s.eng.Health()), nil
}

func (s *service) Stats(context.Context, *pb.StatsRequest) (*pb.StatsResponse, error) {
	return statsToPB(s.eng.Stats()), nil
}

// Status maps an engine error to its gRPC status, as this API does (for
// other services of the engine, e.g. engine/peer).
func Status(err error) error { return toStatus(err) }
