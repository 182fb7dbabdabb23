package engine

import "github.com/pegaflow/pegaflow/native"

// The SSD tier's I/O (ssdtier.go): ops cut to the native layer's bounds,
// batches submitted and waited for, and the tests' fault injection.

// appendSSDOps appends the ops moving n bytes between fileOff and
// poolOff, cut at the native layer's largest op.
func appendSSDOps(ops []native.SSDOp, fileOff, poolOff, n uint64) []native.SSDOp {
	for n > 0 {
		l := min(n, uint64(native.MaxSSDOpLen))
		ops = append(ops, native.SSDOp{FileOffset: fileOff, PoolOffset: poolOff, Len: l})
		fileOff, poolOff, n = fileOff+l, poolOff+l, n-l
	}
	return ops
}

// ssdIO is ops on one file submitted as native batches of at most
// native.MaxSSDOps; wait returns the first error (a submit's or an
// I/O's) once every batch that started has ended.
type ssdIO struct {
	started []*native.Pending
	err     error
}

func (t *ssdTier) submit(eng *native.SSDEngine, f *native.SSDFile, write bool, ops []native.SSDOp) *ssdIO {
	io := &ssdIO{}
	op := "read"
	if write {
		op = "write"
	}
	if io.err = t.injected(op); io.err != nil {
		return io
	}
	for len(ops) > 0 {
		n := min(len(ops), native.MaxSSDOps)
		p, err := eng.Submit(f, write, ops[:n])
		if err != nil {
			io.err = err
			return io
		}
		io.started = append(io.started, p)
		ops = ops[n:]
	}
	return io
}

func (io *ssdIO) wait() error {
	err := io.err
	for _, p := range io.started {
		<-p.Done()
		if perr := p.Err(); err == nil {
			err = perr
		}
	}
	return err
}

func (t *ssdTier) injected(op string) error {
	t.mu.Lock()
	f := t.fault
	t.mu.Unlock()
	if f == nil {
		return nil
	}
	return f(op)
}

func (t *ssdTier) setFault(f func(op string) error) {
	t.mu.Lock()
	t.fault = f
	t.mu.Unlock()
}
