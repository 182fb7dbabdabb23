package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"time"
)

// engineProc is one `pegaflow serve` with a peer address, started by this
// benchmark and killed by stop.
type engineProc struct {
	name     string
	cmd      *exec.Cmd
	sock     string
	httpAddr string
	peerAddr string
	logPath  string
	done     chan struct{}
}

// engineArgs is the command line of one engine (printed by -dry-run).
// allow is the one peer it may fetch from (--peer-allow), "" for none;
// transport is its --peer-transport.
func engineArgs(sock, httpAddr, peerAddr, tokenFile, allow, transport string, poolMiB int) []string {
	args := []string{"serve", "--socket", sock, "--http-addr", httpAddr, "--pool-size", fmt.Sprintf("%dMiB", poolMiB),
		"--peer-addr", peerAddr, "--peer-token-file", tokenFile, "--peer-transport", transport, "--log-level", "warn"}
	if allow != "" {
		args = append(args, "--peer-allow", allow)
	}
	return args
}

// freePort returns a TCP port on host that was free a moment ago.
func freePort(host string) (int, error) {
	lis, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		return 0, fmt.Errorf("free port on %s: %w", host, err)
	}
	defer lis.Close()
	return lis.Addr().(*net.TCPAddr).Port, nil
}

func freeAddr(host string) (string, error) {
	p, err := freePort(host)
	if err != nil {
		return "", err
	}
	return net.JoinHostPort(host, strconv.Itoa(p)), nil
}

// startEngine starts one engine and waits until its HTTP health answers
// and its peer port accepts connections. Its stderr goes to dir/name.log.
func startEngine(ctx context.Context, bin, dir, name, host, tokenFile, allow, transport string, poolMiB int) (*engineProc, error) {
	httpAddr, err := freeAddr("127.0.0.1")
	if err != nil {
		return nil, err
	}
	peerAddr, err := freeAddr(host)
	if err != nil {
		return nil, err
	}
	p := &engineProc{name: name, sock: filepath.Join(dir, name+".sock"), httpAddr: httpAddr, peerAddr: peerAddr,
		logPath: filepath.Join(dir, name+".log"), done: make(chan struct{})}
	logf, err := os.Create(p.logPath)
	if err != nil {
		return nil, err
	}
	defer logf.Close() // the child holds its own descriptor
	p.cmd = exec.Command(bin, engineArgs(p.sock, httpAddr, peerAddr, tokenFile, allow, transport, poolMiB)...)
	p.cmd.Stdout, p.cmd.Stderr = logf, logf
	if err := p.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start engine %s: %w", name, err)
	}
	go func() { _ = p.cmd.Wait(); close(p.done) }()
	deadline := time.Now().Add(30 * time.Second)
	for !p.ready() {
		select {
		case <-p.done:
			return nil, fmt.Errorf("engine %s exited: %s", name, p.logTail())
		case <-ctx.Done():
			p.stop()
			return nil, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			p.stop()
			return nil, fmt.Errorf("engine %s never became healthy: %s", name, p.logTail())
		}
	}
	return p, nil
}

func (p *engineProc) ready() bool {
	resp, err := http.Get("http://" + p.httpAddr + "/health")
	if err != nil {
		return false
	}
	resp.Body.Close()
	c, err := net.Dial("tcp", p.peerAddr)
	if err != nil {
		return false
	}
	c.Close()
	return resp.StatusCode == http.StatusOK
}

func (p *engineProc) stop() {
	_ = p.cmd.Process.Kill()
	<-p.done
}

func (p *engineProc) logTail() string {
	b, _ := os.ReadFile(p.logPath)
	if len(b) > 2000 {
		b = b[len(b)-2000:]
	}
	return string(b)
}

// peerMetrics are the engine's fetch counters at one moment.
type peerMetrics struct {
	bytes, seconds, fetches float64
}

// metrics scrapes the engine's peer-fetch counters.
func (p *engineProc) metrics() (peerMetrics, error) {
	resp, err := http.Get("http://" + p.httpAddr + "/metrics")
	if err != nil {
		return peerMetrics{}, fmt.Errorf("engine %s metrics: %w", p.name, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return peerMetrics{}, fmt.Errorf("engine %s metrics: %w", p.name, err)
	}
	return parsePeerMetrics(body), nil
}

// parsePeerMetrics reads the peer-fetch counters out of a Prometheus text
// exposition; an absent metric reads 0 (nothing fetched yet).
func parsePeerMetrics(body []byte) peerMetrics {
	return peerMetrics{
		bytes:   metricValue(body, "pegaflow_engine_peer_fetch_bytes_total"),
		seconds: metricValue(body, "pegaflow_engine_peer_fetch_duration_seconds_sum"),
		fetches: metricValue(body, "pegaflow_engine_peer_fetch_duration_seconds_count"),
	}
}

func metricValue(body []byte, name string) float64 {
	m := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(name) + ` (\S+)$`).FindSubmatch(body)
	if m == nil {
		return 0
	}
	v, err := strconv.ParseFloat(string(m[1]), 64)
	if err != nil {
		return 0
	}
	return v
}
