package engine

import (
	"fmt"
	"time"

	pb "github.com/pegaflow/pegaflow/engine/api/pegaflowv1"
)

// lease pins the blocks a Query hit until every rank loaded them.
type lease struct {
	session *session
	blocks  []*block
	ranks   uint64
	loaded  uint64
	expires time.Time
}

func (e *Engine) releaseLeaseLocked(id string, l *lease) {
	for _, b := range l.blocks {
		e.unpinLocked(b)
	}
	l.blocks = nil
	delete(e.leases, id)
	delete(l.session.leases, id)
}

// Release drops a lease and/or a transfer's pins. A lease may be released
// only by the session that took it, and a transfer only by a session that
// works in the transfer's namespace (session.uses: the decode side that
// queries and loads it, or its producer): a client cannot blindly unpin
// another namespace's transfers.
// Either refusal is NotFound, as for an unknown id, so ids of others'
// leases and transfers cannot be probed.
func (e *Engine) Release(req *pb.ReleaseRequest) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if err := e.checkOpen(); err != nil {
		return err
	}
	s, err := e.sessionLocked(req.SessionId)
	if err != nil {
		return err
	}
	if err := validateRelease(req); err != nil {
		return err
	}
	if req.LeaseId != "" {
		l, ok := e.leases[req.LeaseId]
		if !ok || l.session != s {
			return fmt.Errorf("%w: lease %q", ErrNotFound, req.LeaseId)
		}
		e.releaseLeaseLocked(req.LeaseId, l)
	}
	if req.TransferId != "" {
		if t, ok := e.transfers[req.TransferId]; ok && t.ns != nil && !s.uses(t.ns) {
			return fmt.Errorf("%w: transfer %q", ErrNotFound, req.TransferId)
		}
		e.releaseTransferLocked(req.TransferId)
	}
	return nil
}
