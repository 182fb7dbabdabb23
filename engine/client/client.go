// Package client is the Go client of the engine API. A Client holds one
// session: the engine releases everything it registered or leased when the
// client closes or its process dies.
package client

import (
	"context"
	"errors"
	"fmt"
	"net"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	pb "github.com/pegaflow/pegaflow/engine/api/pegaflowv1"
)

// Client talks to one engine over its UNIX socket. Safe for concurrent use.
type Client struct {
	conn    *grpc.ClientConn
	api     pb.EngineClient
	session string
	backend string
	// peerAddress is the Attach event's peer_address.
	peerAddress string
	cancel      context.CancelFunc
	ended       chan struct{}
}

// Dial connects to the engine at socketPath and opens a session. ctx bounds
// the connection and the session handshake.
func Dial(ctx context.Context, socketPath, clientName string) (*Client, error) {
	conn, err := grpc.NewClient("unix://"+socketPath,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socketPath)
		}),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(64<<20), grpc.MaxCallSendMsgSize(64<<20)),
		grpc.WithInitialWindowSize(4<<20),
		grpc.WithInitialConnWindowSize(8<<20),
		grpc.WithReadBufferSize(256<<10),
		grpc.WithWriteBufferSize(256<<10),
	)
	if err != nil {
		return nil, fmt.Errorf("engine client %s: %w", socketPath, err)
	}
	api := pb.NewEngineClient(conn)
	sessCtx, cancel := context.WithCancel(context.Background())
	// ctx bounds the handshake only; the session then lives until Close.
	stopBound := context.AfterFunc(ctx, cancel)
	stream, err := api.Attach(sessCtx, &pb.AttachRequest{ClientName: clientName}, grpc.WaitForReady(true))
	if err != nil {
		cancel()
		conn.Close()
		return nil, fmt.Errorf("attach to engine %s: %w", socketPath, err)
	}
	type first struct {
		ev  *pb.SessionEvent
		err error
	}
	got := make(chan first, 1)
	go func() {
		ev, err := stream.Recv()
		got <- first{ev, err}
	}()
	var ev *pb.SessionEvent
	select {
	case f := <-got:
		ev, err = f.ev, f.err
	case <-ctx.Done():
		err = ctx.Err()
	}
	if err == nil && !stopBound() {
		err = ctx.Err()
	}
	if err != nil {
		cancel()
		conn.Close()
		return nil, fmt.Errorf("attach to engine %s: %w", socketPath, err)
	}
	c := &Client{conn: conn, api: api, session: ev.SessionId, backend: ev.Backend, peerAddress: ev.PeerAddress,
		cancel: cancel, ended: make(chan struct{})}
	go func() {
		// The stream carries no further events; it ends with the session.
		for {
			if _, err := stream.Recv(); err != nil {
				close(c.ended)
				return
			}
		}
	}()
	return c, nil
}

// ErrSessionEnded is returned after the engine dropped this client's session.
var ErrSessionEnded = errors.New("engine session ended")

// SessionID is the session every call carries.
func (c *Client) SessionID() string { return c.session }

// Backend is the engine's copy backend ("cpu" or "cuda").
func (c *Client) Backend() string { return c.backend }

// PeerAddress is where other engines reach this engine's peer API (a
// prefill side's pegaflow_source_engine); empty when it serves no peers.
func (c *Client) PeerAddress() string { return c.peerAddress }

// Ended is closed when the session is gone (engine exit or Close).
func (c *Client) Ended() <-chan struct{} { return c.ended }

// OpenNamespace resolves a namespace to its id.
func (c *Client) OpenNamespace(ctx context.Context, ns *pb.Namespace) (string, error) {
	resp, err := c.api.OpenNamespace(ctx, &pb.OpenNamespaceRequest{SessionId: c.session, Namespace: ns})
	if err != nil {
		return "", err
	}
	return resp.NamespaceId, nil
}

// Register registers one rank's KV memory; SessionId is filled in.
func (c *Client) Register(ctx context.Context, req *pb.RegisterRequest) (*pb.RegisterResponse, error) {
	req.SessionId = c.session
	return c.api.Register(ctx, req)
}

// Unregister drops a registration.
func (c *Client) Unregister(ctx context.Context, req *pb.UnregisterRequest) error {
	req.SessionId = c.session
	_, err := c.api.Unregister(ctx, req)
	return err
}

// Save copies blocks into the engine; it returns when the copy is done.
func (c *Client) Save(ctx context.Context, req *pb.SaveRequest) (*pb.SaveResponse, error) {
	req.SessionId = c.session
	return c.api.Save(ctx, req)
}

// Load copies sealed blocks into the caller's memory.
func (c *Client) Load(ctx context.Context, req *pb.LoadRequest) (*pb.LoadResponse, error) {
	req.SessionId = c.session
	return c.api.Load(ctx, req)
}

// Query returns the sealed prefix of the hashes.
func (c *Client) Query(ctx context.Context, req *pb.QueryRequest) (*pb.QueryResponse, error) {
	req.SessionId = c.session
	return c.api.Query(ctx, req)
}

// Release drops a lease or a transfer pin.
func (c *Client) Release(ctx context.Context, req *pb.ReleaseRequest) error {
	req.SessionId = c.session
	_, err := c.api.Release(ctx, req)
	return err
}

// Health asks whether the engine serves.
func (c *Client) Health(ctx context.Context) (*pb.HealthResponse, error) {
	return c.api.Health(ctx, &pb.HealthRequest{})
}

// Stats returns the engine's counters.
func (c *Client) Stats(ctx context.Context) (*pb.StatsResponse, error) {
	return c.api.Stats(ctx, &pb.StatsRequest{})
}

// Close ends the session and the connection.
func (c *Client) Close() error {
	c.cancel()
	select {
	case <-c.ended:
	case <-time.After(time.Second):
	}
	return c.conn.Close()
}
