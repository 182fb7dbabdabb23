package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"os/signal"
	"runtime/metrics"
	"runtime/pprof"
	"strings"
	"syscall"
	"time"

	"github.com/labstack/echo/v4"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/pegaflow/pegaflow/router"
)

// The child processes: each listens, prints "ADDR host:port" on stdout
// and serves until SIGTERM.

// prefillAnswer carries a pegaflow_transfer_id, so the router takes its
// normal path (KV-ready wait, answered at once by readyNow).
const prefillAnswer = `{"id":"p","object":"text_completion","choices":[{"index":0,"text":"x","finish_reason":"length"}],` +
	`"usage":{"prompt_tokens":300,"completion_tokens":1},` +
	`"kv_transfer_params":{"do_remote_prefill":true,"pegaflow_transfer_id":"x","pegaflow_num_blocks":3}}`

// readyNow is an in-process engine whose transfers are always ready: the
// bench measures the router, not the KV wait.
type readyNow struct{}

func (readyNow) AwaitTransfer(context.Context, string) error { return nil }
func (readyNow) ReleaseTransfer(string)                      {}

func listen() net.Listener {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fatal(err)
	}
	return lis
}

func fatal(err error) {
	fmt.Fprintln(os.Stderr, "bench:", err)
	os.Exit(1)
}

// serveUntilTerm serves h on lis (printing its address) until SIGTERM,
// writing the CPU and heap profiles asked for.
func serveUntilTerm(lis net.Listener, h http.Handler, profile string) {
	if profile != "" {
		f, err := os.Create(profile + ".cpu")
		if err != nil {
			fatal(err)
		}
		_ = pprof.StartCPUProfile(f)
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = srv.Serve(lis) }()
	fmt.Printf("ADDR %s\n", lis.Addr())
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, os.Interrupt)
	<-sig
	if profile != "" {
		pprof.StopCPUProfile()
		if f, err := os.Create(profile + ".allocs"); err == nil {
			_ = pprof.Lookup("allocs").WriteTo(f, 0)
			f.Close()
		}
	}
	_ = srv.Close()
}

// runBackends serves a fast P on one port and a fast D on another: P
// answers prefillAnswer, D streams tokens (stream: true) or answers one
// JSON completion.
func runBackends(tokens int) {
	p, d := listen(), listen()
	pmux := http.NewServeMux()
	pmux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/json")
		_, _ = io.WriteString(w, prefillAnswer)
	})
	pmux.HandleFunc("/health", func(http.ResponseWriter, *http.Request) {})
	var answer strings.Builder
	answer.WriteString(`{"id":"d","object":"text_completion","choices":[{"index":0,"text":"`)
	for range tokens {
		answer.WriteString("tok ")
	}
	answer.WriteString(`","finish_reason":"length"}],"usage":{"prompt_tokens":300,"completion_tokens":8}}`)
	event := []byte(`data: {"id":"d","object":"text_completion","choices":[{"index":0,"text":"tok"}]}` + "\n\n")
	dmux := http.NewServeMux()
	dmux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		if !bytes.Contains(body, []byte(`"stream":true`)) {
			w.Header().Set("Content-Type", "application/json")
			_, _ = io.WriteString(w, answer.String())
			return
		}
		w.Header().Set("Content-Type", "text/event-stream")
		fl := w.(http.Flusher)
		for range tokens {
			_, _ = w.Write(event)
			fl.Flush()
		}
		_, _ = io.WriteString(w, "data: [DONE]\n\n")
	})
	dmux.HandleFunc("/health", func(http.ResponseWriter, *http.Request) {})
	go func() { _ = http.Serve(d, dmux) }()
	fmt.Printf("DADDR %s\n", d.Addr())
	serveUntilTerm(p, pmux, "")
}

// statsHandler answers the process's cumulative heap allocations.
func statsHandler(w http.ResponseWriter, _ *http.Request) {
	s := []metrics.Sample{{Name: "/gc/heap/allocs:objects"}, {Name: "/gc/heap/allocs:bytes"}, {Name: "/gc/cycles/total:gc-cycles"}}
	metrics.Read(s)
	_ = json.NewEncoder(w).Encode(procStats{Objects: s[0].Value.Uint64(), Bytes: s[1].Value.Uint64(), GCs: s[2].Value.Uint64()})
}

type procStats struct {
	Objects, Bytes, GCs uint64
}

// runRouter is the PegaFlow router as `pegaflow serve` mounts it, with an
// in-process engine that is always ready.
func runRouter(pURL, dURL, profile string) {
	lis := listen()
	cfg := router.DefaultConfig()
	cfg.Prefill, cfg.Decode, cfg.ListenAddr, cfg.HealthInterval = []string{pURL}, []string{dURL}, lis.Addr().String(), 0
	r, err := router.New(cfg, router.Deps{Registerer: prometheus.NewRegistry(), KVReady: readyNow{}})
	if err != nil {
		fatal(err)
	}
	e := echo.New()
	r.Register(e)
	e.GET("/bench/stats", echo.WrapHandler(http.HandlerFunc(statsHandler)))
	serveUntilTerm(lis, e, profile)
}

// runBaseline is the minimal two-leg proxy: the body to P (answer read
// and dropped), then the same body to D through httputil.ReverseProxy. No
// validation, no metrics, no KV handoff.
func runBaseline(pURL, dURL string) {
	lis := listen()
	d, err := url.Parse(dURL)
	if err != nil {
		fatal(err)
	}
	tr := &http.Transport{MaxIdleConns: 4096, MaxIdleConnsPerHost: 1024, IdleConnTimeout: 90 * time.Second}
	client := &http.Client{Transport: tr}
	rp := httputil.NewSingleHostReverseProxy(d)
	rp.Transport = tr
	rp.FlushInterval = -1
	mux := http.NewServeMux()
	mux.HandleFunc("/bench/stats", statsHandler)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		resp, err := client.Post(pURL+r.URL.Path, "application/json", bytes.NewReader(body))
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		r.Body = io.NopCloser(bytes.NewReader(body))
		r.ContentLength = int64(len(body))
		rp.ServeHTTP(w, r)
	})
	serveUntilTerm(lis, mux, "")
}
