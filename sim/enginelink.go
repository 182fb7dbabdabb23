package sim

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"time"

	pb "github.com/pegaflow/pegaflow/engine/api/pegaflowv1"
	"github.com/pegaflow/pegaflow/engine/client"
)

// errNoEngine is returned while the sim holds no engine session.
var errNoEngine = errors.New("not connected to the KV engine")

// engineLink keeps one engine session with the KV cache registered, and
// re-dials and re-registers when the session ends (engine restart), as a
// vLLM worker's connector would on restart.
type engineLink struct {
	socket     string
	instanceID string
	ns         *pb.Namespace
	kv         *kvCache
	log        *slog.Logger

	mu   sync.Mutex
	c    *client.Client
	nsID string
}

func (e *engineLink) get() (*client.Client, string, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.c == nil {
		return nil, "", errNoEngine
	}
	return e.c, e.nsID, nil
}

// peerAddress is the connected engine's peer address ("" when it serves
// no peers or no engine is connected).
func (e *engineLink) peerAddress() string {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.c == nil {
		return ""
	}
	return e.c.PeerAddress()
}

func (e *engineLink) connected() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.c != nil
}

// run connects, registers, and reconnects until ctx ends; it then
// unregisters and closes the session.
func (e *engineLink) run(ctx context.Context) {
	backoff := 100 * time.Millisecond
	for ctx.Err() == nil {
		c, nsID, err := e.connect(ctx)
		if err != nil {
			if ctx.Err() == nil {
				e.log.Warn("engine connection failed; retrying", "socket", e.socket, "in", backoff, "err", err)
			}
			select {
			case <-time.After(backoff):
			case <-ctx.Done():
			}
			backoff = min(2*backoff, 5*time.Second)
			continue
		}
		backoff = 100 * time.Millisecond
		e.mu.Lock()
		e.c, e.nsID = c, nsID
		e.mu.Unlock()
		e.log.Info("registered with the KV engine", "socket", e.socket, "session", c.SessionID(), "namespace", nsID, "instance", e.instanceID)
		select {
		case <-c.Ended():
			e.log.Warn("engine session ended; reconnecting", "socket", e.socket)
		case <-ctx.Done():
			uctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			if err := c.Unregister(uctx, &pb.UnregisterRequest{InstanceId: e.instanceID, Rank: 0}); err != nil {
				e.log.Debug("unregister", "err", err)
			}
			cancel()
		}
		e.mu.Lock()
		e.c, e.nsID = nil, ""
		e.mu.Unlock()
		c.Close()
	}
}

func (e *engineLink) connect(ctx context.Context) (*client.Client, string, error) {
	dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	// A cheap probe first: client.Dial's session stream waits for the
	// socket to accept, beyond its ctx, when no engine listens.
	var d net.Dialer
	probe, err := d.DialContext(dctx, "unix", e.socket)
	if err != nil {
		return nil, "", err
	}
	probe.Close()
	type dialed struct {
		c   *client.Client
		err error
	}
	got := make(chan dialed, 1)
	go func() {
		c, err := client.Dial(dctx, e.socket, "pegaflow-sim "+e.instanceID)
		got <- dialed{c, err}
	}()
	var c *client.Client
	select {
	case r := <-got:
		if r.err != nil {
			return nil, "", r.err
		}
		c = r.c
	case <-dctx.Done():
		// The engine vanished between probe and dial; close the session
		// if the dial ever completes.
		go func() {
			if r := <-got; r.c != nil {
				r.c.Close()
			}
		}()
		return nil, "", fmt.Errorf("attach to engine %s: %w", e.socket, dctx.Err())
	}
	// The engine opens the files by name while it registers them, and
	// then holds its own mapping: they are named for that long only.
	var resp *pb.RegisterResponse
	err = e.kv.named(func() error {
		var rerr error
		resp, rerr = c.Register(dctx, e.kv.RegisterRequest(e.instanceID, 0, e.ns))
		return rerr
	})
	if err != nil {
		c.Close()
		return nil, "", fmt.Errorf("register: %w", err)
	}
	return c, resp.NamespaceId, nil
}
