package engine

import (
	"fmt"

	pb "github.com/pegaflow/pegaflow/engine/api/pegaflowv1"
)

// DefaultBlockEventRing is the events a namespace's feed keeps by default
// (Config.BlockEventRing): about 6 MiB at most per namespace with 32-byte
// hashes, and seconds of history at a busy host's rate of seals and
// evictions, for readers that poll every scheduler step.
const DefaultBlockEventRing = 1 << 16

// MaxBlockEventsPerCall caps one BlockEvents answer (~100 bytes an event
// on the wire with 32-byte hashes, far below gRPC's message limit).
const MaxBlockEventsPerCall = 4096

// feedEvent is one entry of a namespace's block feed.
type feedEvent struct {
	seq   uint64
	kind  pb.BlockEventKind
	group uint32
	hash  string
}

// blockFeed is a namespace's bounded feed of block events: a ring of the
// last cap events, with gapless sequence numbers from 1. It records
// nothing until a reader first asks (active), so a deployment without KV
// events pays one branch per seal and eviction. A reader whose cursor
// fell off the ring is told so (gap) instead of silently missing events.
//
// Not safe for concurrent use: the engine calls it under e.mu, so the
// feed's order is the order in which blocks sealed and left the pool.
type blockFeed struct {
	active bool
	cap    int
	buf    []feedEvent // len <= cap; buf[start] is the oldest
	start  int
	next   uint64 // the seq of the next event
}

// add records an event if a reader ever asked for the feed.
func (f *blockFeed) add(kind pb.BlockEventKind, b *block) {
	if !f.active {
		return
	}
	ev := feedEvent{seq: f.next, kind: kind, group: b.g.index, hash: b.hash}
	f.next++
	if len(f.buf) < f.cap {
		f.buf = append(f.buf, ev)
		return
	}
	f.buf[f.start] = ev
	f.start = (f.start + 1) % f.cap
}

// read returns up to max events after seq `after` and the cursor that
// follows them; fresh starts now instead. gap: events after `after` were
// overwritten, or `after` was never handed out; the answer then starts at
// the oldest event held.
func (f *blockFeed) read(after uint64, fresh bool, max int) (evs []feedEvent, next uint64, gap bool) {
	if !f.active {
		f.active = true
		if f.next == 0 {
			f.next = 1
		}
		if f.cap <= 0 {
			f.cap = DefaultBlockEventRing
		}
	}
	last := f.next - 1
	if fresh {
		return nil, last, false
	}
	oldest := f.next - uint64(len(f.buf))
	if after > last || after+1 < oldest {
		gap = true
		after = oldest - 1
	}
	n := min(int(last-after), max)
	evs = make([]feedEvent, 0, n)
	first := int(after+1-oldest) + f.start
	for i := range n {
		evs = append(evs, f.buf[(first+i)%len(f.buf)])
	}
	return evs, after + uint64(n), gap
}

// BlockEvents answers a BlockEvents call: the namespace's events after the
// caller's cursor. Only a session that uses the namespace may read it:
// the feed says which blocks every instance of the namespace holds.
func (e *Engine) BlockEvents(req *pb.BlockEventsRequest) (*pb.BlockEventsResponse, error) {
	if len(req.Epoch) > 64 {
		return nil, fmt.Errorf("%w: epoch of %d bytes", ErrInvalid, len(req.Epoch))
	}
	max := int(req.MaxEvents)
	if max <= 0 || max > MaxBlockEventsPerCall {
		max = MaxBlockEventsPerCall
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	s, ns, err := e.sessionNamespaceLocked(req.SessionId, req.NamespaceId)
	if err != nil {
		return nil, err
	}
	if !s.uses(ns) {
		return nil, fmt.Errorf("%w: session %s does not use namespace %s (open it first)", ErrPermission, s.id, ns.id)
	}
	if ns.feed.cap == 0 {
		ns.feed.cap = e.cfg.BlockEventRing
	}
	resp := &pb.BlockEventsResponse{Epoch: e.epoch}
	// A cursor of another engine is void: start now.
	resp.Restarted = req.Epoch != "" && req.Epoch != e.epoch
	evs, next, gap := ns.feed.read(req.After, req.Epoch != e.epoch, max)
	resp.Next, resp.Gap = next, gap
	resp.Events = make([]*pb.BlockEvent, len(evs))
	for i, ev := range evs {
		resp.Events[i] = &pb.BlockEvent{Seq: ev.seq, Kind: ev.kind, Group: ev.group, Hash: []byte(ev.hash)}
	}
	if gap {
		e.stats.blockEventGaps++
	}
	return resp, nil
}

// sessionNamespaceLocked finds a call's session and namespace (open
// engine). Caller holds e.mu.
func (e *Engine) sessionNamespaceLocked(sessionID, nsID string) (*session, *namespace, error) {
	if err := e.checkOpen(); err != nil {
		return nil, nil, err
	}
	s, err := e.sessionLocked(sessionID)
	if err != nil {
		return nil, nil, err
	}
	ns, ok := e.namespaces[nsID]
	if !ok {
		return nil, nil, fmt.Errorf("%w: namespace %q", ErrNotFound, nsID)
	}
	return s, ns, nil
}
