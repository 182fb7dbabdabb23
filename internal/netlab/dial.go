package netlab

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"runtime"
	"time"

	"golang.org/x/sys/unix"
)

// DialContext connects from inside h's namespace, for a caller that runs
// outside it (a test, the demo). The socket is created on an OS thread
// moved into the namespace with setns and stays in that namespace for its
// life; the thread moves back before it is returned to the scheduler.
// Should moving back fail, the thread stays locked and exits with its
// goroutine instead, so no other goroutine ever runs in h's namespace
// (a thread's exit fires Pdeathsig for children it started, see
// go.dev/issue/27505: it only happens on that failure). Go creates new
// threads from a template thread while one is locked, so none inherit h's
// namespace.
func (h Host) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	type dialed struct {
		c   net.Conn
		err error
	}
	got := make(chan dialed, 1)
	go func() {
		c, err := h.dialLocked(ctx, network, addr)
		got <- dialed{c, err}
	}()
	r := <-got
	return r.c, r.err
}

// dialLocked runs on a goroutine of its own: it locks its thread and
// unlocks it only while the thread is in its original namespace.
func (h Host) dialLocked(ctx context.Context, network, addr string) (net.Conn, error) {
	runtime.LockOSThread()
	orig, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		runtime.UnlockOSThread()
		return nil, fmt.Errorf("netns of this thread: %w", err)
	}
	defer unix.Close(orig)
	target, err := unix.Open(nsPath(h.NS), unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err == nil {
		err = unix.Setns(target, unix.CLONE_NEWNET)
		unix.Close(target)
	}
	if err != nil {
		runtime.UnlockOSThread() // setns failed or never ran: still in the original namespace
		return nil, fmt.Errorf("enter netns %s: %w", h.NS, err)
	}
	var d net.Dialer
	c, err := d.DialContext(ctx, network, addr)
	if rerr := unix.Setns(orig, unix.CLONE_NEWNET); rerr == nil {
		runtime.UnlockOSThread()
	} // else: stay locked, the thread ends with this goroutine
	return c, err
}

// HTTPClient is an HTTP client whose connections are dialled inside h's
// namespace (DialContext), with timeout as its Client.Timeout (0: none).
func (h Host) HTTPClient(timeout time.Duration) *http.Client {
	return &http.Client{Timeout: timeout, Transport: &http.Transport{DialContext: h.DialContext, MaxIdleConnsPerHost: 64}}
}
