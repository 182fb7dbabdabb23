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

// Release drops a lease and/or a transfer's pins.
func (e *Engine) Release(req *pb.ReleaseRequest) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if err := e.checkOpen(); err != nil {
		return err
	}
	if _, err := e.sessionLocked(req.SessionId); err != nil {
		return err
	}
	if req.LeaseId == "" && req.TransferId == "" {
		return invalid("release needs lease_id or transfer_id")
	}
	if req.LeaseId != "" {
		l, ok := e.leases[req.LeaseId]
		if !ok {
			return fmt.Errorf("%w: lease %q", ErrNotFound, req.LeaseId)
		}
		e.releaseLeaseLocked(req.LeaseId, l)
	}
	if req.TransferId != "" {
		e.releaseTransferLocked(req.TransferId)
	}
	return nil
}
