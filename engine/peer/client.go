package peer

import (
	"context"
	"fmt"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/pegaflow/pegaflow/engine"
	pb "github.com/pegaflow/pegaflow/engine/api/pegaflowv1"
)

// maxConns bounds the peer connections a Client keeps.
const maxConns = 256

// Client calls other engines' Peer services; it implements
// engine.PeerControl. Safe for concurrent use.
type Client struct {
	token   []byte
	streams streams

	mu    sync.Mutex // guards conns
	conns map[string]*grpc.ClientConn
}

// NewClient sends token (may be empty, for insecure loopback peers) with
// every call.
func NewClient(token []byte) *Client {
	return &Client{token: token, conns: map[string]*grpc.ClientConn{},
		streams: streams{token: token, idle: map[string][]*streamConn{}}}
}

// Close closes every connection.
func (c *Client) Close() error {
	c.streams.close()
	c.mu.Lock()
	defer c.mu.Unlock()
	for a, conn := range c.conns {
		_ = conn.Close()
		delete(c.conns, a)
	}
	return nil
}

func (c *Client) api(addr string) (pb.PeerClient, *grpc.ClientConn, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if conn := c.conns[addr]; conn != nil {
		return pb.NewPeerClient(conn), conn, nil
	}
	if len(c.conns) >= maxConns {
		for a, conn := range c.conns {
			_ = conn.Close()
			delete(c.conns, a)
			break
		}
	}
	conn, err := grpc.NewClient("passthrough:///"+addr,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(64<<20), grpc.MaxCallSendMsgSize(64<<20)),
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: 10 * time.Second, Timeout: 5 * time.Second, PermitWithoutStream: true}),
	)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: peer %s: %w", engine.ErrPeerUnavailable, addr, err)
	}
	c.conns[addr] = conn
	return pb.NewPeerClient(conn), conn, nil
}

// failed maps a call's error and, when the peer was unreachable, forgets
// the connection: gRPC would otherwise keep failing calls fast during its
// reconnect backoff, long after a restarted peer is back.
func (c *Client) failed(addr, method string, conn *grpc.ClientConn, err error) error {
	if status.Code(err) == codes.Unavailable {
		c.mu.Lock()
		if c.conns[addr] == conn {
			delete(c.conns, addr)
			_ = conn.Close()
		}
		c.mu.Unlock()
	}
	return fromStatus(addr, method, err)
}

func (c *Client) outgoing(ctx context.Context) context.Context {
	if len(c.token) == 0 {
		return ctx
	}
	return metadata.AppendToOutgoingContext(ctx, TokenHeader, string(c.token))
}

// fromStatus maps a peer's gRPC status to the engine's error kinds.
func fromStatus(addr, method string, err error) error {
	st := status.Convert(err)
	var kind error
	switch st.Code() {
	case codes.Unauthenticated, codes.PermissionDenied:
		kind = engine.ErrPermission
	case codes.NotFound:
		kind = engine.ErrNotFound
	case codes.Aborted:
		kind = engine.ErrPeerEpoch
	case codes.DeadlineExceeded:
		kind = context.DeadlineExceeded
	case codes.Canceled:
		kind = context.Canceled
	case codes.InvalidArgument:
		kind = engine.ErrInvalid
	default:
		kind = engine.ErrPeerUnavailable
	}
	return fmt.Errorf("%w: peer %s %s: %s", kind, addr, method, st.Message())
}

// Handshake implements engine.PeerControl.
func (c *Client) Handshake(ctx context.Context, addr string) (*pb.PeerHandshakeResponse, error) {
	api, conn, err := c.api(addr)
	if err != nil {
		return nil, err
	}
	resp, err := api.Handshake(c.outgoing(ctx), &pb.PeerHandshakeRequest{})
	if err != nil {
		return nil, c.failed(addr, "handshake", conn, err)
	}
	return resp, nil
}

// OpenTransfer implements engine.PeerControl.
func (c *Client) OpenTransfer(ctx context.Context, addr string, req *pb.PeerOpenTransferRequest) (*pb.PeerOpenTransferResponse, error) {
	api, conn, err := c.api(addr)
	if err != nil {
		return nil, err
	}
	resp, err := api.OpenTransfer(c.outgoing(ctx), req)
	if err != nil {
		return nil, c.failed(addr, "open transfer", conn, err)
	}
	return resp, nil
}

// ReleaseTransfer implements engine.PeerControl.
func (c *Client) ReleaseTransfer(ctx context.Context, addr, handle string) error {
	api, conn, err := c.api(addr)
	if err != nil {
		return err
	}
	if _, err := api.ReleaseTransfer(c.outgoing(ctx), &pb.PeerReleaseTransferRequest{Handle: handle}); err != nil {
		return c.failed(addr, "release transfer", conn, err)
	}
	return nil
}

// Lookup asks the engine at addr how much of a prompt it holds
// (engine.Lookup). Errors map as the other calls' do.
func (c *Client) Lookup(ctx context.Context, addr string, req *pb.PeerLookupRequest) (*pb.PeerLookupResponse, error) {
	api, conn, err := c.api(addr)
	if err != nil {
		return nil, err
	}
	resp, err := api.Lookup(c.outgoing(ctx), req)
	if err != nil {
		return nil, c.failed(addr, "lookup", conn, err)
	}
	return resp, nil
}

// Read implements engine.PeerControl over the peer's validated stream.
func (c *Client) Read(ctx context.Context, addr, handle string, reads []engine.PeerShareRead) error {
	return c.streams.read(ctx, addr, handle, reads)
}

var _ engine.PeerControl = (*Client)(nil)
