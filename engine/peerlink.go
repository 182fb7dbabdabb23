package engine

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"

	pb "github.com/pegaflow/pegaflow/engine/api/pegaflowv1"
	"github.com/pegaflow/pegaflow/native"
)

// maxPeerLinks bounds the peers a reader keeps connected: source_engine
// comes from clients, so the cache must not grow with whatever they name.
const maxPeerLinks = 256

// peerState is the engine's cross-host side, present iff Config.Peers is
// set: the control plane, the links to peers it read from, and, with
// PeerTransportRDMA only, the UCX agent.
type peerState struct {
	ctl       PeerControl
	log       *slog.Logger
	transport string
	ucx       *xferState // nil unless PeerTransportRDMA

	mu    sync.Mutex // guards links
	links map[string]*peerLink
}

// xferState is the UCX agent and the pools registered with it once at New
// (mems[i] is e.pools[i]), remote-read-only.
type xferState struct {
	agent *native.XferAgent
	mems  []*native.XferMem
}

// peerLink is a handshake with one peer at one epoch and how its bytes are
// read: xp nil, the peer's validated stream (PeerControl.Read); else the
// endpoint to its UCX worker and its pools as remote regions (regions[i]
// is its pool i).
type peerLink struct {
	addr    string
	epoch   string
	xp      *native.XferPeer
	regions []native.RemoteRegion
}

// usable is false once the link's UCX endpoint failed.
func (l *peerLink) usable() bool { return l.xp == nil || l.xp.Err() == nil }

func (l *peerLink) close() {
	if l.xp != nil {
		go l.xp.Close() // Close drains for up to a second
	}
}

func startPeers(pools []*pool, cfg *Config, log *slog.Logger) (*peerState, error) {
	getenv := os.Getenv
	if cfg.ucxOverTCP {
		getenv = func(string) string { return "rc" }
	}
	if err := CheckPeerTransport(cfg.PeerTransport, getenv); err != nil {
		return nil, err
	}
	ps := &peerState{ctl: cfg.Peers, log: log, transport: cfg.PeerTransport, links: map[string]*peerLink{}}
	if ps.transport != PeerTransportRDMA {
		return ps, nil
	}
	agent, err := native.NewXferAgent()
	if err != nil {
		return nil, fmt.Errorf("start UCX transfer agent: %w", err)
	}
	x := &xferState{agent: agent}
	for _, p := range pools {
		m, err := agent.RegisterPool(p.mem)
		if err != nil {
			_ = agent.Close()
			return nil, fmt.Errorf("register pool on NUMA node %d with UCX: %w", p.node, err)
		}
		x.mems = append(x.mems, m)
	}
	ps.ucx = x
	log.Info("UCX one-sided reads (RDMA)", "UCX_TLS", os.Getenv("UCX_TLS"), "UCX_NET_DEVICES", os.Getenv("UCX_NET_DEVICES"),
		"pools", len(x.mems), "remote_write", false)
	return ps, nil
}

// close closes every link and, with UCX, its registrations and agent; the
// pools can be freed afterwards.
func (ps *peerState) close() error {
	ps.mu.Lock()
	clear(ps.links)
	ps.mu.Unlock()
	if ps.ucx == nil {
		return nil
	}
	return ps.ucx.agent.Close()
}

// link returns the cached link to addr or handshakes anew (a link whose
// endpoint failed is dropped first). With UCX, a peer that exports no
// worker (a --peer-transport=tcp engine) is read over its stream.
func (ps *peerState) link(ctx context.Context, addr string) (*peerLink, error) {
	ps.mu.Lock()
	l := ps.links[addr]
	ps.mu.Unlock()
	if l != nil {
		if l.usable() {
			return l, nil
		}
		ps.drop(l)
	}
	hs, err := ps.ctl.Handshake(ctx, addr)
	if err != nil {
		return nil, err
	}
	l = &peerLink{addr: addr, epoch: hs.Epoch}
	if ps.ucx != nil && len(hs.WorkerAddress) > 0 {
		if err := ps.connectUCX(l, hs); err != nil {
			return nil, err
		}
	}
	ps.mu.Lock()
	defer ps.mu.Unlock()
	if old := ps.links[addr]; old != nil && old.usable() {
		l.close() // a concurrent fetch handshook first
		return old, nil
	}
	if len(ps.links) >= maxPeerLinks {
		for a, old := range ps.links {
			delete(ps.links, a)
			old.close()
			break
		}
	}
	ps.links[addr] = l
	ps.log.Info("peer handshake", "peer", addr, "epoch", hs.Epoch, "ucx", l.xp != nil, "version", hs.EngineVersion)
	return l, nil
}

func (ps *peerState) connectUCX(l *peerLink, hs *pb.PeerHandshakeResponse) error {
	xp, err := ps.ucx.agent.Connect(hs.WorkerAddress)
	if err != nil {
		return fmt.Errorf("%w: connect to %s's UCX worker: %w", ErrPeerUnavailable, l.addr, err)
	}
	for i, p := range hs.Pools {
		r, err := xp.AddRemoteRegion(p.Rkey, p.Base, p.Size)
		if err != nil {
			go xp.Close()
			return fmt.Errorf("%w: %s's pool %d: %w", ErrPeerUnavailable, l.addr, i, err)
		}
		l.regions = append(l.regions, r)
	}
	l.xp = xp
	return nil
}

// drop forgets l (its peer failed or restarted) and closes its endpoint
// in the background.
func (ps *peerState) drop(l *peerLink) {
	ps.mu.Lock()
	if ps.links[l.addr] == l {
		delete(ps.links, l.addr)
	}
	ps.mu.Unlock()
	l.close()
}

// fetchFailureReasons are the values of
// pegaflow_engine_peer_fetch_failures_total{reason} (failureReason's).
func fetchFailureReasons() []string {
	return []string{"unreachable", "refused", "epoch", "missing", "deadline", "connection", "pool_full", "mismatch", "copy_budget", "error"}
}

// failureReason classifies why a fetch ended short.
func failureReason(err error) string {
	switch {
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, context.Canceled):
		return "deadline"
	case errors.Is(err, ErrPeerEpoch):
		return "epoch"
	case errors.Is(err, native.ErrPeer), errors.Is(err, ErrPeerConnection):
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
	case errors.Is(err, errCopyBudget):
		return "copy_budget"
	}
	return "error"
}
