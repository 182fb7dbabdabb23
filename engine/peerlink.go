package engine

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"

	"github.com/pegaflow/pegaflow/native"
)

// maxPeerLinks bounds the peers a reader keeps connected: source_engine
// comes from clients, so the cache must not grow with whatever they name.
const maxPeerLinks = 256

// xferState is the engine's UCX side, present iff Config.Peers is set:
// its agent, its pools registered once at New (mems[i] is e.pools[i]), and
// the links to peers it read from.
type xferState struct {
	agent *native.XferAgent
	mems  []*native.XferMem
	ctl   PeerControl
	log   *slog.Logger

	mu    sync.Mutex // guards links
	links map[string]*peerLink
}

// peerLink is a handshake with one peer at one epoch: the endpoint to its
// worker and its pools as remote regions (regions[i] is its pool i).
type peerLink struct {
	addr    string
	epoch   string
	xp      *native.XferPeer
	regions []native.RemoteRegion
}

func startXfer(pools []*pool, ctl PeerControl, log *slog.Logger) (*xferState, error) {
	agent, err := native.NewXferAgent()
	if err != nil {
		return nil, fmt.Errorf("start UCX transfer agent: %w", err)
	}
	x := &xferState{agent: agent, ctl: ctl, log: log, links: map[string]*peerLink{}}
	for _, p := range pools {
		m, err := agent.RegisterPool(p.mem)
		if err != nil {
			_ = agent.Close()
			return nil, fmt.Errorf("register pool on NUMA node %d with UCX: %w", p.node, err)
		}
		x.mems = append(x.mems, m)
	}
	return x, nil
}

// close closes every link and registration and the agent; the pools can
// be freed afterwards.
func (x *xferState) close() error {
	x.mu.Lock()
	clear(x.links)
	x.mu.Unlock()
	return x.agent.Close()
}

// link returns the cached link to addr or handshakes anew (a link whose
// endpoint failed is dropped first).
func (x *xferState) link(ctx context.Context, addr string) (*peerLink, error) {
	x.mu.Lock()
	l := x.links[addr]
	x.mu.Unlock()
	if l != nil {
		if l.xp.Err() == nil {
			return l, nil
		}
		x.drop(l)
	}
	hs, err := x.ctl.Handshake(ctx, addr)
	if err != nil {
		return nil, err
	}
	xp, err := x.agent.Connect(hs.WorkerAddress)
	if err != nil {
		return nil, fmt.Errorf("%w: connect to %s's UCX worker: %w", ErrPeerUnavailable, addr, err)
	}
	l = &peerLink{addr: addr, epoch: hs.Epoch, xp: xp}
	for i, p := range hs.Pools {
		r, err := xp.AddRemoteRegion(p.Rkey, p.Base, p.Size)
		if err != nil {
			go xp.Close()
			return nil, fmt.Errorf("%w: %s's pool %d: %w", ErrPeerUnavailable, addr, i, err)
		}
		l.regions = append(l.regions, r)
	}
	x.mu.Lock()
	defer x.mu.Unlock()
	if old := x.links[addr]; old != nil && old.xp.Err() == nil {
		go xp.Close() // a concurrent fetch handshook first
		return old, nil
	}
	if len(x.links) >= maxPeerLinks {
		for a, old := range x.links {
			delete(x.links, a)
			go old.xp.Close()
			break
		}
	}
	x.links[addr] = l
	x.log.Info("peer handshake", "peer", addr, "epoch", hs.Epoch, "pools", len(hs.Pools), "version", hs.EngineVersion)
	return l, nil
}

// drop forgets l (its peer failed or restarted) and closes its endpoint
// in the background: Close drains for up to a second.
func (x *xferState) drop(l *peerLink) {
	x.mu.Lock()
	if x.links[l.addr] == l {
		delete(x.links, l.addr)
	}
	x.mu.Unlock()
	go l.xp.Close()
}

// fetchFailureReasons are the values of
// pegaflow_engine_peer_fetch_failures_total{reason} (failureReason's).
func fetchFailureReasons() []string {
	return []string{"unreachable", "refused", "epoch", "missing", "deadline", "connection", "pool_full", "mismatch", "error"}
}

// failureReason classifies why a fetch ended short.
func failureReason(err error) string {
	switch {
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, context.Canceled):
		return "deadline"
	case errors.Is(err, ErrPeerEpoch):
		return "epoch"
	case errors.Is(err, native.ErrPeer):
		return "connection"
	case errors.Is(err, ErrPermission):
		return "refused"
	case errors.Is(err, ErrPeerUnavailable):
		return "unreachable"
	case errors.Is(err, errPeerMissing):
		return "missing"
	case errors.Is(err, errPoolFull):
		return "pool_full"
	case errors.Is(err, errPeerMismatch):
		return "mismatch"
	}
	return "error"
}
