package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/labstack/echo/v4"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/pegaflow/pegaflow/engine"
	"github.com/pegaflow/pegaflow/engine/server"
	"github.com/pegaflow/pegaflow/engine/topology"
	"github.com/pegaflow/pegaflow/internal/cli"
	"github.com/pegaflow/pegaflow/native"
	"github.com/pegaflow/pegaflow/router"
)

func backendName() string { return native.Backend() }

// defaultSocket is per user so two users on a laptop don't collide.
func defaultSocket() string {
	if dir := os.Getenv("XDG_RUNTIME_DIR"); dir != "" {
		return filepath.Join(dir, "pegaflow", "engine.sock")
	}
	return filepath.Join(os.TempDir(), fmt.Sprintf("pegaflow-%d", os.Getuid()), "engine.sock")
}

type serveFlags struct {
	socket, socketGroup, httpAddr, logLevel string
	shmDir                                  string
	socketMode                              string
	poolSize                                cli.ByteSize
	numaNode, copyThreads                   int
	hugePages, mlock                        bool
	engine                                  bool // false: router only (no engine, no pool, no socket)
	leaseTTL, transferTTL, partialTTL       time.Duration
	maxQueryWait, copyTimeout               time.Duration
	kvReadyAllow                            cli.StringList
	maxTransfers                            int
	maxCopyOps                              int64
	router                                  router.Config
	peer                                    peerFlags
	ssd                                     ssdFlags
}

func parseServeFlags(args []string, stderr io.Writer) (*serveFlags, error) {
	f := &serveFlags{poolSize: cli.ByteSize(1 << 30), router: router.DefaultConfig()}
	fs := flag.NewFlagSet("pegaflow serve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&f.socket, "socket", defaultSocket(), "engine API UNIX socket path")
	fs.StringVar(&f.socketMode, "socket-mode", "0600", "socket file mode (octal)")
	fs.StringVar(&f.socketGroup, "socket-group", "", "group (name or gid) owning the socket, e.g. to share it with vLLM running as another user")
	fs.StringVar(&f.shmDir, "shm-dir", engine.DefaultShmDir, "clients may register only shared-memory files beneath this directory (tmpfs or hugetlbfs, owned by the registering user)")
	fs.StringVar(&f.httpAddr, "http-addr", "127.0.0.1:8080", "HTTP address for /health, /metrics and, with backends, the OpenAI endpoints")
	fs.StringVar(&f.logLevel, "log-level", "info", "debug, info, warn or error")
	fs.BoolVar(&f.engine, "engine", true, "run the engine (pool, socket API); false: a router alone, which needs backends and allocates no pool")
	fs.Var(&f.poolSize, "pool-size", "pinned host memory of all pools together, split across NUMA nodes by GPU count (e.g. 8GiB)")
	fs.IntVar(&f.numaNode, "numa-node", -1, "NUMA node for a single pool (-1: one pool per NUMA node with GPUs, from NVML; no binding without NVML)")
	fs.IntVar(&f.copyThreads, "copy-threads", 2, "native copy threads (CPU build) or streams (CUDA build)")
	fs.BoolVar(&f.hugePages, "hugepages", true, "back the pool with huge pages when possible")
	fs.BoolVar(&f.mlock, "mlock", true, "lock the pool in RAM when permitted")
	fs.DurationVar(&f.leaseTTL, "lease-ttl", engine.DefaultLeaseTTL, "longest a query lease pins blocks")
	fs.DurationVar(&f.transferTTL, "transfer-ttl", engine.DefaultTransferTTL, "longest a P/D transfer waits for saves and pins its blocks")
	fs.DurationVar(&f.partialTTL, "partial-ttl", engine.DefaultPartialTTL, "free blocks saved by some TP ranks but not all after this long")
	fs.DurationVar(&f.maxQueryWait, "max-query-wait", engine.DefaultMaxQueryWait, "cap on the wait a query may ask for")
	fs.DurationVar(&f.copyTimeout, "copy-timeout", engine.DefaultCopyTimeout, "cap on how long a save or load waits for its copies (and shutdown for copies still running); late copies fail their call, their memory is freed when they end")
	fs.Var(&f.kvReadyAllow, "kv-ready-allow", "where a save's ready_url may point (repeatable): host:port, an http(s) URL prefix "+
		"(segment boundary; no dot segments or encoded slashes), CIDR:port, \"loopback\" or \"none\" (default: the in-process router's /kv_ready address, else loopback)")
	fs.IntVar(&f.maxTransfers, "max-transfers", engine.DefaultMaxTransfers, "most P/D transfers tracked (and, apart, most transfer ids waited for before a save)")
	fs.Int64Var(&f.maxCopyOps, "max-copy-ops", engine.DefaultMaxCopyOps, "most copy operations in flight across all saves and loads (a block is layers x segments ops)")
	router.BindFlags(fs, &f.router)
	bindPeerFlags(fs, &f.peer)
	bindSSDFlags(fs, &f.ssd)
	if err := cli.Parse(fs, args, nil); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments: %s", strings.Join(fs.Args(), " "))
	}
	if f.poolSize < 1<<20 {
		return nil, fmt.Errorf("--pool-size %s is below 1MiB", f.poolSize.String())
	}
	if _, err := parseLevel(f.logLevel); err != nil {
		return nil, err
	}
	if _, err := strconv.ParseUint(f.socketMode, 8, 32); err != nil {
		return nil, fmt.Errorf("--socket-mode %q is not an octal mode", f.socketMode)
	}
	if !filepath.IsAbs(f.shmDir) {
		return nil, fmt.Errorf("--shm-dir %q must be an absolute path", f.shmDir)
	}
	f.shmDir = filepath.Clean(f.shmDir)
	if _, _, err := net.SplitHostPort(f.httpAddr); err != nil {
		return nil, fmt.Errorf("--http-addr %q: %w", f.httpAddr, err)
	}
	f.router.ListenAddr = f.httpAddr
	if !f.engine && !f.router.Enabled() {
		return nil, errors.New("--engine=false runs a router alone: give it backends (--prefill/--decode or --backend)")
	}
	if f.router.Enabled() {
		if err := f.router.Validate(); err != nil {
			return nil, err
		}
	}
	if f.maxTransfers < 1 || f.maxCopyOps < 1 {
		return nil, errors.New("--max-transfers and --max-copy-ops must be at least 1")
	}
	if len(f.kvReadyAllow) == 0 {
		f.kvReadyAllow = defaultKVReadyAllow(f.router)
	}
	if err := engine.CheckKVReadyAllow(f.kvReadyAllow); err != nil {
		return nil, err
	}
	if err := f.peer.check(); err != nil {
		return nil, err
	}
	if err := f.ssd.check(); err != nil {
		return nil, err
	}
	if err := f.checkKV(); err != nil {
		return nil, err
	}
	return f, nil
}

