package demo

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"

	"github.com/pegaflow/pegaflow/bench"
	"github.com/pegaflow/pegaflow/internal/ids"
	"github.com/pegaflow/pegaflow/internal/netlab"
)

// twoHostsName is the cross-host P/D setup's row.
const twoHostsName = "P/D 2 hosts"

// NetlabPrefix names the demo's namespaces (pfdA-<hex>, pfdB-<hex>): a
// demo killed with SIGKILL, the one exit that runs no cleanup, leaves
// them behind under this name.
const NetlabPrefix = "pfd"

// Ports inside the lab. Each lab's namespaces are new and its own, so
// fixed ports never collide with anything.
const (
	labRouterPort = 8080 // engine A + router, on A
	labEnginePort = 8081 // engine B's /metrics, on B
	labSimPort    = 8100 // P on A, D on B
	labPeerPort   = 7400 // both engines' peer API
)

// runTwoHosts measures P/D on this machine, as Run's P/D, then P/D across
// two network namespaces, one setup after the other (so neither shares
// the CPUs with the other's idle processes).
func runTwoHosts(ctx context.Context, cfg Config, progress io.Writer, logDir string) (*Report, error) {
	rep := &Report{PD: Setup{Name: pdName}, TwoHosts: Setup{Name: twoHostsName}}
	if err := runSameHostPD(ctx, cfg, progress, logDir, rep); err != nil {
		return rep, err
	}
	return rep, runCrossHostPD(ctx, cfg, progress, logDir, rep)
}

// runSameHostPD is Run's P/D setup alone; it fills rep.PD and rep.Engine
// and stops its processes before it returns.
func runSameHostPD(ctx context.Context, cfg Config, progress io.Writer, logDir string, rep *Report) error {
	g := newGroup(logDir)
	defer g.stop(cfg.StopGrace)
	addrs, err := freeAddrs(3)
	if err != nil {
		return err
	}
	router, p, d := addrs[0], addrs[1], addrs[2]
	sock := filepath.Join(cfg.WorkDir, "engine.sock")
	_ = os.Remove(sock)
	if err := startAll(ctx, g, cfg, pdSpecs(cfg, sock, router, p, d), progress, logDir); err != nil {
		return err
	}
	rep.PD.Result, rep.Engine, err = measurePD(ctx, cfg, progress, rep.PD.Name, http.DefaultClient, "http://"+router,
		sameHostProbe(http.DefaultClient, "http://"+router, "http://"+d))
	return err
}

// runCrossHostPD builds the lab, runs P/D across it and tears it down:
// on A engine A (with the router, in one `serve`) and the P sim, on B
// engine B and the D sim. D's engine fetches what P saved from engine A
// over the validated stream (TCP on the veth). It fills rep.TwoHosts and rep.TwoHostsEngine.
// The processes are stopped before the namespaces are deleted, on every
// return.
func runCrossHostPD(ctx context.Context, cfg Config, progress io.Writer, logDir string, rep *Report) (err error) {
	lab, err := netlab.New(ctx, NetlabPrefix)
	if err != nil {
		return err
	}
	defer func() { err = errors.Join(err, lab.Close()) }()
	fmt.Fprintf(progress, "demo: two hosts: namespaces %s (%s) and %s (%s), veth %s-%s\n",
		lab.A.NS, lab.A.IP, lab.B.NS, lab.B.IP, lab.A.Veth, lab.B.Veth)
	g := newGroup(logDir)
	defer func() { err = errors.Join(err, g.stop(cfg.StopGrace)) }() // runs before lab.Close

	token := filepath.Join(cfg.WorkDir, "peer-token")
	if err := os.WriteFile(token, []byte(ids.Hex(32)+"\n"), 0o600); err != nil {
		return fmt.Errorf("peer token: %w", err)
	}
	sockA, sockB := filepath.Join(cfg.WorkDir, "engine-a.sock"), filepath.Join(cfg.WorkDir, "engine-b.sock")
	_, _ = os.Remove(sockA), os.Remove(sockB)
	a, b := &lab.A, &lab.B
	router, engineB := a.Addr(labRouterPort), b.Addr(labEnginePort)
	p, d := a.Addr(labSimPort), b.Addr(labSimPort)
	specs := []spec{
		// The router's /kv_ready is derived from its --http-addr and is
		// where engine A may post (serve's default --kv-ready-allow).
		{name: "engine+router-a", addr: router, router: true, host: a, args: []string{"serve", "--socket", sockA,
			"--http-addr", router, "--pool-size", cfg.PoolSize, "--peer-addr", a.Addr(labPeerPort), "--peer-token-file", token,
			"--prefill", "http://" + p, "--decode", "http://" + d,
			"--health-interval", routerHealthInterval, "--log-level", "warn"}},
		{name: "engine-b", addr: engineB, host: b, args: []string{"serve", "--socket", sockB,
			"--http-addr", engineB, "--pool-size", cfg.PoolSize, "--peer-addr", b.Addr(labPeerPort), "--peer-token-file", token,
			"--peer-allow", a.Addr(labPeerPort), "--log-level", "warn"}},
		{name: "sim-p-a", addr: p, host: a, args: simArgs(cfg, p, "--engine-socket", sockA, "--instance-id", "p0")},
		{name: "sim-d-b", addr: d, host: b, args: simArgs(cfg, d, "--engine-socket", sockB, "--instance-id", "d0")},
	}
	if err := startAll(ctx, g, cfg, specs, progress, logDir); err != nil {
		return err
	}
	hcA, hcB := a.HTTPClient(0), b.HTTPClient(0)
	read := func(ctx context.Context) (pdSamples, error) {
		var s pdSamples
		var err error
		if s.saver, err = bench.Scrape(ctx, hcA, "http://"+router); err != nil {
			return s, err
		}
		if s.loader, err = bench.Scrape(ctx, hcB, "http://"+engineB); err != nil {
			return s, err
		}
		s.d, err = bench.Scrape(ctx, hcB, "http://"+d)
		return s, err
	}
	rep.TwoHosts.Result, rep.TwoHostsEngine, err = measurePD(ctx, cfg, progress, rep.TwoHosts.Name, hcA, "http://"+router, read)
	return err
}
