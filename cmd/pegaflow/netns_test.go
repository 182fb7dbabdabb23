package main

import (
	"context"
	"io"
	"net/http"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/pegaflow/pegaflow/internal/netlab"
)

// twoHosts is the lab of the cross-host tests: netlab's two namespaces
// joined by a veth pair, host A at netlab.IPA, host B at netlab.IPB.
type twoHosts struct {
	a, b nsHost
}

// nsHost is one host of the lab, with the test's helpers.
type nsHost struct {
	netlab.Host
}

// newTwoHosts builds the pair, or skips the test (not root, no ip, no
// netns support); the cleanup deletes both namespaces (and so the veth).
func newTwoHosts(t *testing.T) *twoHosts {
	t.Helper()
	if err := netlab.Check(); err != nil {
		t.Skipf("multi-host proof: %v; run as root to include it", err)
	}
	lab, err := netlab.New(context.Background(), "pf")
	if err != nil {
		t.Skipf("multi-host proof: %v", err)
	}
	t.Cleanup(func() { require.NoError(t, lab.Close()) })
	return &twoHosts{a: nsHost{lab.A}, b: nsHost{lab.B}}
}

// sh runs a command in x's namespace and fails the test on error.
func (x nsHost) sh(t *testing.T, name string, args ...string) {
	t.Helper()
	require.NoError(t, x.Run(context.Background(), name, args...))
}

// start runs bin in x's namespace (the process is bin itself, so killing
// it kills bin).
func (x nsHost) start(t *testing.T, bin string, args ...string) *proc {
	t.Helper()
	return x.startEnv(t, nil, bin, args...)
}

// startEnv is start with env added to the process's environment.
func (x nsHost) startEnv(t *testing.T, env []string, bin string, args ...string) *proc {
	t.Helper()
	cmd := x.Command(bin, args...)
	cmd.Env = append(os.Environ(), env...)
	return startCmd(t, cmd)
}

// startCmd starts cmd, its stderr kept, killed when the test ends.
func startCmd(t *testing.T, cmd *exec.Cmd) *proc {
	t.Helper()
	p := &proc{cmd: cmd, logs: &lockedBuffer{}, done: make(chan struct{})}
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
// namespace (netlab.Host.DialContext).
func (x nsHost) client(timeout time.Duration) *http.Client { return x.HTTPClient(timeout) }

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