// defaultKVReadyAllow is where the engine may POST transfer readiness
// unless --kv-ready-allow says: the in-process router's own /kv_ready
// (as the router derives it for kv_transfer_params), else loopback.
func defaultKVReadyAllow(rc router.Config) cli.StringList {
	if !rc.Enabled() {
		return cli.StringList{engine.KVReadyLoopback}
	}
	if rc.KVReadyURL != "" {
		return cli.StringList{rc.KVReadyURL}
	}
	addr := rc.ListenAddr
	if rc.InternalAddr != "" {
		addr = rc.InternalAddr
	}
	host, port, _ := net.SplitHostPort(addr)
	if unspecifiedHost(host) {
		host = "127.0.0.1"
	}
	return cli.StringList{net.JoinHostPort(host, port)}
}

func parseLevel(s string) (slog.Level, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(s)); err != nil {
		return 0, fmt.Errorf("--log-level %q: want debug, info, warn or error", s)
	}
	return l, nil
}

func runServe(ctx context.Context, args []string, _, stderr io.Writer) int {
	f, err := parseServeFlags(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintf(stderr, "pegaflow serve: %v\n", err)
		return cli.ExitUsage
	}
	level, _ := parseLevel(f.logLevel)
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))
	if err := serve(ctx, f, log); err != nil {
		log.Error("serve failed", "err", err)
		if errors.Is(err, server.ErrUnsafeSocket) {
			// The operator's setup to fix, like a bad flag.
			return cli.ExitUsage
		}
		return 1
	}
	return 0
}

func serve(ctx context.Context, f *serveFlags, log *slog.Logger) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	// The peer client outlives the engine (deferred first, closed last): a
	// client closed early would leave every fetch to dial anew.
	var peers engine.PeerControl
	if pc := f.peer.control(); pc != nil {
		defer pc.Close()
		peers = pc
	}
	eng, srv, err := startEngine(ctx, f, peers, log, reg)
	if err != nil {
		return err
	}
	if eng != nil {
		defer eng.Close()
	}
	return serveHTTP(ctx, cancel, f, log, reg, eng, srv)
}

// startEngine builds the engine and its socket API server, or nothing
// with --engine=false (a router alone: no pool is allocated).
func startEngine(ctx context.Context, f *serveFlags, peers engine.PeerControl, log *slog.Logger, reg *prometheus.Registry) (*engine.Engine, *server.Server, error) {
	if !f.engine {
		return nil, nil, nil
	}
	var poolFlags native.PoolFlags
	if f.hugePages {
		poolFlags |= native.PoolHugePages
	}
	if f.mlock {
		poolFlags |= native.PoolMlock
	}
	topoLog := log.With("component", "topology")
	topo := topology.Discover(ctx, topology.NewNVML(topoLog), topoLog)
	eng, err := engine.New(engine.Config{
		Peers: peers, PeerTransport: f.peer.transport, PeerAddress: f.peer.advertise, PeerAllow: f.peer.allow,
		SSD:      f.ssd.config(),
		PoolSize: uint64(f.poolSize), NUMANode: f.numaNode, Device: -1, PoolFlags: poolFlags,
		CopyThreads: f.copyThreads, LeaseTTL: f.leaseTTL, TransferTTL: f.transferTTL,
		PartialTTL: f.partialTTL, MaxQueryWait: f.maxQueryWait, ShmDir: f.shmDir, CopyTimeout: f.copyTimeout, Version: version, Topology: topo,
		KVReadyAllow: f.kvReadyAllow, MaxTransfers: f.maxTransfers, MaxCopyOps: f.maxCopyOps,
	}, log.With("component", "engine"), reg)
	if err != nil {
		return nil, nil, err
	}

	mode, _ := strconv.ParseUint(f.socketMode, 8, 32)
	srv, err := server.New(server.Config{SocketPath: f.socket, SocketMode: os.FileMode(mode), SocketGroup: f.socketGroup},
		eng, log.With("component", "api"), reg)
	if err != nil {
		eng.Close()
		return nil, nil, err
	}
	return eng, srv, nil
}

