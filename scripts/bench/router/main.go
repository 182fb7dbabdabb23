// Command router measures the router's overhead against the same fast
// backends called directly, in one run: added latency per P/D request,
// inter-token latency through the router vs direct, and P/D requests/s.
package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/labstack/echo/v4"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/pegaflow/pegaflow/router"
)

// readyNow is an in-process engine whose transfers are always ready: the
// bench measures the router, not the KV wait.
type readyNow struct{}

func (readyNow) AwaitTransfer(context.Context, string) error { return nil }
func (readyNow) ReleaseTransfer(string)                      {}

const prefillAnswer = `{"id":"p","choices":[{"index":0,"text":"x","finish_reason":"length"}],"kv_transfer_params":{"do_remote_prefill":true,"pegaflow_num_blocks":3}}`

func backend(tokens int, gap time.Duration) (string, func()) {
	mux := http.NewServeMux()
	mux.HandleFunc("/v1/completions", func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		if strings.Contains(string(body), `"do_remote_decode":true`) {
			w.Header().Set("Content-Type", "application/json")
			io.WriteString(w, prefillAnswer)
			return
		}
		w.Header().Set("Content-Type", "text/event-stream")
		fl := w.(http.Flusher)
		for i := 0; i < tokens; i++ {
			if i > 0 && gap > 0 {
				time.Sleep(gap)
			}
			io.WriteString(w, `data: {"choices":[{"index":0,"text":"tok"}]}`+"\n\n")
			fl.Flush()
		}
		io.WriteString(w, "data: [DONE]\n\n")
		fl.Flush()
	})
	lis, _ := net.Listen("tcp", "127.0.0.1:0")
	srv := &http.Server{Handler: mux}
	go srv.Serve(lis)
	return "http://" + lis.Addr().String(), func() { srv.Close() }
}

var client = &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 1024, MaxIdleConns: 4096}}

// streamReq posts body and returns the arrival gaps between SSE events.
func streamReq(url, body string) ([]time.Duration, error) {
	resp, err := client.Post(url+"/v1/completions", "application/json", strings.NewReader(body))
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		return nil, fmt.Errorf("status %d", resp.StatusCode)
	}
	rd := bufio.NewReader(resp.Body)
	var gaps []time.Duration
	var prev time.Time
	for {
		line, err := rd.ReadString('\n')
		if strings.HasPrefix(line, "data: {") {
			now := time.Now()
			if !prev.IsZero() {
				gaps = append(gaps, now.Sub(prev))
			}
			prev = now
		}
		if err == io.EOF {
			return gaps, nil
		}
		if err != nil {
			return nil, err
		}
	}
}

func pct(v []time.Duration, p float64) time.Duration {
	s := slices.Clone(v)
	slices.Sort(s)
	return s[min(len(s)-1, int(float64(len(s))*p/100))]
}

const reqBody = `{"model":"m","prompt":"hello there","max_tokens":8,"stream":true}`
const prefillBody = `{"model":"m","prompt":"hello there","max_tokens":1,"stream":false,"kv_transfer_params":{"do_remote_decode":true}}`

func main() {
	n := flag.Int("requests", 2000, "sequential requests for latency")
	dur := flag.Duration("load", 3*time.Second, "duration of the throughput run")
	conc := flag.Int("concurrency", 64, "clients in the throughput run")
	flag.Parse()

	pURL, stopP := backend(8, 0)
	defer stopP()
	dURL, stopD := backend(8, 0)
	defer stopD()
	itlURL, stopITL := backend(50, 2*time.Millisecond)
	defer stopITL()

	start := func(decode string) string {
		lis, _ := net.Listen("tcp", "127.0.0.1:0")
		cfg := router.DefaultConfig()
		cfg.Prefill, cfg.Decode, cfg.ListenAddr, cfg.HealthInterval = []string{pURL}, []string{decode}, lis.Addr().String(), 0
		r, err := router.New(cfg, router.Deps{Registerer: prometheus.NewRegistry(), KVReady: readyNow{}})
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		e := echo.New()
		r.Register(e)
		go (&http.Server{Handler: e}).Serve(lis)
		return "http://" + lis.Addr().String()
	}
	rURL := start(dURL)
	rITL := start(itlURL)

	// Added latency: one P/D request through the router vs the same two
	// legs (prefill JSON + decode stream) called directly by the client.
	var direct, routed []time.Duration
	for i := 0; i < *n; i++ {
		t0 := time.Now()
		resp, err := client.Post(pURL+"/v1/completions", "application/json", strings.NewReader(prefillBody))
		if err == nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
		if _, err := streamReq(dURL, reqBody); err != nil {
			fmt.Fprintln(os.Stderr, "direct:", err)
			os.Exit(1)
		}
		direct = append(direct, time.Since(t0))
		t0 = time.Now()
		if _, err := streamReq(rURL, reqBody); err != nil {
			fmt.Fprintln(os.Stderr, "router:", err)
			os.Exit(1)
		}
		routed = append(routed, time.Since(t0))
	}
	// ITL: 50-token streams with 2 ms gaps, direct vs through the router.
	var itlDirect, itlRouted []time.Duration
	for i := 0; i < 40; i++ {
		g, _ := streamReq(itlURL, reqBody)
		itlDirect = append(itlDirect, g...)
		g, _ = streamReq(rITL, reqBody)
		itlRouted = append(itlRouted, g...)
	}
	// Throughput: concurrent clients for a fixed time.
	var done, failed atomic.Int64
	ctx, cancel := context.WithTimeout(context.Background(), *dur)
	defer cancel()
	var wg sync.WaitGroup
	t0 := time.Now()
	for c := 0; c < *conc; c++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				if _, err := streamReq(rURL, reqBody); err != nil {
					failed.Add(1)
					continue
				}
				done.Add(1)
			}
		}()
	}
	wg.Wait()
	rps := float64(done.Load()) / time.Since(t0).Seconds()

	us := func(d time.Duration) float64 { return float64(d.Microseconds()) }
	fmt.Printf("Router benchmark (in-process fast backends, one run, %d sequential requests)\n\n", *n)
	fmt.Println("| measure | direct | via router | added / ratio | target |")
	fmt.Println("|---|---|---|---|---|")
	fmt.Printf("| P/D request latency p50 | %.0f us | %.0f us | +%.0f us | < 1000 us |\n", us(pct(direct, 50)), us(pct(routed, 50)), us(pct(routed, 50))-us(pct(direct, 50)))
	fmt.Printf("| P/D request latency p99 | %.0f us | %.0f us | +%.0f us | - |\n", us(pct(direct, 99)), us(pct(routed, 99)), us(pct(routed, 99))-us(pct(direct, 99)))
	fmt.Printf("| ITL p99 (2 ms token gaps) | %.0f us | %.0f us | %.3fx | <= 1.05x |\n", us(pct(itlDirect, 99)), us(pct(itlRouted, 99)), float64(pct(itlRouted, 99))/float64(pct(itlDirect, 99)))
	fmt.Printf("| P/D requests/s (%d clients, %s) | - | %.0f | %d failed | >= 2000 |\n", *conc, *dur, rps, failed.Load())
}
