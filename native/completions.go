package native

import (
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"unsafe"
)

/*
#include "pegaflow_native.h"
*/
import "C"

// Pending is a submitted batch.
type Pending struct {
	done chan struct{}
	err  error
	what string // names the batch in its error
}

// Done is closed when the batch has finished and its memory is free again.
func (p *Pending) Done() <-chan struct{} { return p.done }

// Err is the batch's outcome (nil, or wrapping ErrCopy, ErrPeer or
// ErrCanceled); valid after Done is closed.
func (p *Pending) Err() error { return p.err }

// completions is the notify pipe a native object (Copier, XferAgent)
// reports finished batches on: 16-byte pf_completion records read by one
// goroutine through Go's poller, so no OS thread blocks per batch. The
// native side holds the write end; close closes it only after the native
// object is gone, so every record is read before the reader stops at EOF.
type completions struct {
	readEnd *os.File
	writeFd int
	next    atomic.Uint64

	mu      sync.Mutex
	pending map[uint64]*Pending

	reader sync.WaitGroup
}

func newCompletions(name string) (*completions, error) {
	var fds [2]int
	if err := syscall.Pipe2(fds[:], syscall.O_CLOEXEC); err != nil {
		return nil, fmt.Errorf("%w: completion pipe: %w", ErrIO, err)
	}
	// Nonblocking read end: os.NewFile then registers it with the poller.
	if err := syscall.SetNonblock(fds[0], true); err != nil {
		syscall.Close(fds[0])
		syscall.Close(fds[1])
		return nil, fmt.Errorf("%w: completion pipe: %w", ErrIO, err)
	}
	return &completions{
		readEnd: os.NewFile(uintptr(fds[0]), name),
		writeFd: fds[1],
		pending: map[uint64]*Pending{},
	}, nil
}

// start begins reading once the native object owns the write end.
func (c *completions) start() {
	c.reader.Add(1)
	go c.read()
}

// abort closes both ends of a pipe that was never started.
func (c *completions) abort() {
	c.readEnd.Close()
	syscall.Close(c.writeFd)
}

// add registers a batch about to be submitted and returns its token.
func (c *completions) add(what string) (uint64, *Pending) {
	p := &Pending{done: make(chan struct{}), what: what}
	token := c.next.Add(1)
	c.mu.Lock()
	c.pending[token] = p
	c.mu.Unlock()
	return token, p
}

// drop forgets a batch whose submission failed (no record will come).
func (c *completions) drop(token uint64) {
	c.mu.Lock()
	delete(c.pending, token)
	c.mu.Unlock()
}

func (c *completions) read() {
	defer c.reader.Done()
	var buf [unsafe.Sizeof(C.pf_completion{})]byte
	for {
		if _, err := io.ReadFull(c.readEnd, buf[:]); err != nil {
			return // EOF: close closed the write end after the last batch
		}
		token := binary.NativeEndian.Uint64(buf[0:8])
		status := int64(binary.NativeEndian.Uint64(buf[8:16]))
		c.mu.Lock()
		p := c.pending[token]
		delete(c.pending, token)
		c.mu.Unlock()
		if p == nil {
			continue
		}
		if status != C.PF_OK {
			p.err = codeErr(status, p.what)
		}
		close(p.done)
	}
}

// close is called after the native object was destroyed (every record is
// in the pipe): it lets the reader drain to EOF, then closes the read end.
func (c *completions) close() error {
	syscall.Close(c.writeFd)
	c.reader.Wait()
	return c.readEnd.Close()
}
