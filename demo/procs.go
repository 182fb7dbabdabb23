package demo

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"time"
)

// process is one child the demo started. Its output goes to a log file so
// a failure can be explained by pointing at it.
type process struct {
	name    string
	cmd     *exec.Cmd
	logPath string
	hc      *http.Client  // reaches the process over HTTP (its network namespace's); no Timeout
	done    chan struct{} // closed when the process has exited
	err     error         // Wait's result, valid after done
}

// exited reports whether the process is gone, and why.
func (p *process) exited() (bool, error) {
	select {
	case <-p.done:
		return true, p.err
	default:
		return false, nil
	}
}

// group starts processes and guarantees they are stopped: stop terminates
// every one it started (SIGTERM to its process group, SIGKILL after the
// grace period), and Pdeathsig kills them even if the demo itself is
// killed with SIGKILL and never runs stop.
type group struct {
	logDir string
	mu     sync.Mutex
	procs  []*process
}

func newGroup(logDir string) *group { return &group{logDir: logDir} }

// start runs bin on this machine's network.
func (g *group) start(name, bin string, args ...string) (*process, error) {
	return g.startCmd(name, exec.Command(bin, args...), http.DefaultClient)
}

// startCmd starts cmd (built, not started; its output and SysProcAttr
// are set here) as name; hc is how the demo reaches it over HTTP (a
// client without Timeout: each call brings its own deadline).
func (g *group) startCmd(name string, cmd *exec.Cmd, hc *http.Client) (*process, error) {
	logPath := filepath.Join(g.logDir, name+".log")
	logFile, err := os.Create(logPath)
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logFile.Close()
		return nil, fmt.Errorf("start %s (%s): %w", name, cmd.Path, err)
	}
	p := &process{name: name, cmd: cmd, logPath: logPath, hc: hc, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		logFile.Close()
		close(p.done)
	}()
	g.mu.Lock()
	g.procs = append(g.procs, p)
	g.mu.Unlock()
	return p, nil
}

// stop ends every started process, newest first (routers before the
// backends they call): SIGTERM to its process group, SIGKILL after
// grace, and at most grace more for it to be reaped. A process still not
// gone then (stuck in the kernel) is left behind and named in the error
// rather than hanging the demo. It is safe to call more than once.
func (g *group) stop(grace time.Duration) error {
	g.mu.Lock()
	procs := g.procs
	g.procs = nil
	g.mu.Unlock()
	var errs []error
	for i := len(procs) - 1; i >= 0; i-- {
		p := procs[i]
		if done, _ := p.exited(); done {
			continue
		}
		_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGTERM)
		select {
		case <-p.done:
			continue
		case <-time.After(grace):
		}
		_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
		select {
		case <-p.done:
		case <-time.After(grace):
			errs = append(errs, fmt.Errorf("%s (pid %d) still running %s after SIGKILL; see %s", p.name, p.cmd.Process.Pid, grace, p.logPath))
		}
	}
	return errors.Join(errs...)
}

// pollHealth GETs url (with p's client, 1 s a try) every 50 ms until
// ready accepts an answer (status and body), the process exits, or the
// timeout passes. ready also returns what it saw, for the timeout's
// message.
func pollHealth(ctx context.Context, p *process, url string, timeout time.Duration,
	ready func(status int, body io.Reader) (bool, string)) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	last := "no answer"
	try := func() bool {
		tctx, cancel := context.WithTimeout(ctx, time.Second)
		defer cancel()
		req, _ := http.NewRequestWithContext(tctx, http.MethodGet, url, nil)
		resp, err := p.hc.Do(req)
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		ok, seen := ready(resp.StatusCode, io.LimitReader(resp.Body, 1<<20))
		last = seen
		return ok
	}
	for {
		if done, err := p.exited(); done {
			return fmt.Errorf("%s exited (%v); see %s", p.name, err, p.logPath)
		}
		if try() {
			return nil
		}
		select {
		case <-ctx.Done():
			if errors.Is(ctx.Err(), context.DeadlineExceeded) {
				return fmt.Errorf("%s not ready at %s after %s (last: %s); see %s", p.name, url, timeout, last, p.logPath)
			}
			return ctx.Err()
		case <-tick.C:
		}
	}
}

// waitHealthy waits until url answers 200.
func waitHealthy(ctx context.Context, p *process, url string, timeout time.Duration) error {
	return pollHealth(ctx, p, url, timeout, func(status int, _ io.Reader) (bool, string) {
		return status == http.StatusOK, fmt.Sprintf("status %d", status)
	})
}

// waitRouterReady waits until a `pegaflow serve` router's /health reports
// every backend healthy. A router polls its backends on its own schedule:
// one that polled a backend before that backend was up keeps it out until
// its next poll, so "every process answers /health" is not yet "the router
// will route".
func waitRouterReady(ctx context.Context, p *process, baseURL string, timeout time.Duration) error {
	return pollHealth(ctx, p, baseURL+"/health", timeout, func(status int, body io.Reader) (bool, string) {
		var health struct {
			Router map[string]map[string]bool `json:"router"`
		}
		if err := json.NewDecoder(body).Decode(&health); err != nil {
			return false, fmt.Sprintf("status %d, unreadable body: %v", status, err)
		}
		return allHealthy(health.Router), fmt.Sprintf("status %d, backends %v", status, health.Router)
	})
}

func allHealthy(pools map[string]map[string]bool) bool {
	if len(pools) == 0 {
		return false
	}
	for _, backends := range pools {
		if len(backends) == 0 {
			return false
		}
		for _, ok := range backends {
			if !ok {
				return false
			}
		}
	}
	return true
}

// freeAddrs reserves n loopback TCP addresses. The listeners are closed
// before the children bind them; on a quiet machine nothing takes a port in
// that window, and a child that loses the race fails its health wait with
// its log named.
func freeAddrs(n int) ([]string, error) {
	addrs := make([]string, 0, n)
	var lns []net.Listener
	defer func() {
		for _, ln := range lns {
			ln.Close()
		}
	}()
	for range n {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("reserve a port: %w", err)
		}
		lns = append(lns, ln)
		addrs = append(addrs, ln.Addr().String())
	}
	return addrs, nil
}
