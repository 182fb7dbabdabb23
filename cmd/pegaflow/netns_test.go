package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/pegaflow/pegaflow/internal/ids"
)

// twoHosts is two network namespaces joined by a veth pair: host A at
// 10.77.0.1/24 on veth A, host B at 10.77.0.2/24 on veth B. The addresses
// are fixed (each run's namespaces are its own, so runs never collide);
// the names are unique per run.
type twoHosts struct {
	a, b nsHost
}

// nsHost is one namespace and its end of the veth pair.
type nsHost struct {
	ns, veth, ip string
}

// newTwoHosts builds the pair, or skips the test (not root, no ip, no
// netns support); the cleanup deletes both namespaces (and so the veth).
func newTwoHosts(t *testing.T) *twoHosts {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("multi-host proof needs root (ip netns, veth); run as root to include it")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("multi-host proof needs iproute2's ip (ip netns, veth)")
	}
	sfx := ids.Hex(3)
	h := &twoHosts{
		a: nsHost{ns: "pfA-" + sfx, veth: "pfa" + sfx, ip: "10.77.0.1"},
		b: nsHost{ns: "pfB-" + sfx, veth: "pfb" + sfx, ip: "10.77.0.2"},
	}
	steps := [][]string{
		{"netns", "add", h.a.ns},
		{"netns", "add", h.b.ns},
		{"link", "add", h.a.veth, "type", "veth", "peer", "name", h.b.veth},
		{"link", "set", h.a.veth, "netns", h.a.ns},
		{"link", "set", h.b.veth, "netns", h.b.ns},
	}
	for _, x := range []nsHost{h.a, h.b} {
		steps = append(steps,
			[]string{"-n", x.ns, "link", "set", "lo", "up"},
			[]string{"-n", x.ns, "addr", "add", x.ip + "/24", "dev", x.veth},
			[]string{"-n", x.ns, "link", "set", x.veth, "up"})
	}
	t.Cleanup(func() {
		for _, ns := range []string{h.a.ns, h.b.ns} {
			_ = exec.Command("ip", "netns", "del", ns).Run()
		}
	})
	for _, s := range steps {
		if out, err := exec.Command("ip", s...).CombinedOutput(); err != nil {
			t.Skipf("multi-host proof: network namespace setup failed (ip %s: %v: %s)", strings.Join(s, " "), err, out)
		}
	}
	return h
}

// sh runs a command in x's namespace and fails the test on error.
func (x nsHost) sh(t *testing.T, name string, args ...string) {
	t.Helper()
	out, err := exec.Command("ip", append([]string{"netns", "exec", x.ns, name}, args...)...).CombinedOutput()
	require.NoError(t, err, "%s %s: %s", name, strings.Join(args, " "), out)
}

// addr is x's address with port.
func (x nsHost) addr(port int) string { return net.JoinHostPort(x.ip, strconv.Itoa(port)) }

// start runs bin in x's namespace (`ip netns exec` execs it: the process
// is bin itself, so killing it kills bin), UCX bound to x's veth.
func (x nsHost) start(t *testing.T, bin string, args ...string) *proc {
	t.Helper()
	p := &proc{logs: &lockedBuffer{}, done: make(chan struct{})}
	p.cmd = exec.Command("ip", append([]string{"netns", "exec", x.ns, bin}, args...)...)
	p.cmd.Env = append(os.Environ(), "UCX_TLS=tcp", "UCX_NET_DEVICES="+x.veth)
	p.cmd.Stderr = p.logs
	require.NoError(t, p.cmd.Start())
	go func() { _ = p.cmd.Wait(); close(p.done) }()
	t.Cleanup(p.kill)
	return p
}

// proc is one process of the lab.
type proc struct {
	cmd  *exec.Cmd
	logs *lockedBuffer
	done chan struct{}
}

func (p *proc) kill() {
	_ = p.cmd.Process.Kill()
	<-p.done
}

// client is an HTTP client whose connections are made inside x's
// namespace: each dial runs on an OS thread moved into it, which exits
// with its goroutine (never returned to the scheduler). A socket stays in
// the namespace it was created in.
func (x nsHost) client(timeout time.Duration) *http.Client {
	dial := func(ctx context.Context, network, addr string) (net.Conn, error) {
		type dialed struct {
			c   net.Conn
			err error
		}
		got := make(chan dialed, 1)
		go func() {
			runtime.LockOSThread() // no unlock: the thread ends with the goroutine
			fd, err := unix.Open("/var/run/netns/"+x.ns, unix.O_RDONLY|unix.O_CLOEXEC, 0)
			if err == nil {
				err = unix.Setns(fd, unix.CLONE_NEWNET)
				unix.Close(fd)
			}
			if err != nil {
				got <- dialed{nil, fmt.Errorf("enter netns %s: %w", x.ns, err)}
				return
			}
			var d net.Dialer
			c, err := d.DialContext(ctx, network, addr)
			got <- dialed{c, err}
		}()
		r := <-got
		return r.c, r.err
	}
	return &http.Client{Timeout: timeout, Transport: &http.Transport{DialContext: dial, MaxIdleConnsPerHost: 64}}
}

// metrics reads a /metrics page into sums per name (labels summed) and
// per name{labels}.
func metrics(t *testing.T, c *http.Client, addr string) map[string]float64 {
	t.Helper()
	resp, err := c.Get("http://" + addr + "/metrics")
	require.NoError(t, err)
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	out := map[string]float64{}
	for _, m := range metricLine.FindAllStringSubmatch(string(body), -1) {
		v, err := strconv.ParseFloat(m[3], 64)
		if err != nil {
			continue
		}
		out[m[1]] += v
		if m[2] != "" {
			out[m[1]+m[2]] = v
		}
	}
	return out
}

var metricLine = regexp.MustCompile(`(?m)^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$`)

// awaitHTTP waits until GET url answers 200 from inside x.
func (x nsHost) awaitHTTP(t *testing.T, url string, p *proc) {
	t.Helper()
	c := x.client(time.Second)
	require.Eventually(t, func() bool {
		resp, err := c.Get(url)
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	}, 20*time.Second, 25*time.Millisecond, "%s never answered 200: %s", url, p.logs)
}