// serveHTTP runs the HTTP side (and the engine's API server, if any)
// until ctx ends. eng and srv are nil with --engine=false.
func serveHTTP(ctx context.Context, cancel context.CancelFunc, f *serveFlags, log *slog.Logger, reg *prometheus.Registry,
	eng *engine.Engine, srv *server.Server) error {
	var kv router.KVReadySource // nil without an engine (a nil *engine.Engine in it would not be)
	if eng != nil {
		kv = eng
	}
	e := echo.New()
	e.HideBanner, e.HidePort = true, true
	var rt *router.Router
	if f.router.Enabled() {
		deps := router.Deps{Logger: log.With("component", "router"), Registerer: reg, KVReady: kv}
		if x := newKVIndex(f, eng, log); x != nil {
			defer x.Close()
			deps.KVIndex = kvIndex{x}
		}
		var err error
		rt, err = router.New(f.router, deps)
		if err != nil {
			return err
		}
		defer rt.Close()
		rt.Register(e)
	}
	e.GET("/health", func(c echo.Context) error {
		body := map[string]any{"status": "ok", "engine": "off", "version": version}
		code := http.StatusOK
		if eng != nil {
			body["engine"], body["backend"] = eng.Health().Status, eng.Backend()
		}
		if eng != nil && eng.Health().Status != "ok" {
			code = http.StatusServiceUnavailable
			body["status"] = "unavailable"
		}
		if rt != nil {
			ok, detail := rt.Healthy()
			body["router"] = detail
			if !ok {
				code = http.StatusServiceUnavailable
				body["status"] = "unavailable"
			}
		}
		return c.JSON(code, body)
	})
	e.GET("/metrics", echo.WrapHandler(promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg})))
	if eng != nil {
		e.GET("/topology", topologyHandler(eng))
	}

	peerSrv, err := f.peer.listen(eng, reg, log)
	if err != nil {
		return err
	}
	httpLis, err := net.Listen("tcp", f.httpAddr)
	if err != nil {
		return fmt.Errorf("listen %s: %w", f.httpAddr, err)
	}
	httpSrv := &http.Server{Handler: e, ReadHeaderTimeout: 10 * time.Second}
	log.Info("http listening", "addr", httpLis.Addr().String(), "router", rt != nil)

	var wg sync.WaitGroup
	errc := make(chan error, 4)
	run := func(fn func() error) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := fn(); err != nil && !errors.Is(err, http.ErrServerClosed) && !errors.Is(err, context.Canceled) {
				errc <- err
			}
		}()
	}
	if srv != nil {
		run(func() error { return srv.Serve(ctx) })
	}
	run(func() error { return httpSrv.Serve(httpLis) })
	if peerSrv != nil {
		run(func() error { return peerSrv.Serve(ctx) })
	}
	var internalSrv *http.Server
	if rt != nil {
		run(func() error { return rt.Run(ctx) })
		if f.router.InternalAddr != "" {
			lis, err := net.Listen("tcp", f.router.InternalAddr)
			if err != nil {
				cancel()
				wg.Wait()
				return fmt.Errorf("listen %s: %w", f.router.InternalAddr, err)
			}
			internalSrv = &http.Server{Handler: rt.InternalHandler(), ReadHeaderTimeout: 10 * time.Second}
			run(func() error { return internalSrv.Serve(lis) })
		}
	}
	var runErr error
	select {
	case <-ctx.Done():
		log.Info("shutting down")
	case runErr = <-errc:
		log.Error("component failed, shutting down", "err", runErr)
	}
	cancel()
	shutCtx, shutCancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer shutCancel()
	_ = httpSrv.Shutdown(shutCtx)
	if internalSrv != nil {
		_ = internalSrv.Shutdown(shutCtx)
	}
	wg.Wait()
	return runErr
}

// topologyResponse is GET /topology: what NVML listed at start, the native
// build, and where the pools went (one per NUMA node with GPUs).
type topologyResponse struct {
	*topology.Topology
	Backend string             `json:"backend"`
	Pool    topology.Placement `json:"pool"`
}

func topologyHandler(eng *engine.Engine) echo.HandlerFunc {
	return func(c echo.Context) error {
		return c.JSON(http.StatusOK, topologyResponse{Topology: eng.Topology(), Backend: eng.Backend(), Pool: eng.PoolPlacement()})
	}
}
