// Command router measures the PegaFlow router against the limit: the
// minimal two-leg proxy written with net/http/httputil (P then D, no
// validation, no metrics), both in front of the same fast backends in the
// same run, and both compared with the client calling P and D itself.
//
// Each proxy runs in its own process pinned to one core (taskset -c
// -router-core); the backends and this load generator share the other
// core, so the proxy's CPU is its own. Per cell (streaming or not; 1, 64,
// 256 clients) it reports, for the router and the baseline: requests/s,
// CPU-s per 1,000 requests (utime+stime from /proc/<pid>/stat), heap
// allocations per request (runtime/metrics of the proxy process), p50/p99
// latency added over the direct calls, and peak RSS (VmHWM); the ratio
// column is router / baseline. With -pegaflow it also reports the RSS of
// a router-only `pegaflow serve --engine=false`.
package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

func main() {
	role := flag.String("role", "", "internal: backends, router or baseline")
	pURL := flag.String("p", "", "internal: P base URL")
	dURL := flag.String("d", "", "internal: D base URL")
	profile := flag.String("profile", "", "write the router's CPU and alloc profiles to PREFIX-<cell>.cpu/.allocs")
	dur := flag.Duration("load", 2*time.Second, "measured load per proxy and cell")
	tokens := flag.Int("tokens", 8, "tokens per answer")
	promptBytes := flag.Int("prompt-bytes", 1024, "size of the prompt string")
	cells := flag.String("clients", "1,64,256", "client counts")
	modes := flag.String("modes", "false,true", "stream values")
	routerCore := flag.Int("router-core", 1, "core the proxies are pinned to; backends and load on the others")
	pegaflow := flag.String("pegaflow", "", "pegaflow binary: also measure a router-only `serve --engine=false`")
	jsonOut := flag.String("json", "", "also write the results as JSON here")
	routerEnv := flag.String("router-env", "", "extra environment of the router process, e.g. GOGC=400 (comma-separated)")
	flag.Parse()

	switch *role {
	case "backends":
		runBackends(*tokens)
		return
	case "router":
		runRouter(*pURL, *dURL, *profile)
		return
	case "baseline":
		runBaseline(*pURL, *dURL)
		return
	}
	otherCores := otherCPUs(*routerCore)
	if err := pinSelf(otherCores); err != nil {
		fmt.Fprintln(os.Stderr, "bench: taskset:", err, "(unpinned)")
	}
	be := start(otherCores, nil, "-role=backends", fmt.Sprintf("-tokens=%d", *tokens))
	defer be.stop()
	pu, du := "http://"+be.addr, "http://"+be.daddr

	prompt := strings.Repeat("hello there ", *promptBytes/12+1)[:*promptBytes]
	var results []cellResult
	for _, m := range strings.Split(*modes, ",") {
		stream := m == "true"
		for _, cs := range strings.Split(*cells, ",") {
			clients, _ := strconv.Atoi(cs)
			body := fmt.Sprintf(`{"model":"m","prompt":%q,"max_tokens":%d,"temperature":0,"stream":%v}`, prompt, *tokens, stream)
			if stream {
				body = body[:len(body)-1] + `,"stream_options":{"include_usage":true}}`
			}
			prefill := fmt.Sprintf(`{"model":"m","prompt":%q,"max_tokens":1,"stream":false,"kv_transfer_params":{"do_remote_decode":true}}`, prompt)
			c := cellResult{Stream: stream, Clients: clients}
			c.Direct = load(clients, *dur, func() error {
				if err := post(pu, prefill, false); err != nil {
					return err
				}
				return post(du, body, stream)
			})
			args := []string{"-role=router", "-p=" + pu, "-d=" + du}
			if *profile != "" {
				args = append(args, fmt.Sprintf("-profile=%s-%v-%d", *profile, stream, clients))
			}
			var env []string
			if *routerEnv != "" {
				env = strings.Split(*routerEnv, ",")
			}
			c.Router = measure([]int{*routerCore}, env, clients, *dur, body, stream, args...)
			c.Baseline = measure([]int{*routerCore}, nil, clients, *dur, body, stream, "-role=baseline", "-p="+pu, "-d="+du)
			results = append(results, c)
			fmt.Fprintf(os.Stderr, "stream=%v clients=%d: router %.0f req/s, baseline %.0f req/s\n", stream, clients, c.Router.RPS, c.Baseline.RPS)
		}
	}
	var serveRSS *rss
	if *pegaflow != "" {
		serveRSS = measureServe(*pegaflow, *routerCore, pu, du, prompt, *dur)
	}
	printTable(results, serveRSS)
	if *jsonOut != "" {
		data, _ := json.MarshalIndent(results, "", " ")
		_ = os.WriteFile(*jsonOut, data, 0o644)
	}
}

type run struct {
	N, Failed int
	RPS       float64
	P50, P99  time.Duration
}

type proxyRun struct {
	run
	CPUPer1k       float64 // CPU-s per 1,000 requests
	Allocs, Bytes  float64 // per request
	GCs            uint64
	AddP50, AddP99 time.Duration
	HWMKiB, RSSKiB int
}

type cellResult struct {
	Stream           bool
	Clients          int
	Direct           run
	Router, Baseline proxyRun
}

// measure starts a proxy (args) pinned to cores, warms it up, and measures
// clients concurrent requests for dur.
func measure(cores []int, env []string, clients int, dur time.Duration, body string, stream bool, args ...string) proxyRun {
	px := start(cores, env, args...)
	defer px.stop()
	url := "http://" + px.addr
	do := func() error { return post(url, body, stream) }
	load(clients, dur/4, do) // warm-up: connections, pools, heap
	s0, cpu0 := px.stats(), px.cpu()
	r := load(clients, dur, do)
	s1, cpu1 := px.stats(), px.cpu()
	out := proxyRun{run: r}
	if r.N > 0 {
		n := float64(r.N)
		out.CPUPer1k = (cpu1 - cpu0) / n * 1000
		out.Allocs = float64(s1.Objects-s0.Objects) / n
		out.Bytes = float64(s1.Bytes-s0.Bytes) / n
		out.GCs = s1.GCs - s0.GCs
	}
	out.HWMKiB, out.RSSKiB = px.memory()
	return out
}

type rss struct{ hwm, rss int }

// measureServe is the RSS of a router-only `pegaflow serve` under load.
func measureServe(bin string, core int, pu, du, prompt string, dur time.Duration) *rss {
	addr := freeAddr()
	cmd := exec.Command("taskset", "-c", strconv.Itoa(core), bin, "serve", "--engine=false", "--http-addr", addr,
		"--prefill", pu, "--decode", du, "--handoff", "sync", "--health-interval", "0", "--log-level", "error")
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		fmt.Fprintln(os.Stderr, "bench: pegaflow serve:", err)
		return nil
	}
	px := &proc{cmd: cmd, addr: addr}
	defer px.stop()
	deadline := time.Now().Add(10 * time.Second)
	for {
		resp, err := http.Get("http://" + addr + "/health")
		if err == nil {
			resp.Body.Close()
			break
		}
		if time.Now().After(deadline) {
			fmt.Fprintln(os.Stderr, "bench: pegaflow serve did not come up")
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	body := fmt.Sprintf(`{"model":"m","prompt":%q,"max_tokens":8}`, prompt)
	r := load(64, dur, func() error { return post("http://"+addr, body, false) })
	if r.Failed > 0 {
		fmt.Fprintf(os.Stderr, "bench: pegaflow serve: %d of %d failed\n", r.Failed, r.N+r.Failed)
	}
	h, s := px.memory()
	return &rss{h, s}
}

var client = &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 1024, MaxIdleConns: 4096}}

// post sends body to base/v1/completions and reads the answer whole.
func post(base, body string, stream bool) error {
	resp, err := client.Post(base+"/v1/completions", "application/json", strings.NewReader(body))
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("status %d: %s", resp.StatusCode, data)
	}
	if stream && !bytes.HasSuffix(data, []byte("data: [DONE]\n\n")) {
		return fmt.Errorf("stream without [DONE]: %q", data)
	}
	return nil
}

// load runs clients loops of do for dur and returns the latencies.
func load(clients int, dur time.Duration, do func() error) run {
	ctx, cancel := context.WithTimeout(context.Background(), dur)
	defer cancel()
	var (
		mu     sync.Mutex
		lat    []time.Duration
		failed atomic.Int64
		wg     sync.WaitGroup
		once   sync.Once
	)
	t0 := time.Now()
	for range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var mine []time.Duration
			for ctx.Err() == nil {
				s := time.Now()
				if err := do(); err != nil {
					failed.Add(1)
					once.Do(func() { fmt.Fprintln(os.Stderr, "bench: request failed:", err) })
					continue
				}
				mine = append(mine, time.Since(s))
			}
			mu.Lock()
			lat = append(lat, mine...)
			mu.Unlock()
		}()
	}
	wg.Wait()
	r := run{N: len(lat), Failed: int(failed.Load()), RPS: float64(len(lat)) / time.Since(t0).Seconds()}
	if len(lat) > 0 {
		slices.Sort(lat)
		r.P50, r.P99 = lat[len(lat)/2], lat[min(len(lat)-1, len(lat)*99/100)]
	}
	return r
}

func ratio(a, b float64) string {
	if b <= 0 {
		return "-"
	}
	return fmt.Sprintf("%.2fx", a/b)
}

func printTable(results []cellResult, serve *rss) {
	us := func(d time.Duration) float64 { return float64(d) / 1e3 }
	fmt.Println("Router vs the minimal httputil two-leg proxy (same backends, same run; proxies pinned to their own core)")
	fmt.Println()
	fmt.Println("| stream | clients | req/s router / base | CPU-s per 1k req router / base | ratio | allocs/req router / base | B/req router / base | added p50 us router / base | added p99 us router / base | VmHWM MiB router / base | ratio |")
	fmt.Println("|---|---|---|---|---|---|---|---|---|---|---|")
	for _, c := range results {
		r, b := c.Router, c.Baseline
		addP50r, addP50b := us(r.P50-c.Direct.P50), us(b.P50-c.Direct.P50)
		addP99r, addP99b := us(r.P99-c.Direct.P99), us(b.P99-c.Direct.P99)
		fmt.Printf("| %v | %d | %.0f / %.0f | %.3f / %.3f | %s | %.0f / %.0f (%s) | %.0f / %.0f | %.0f / %.0f | %.0f / %.0f | %.1f / %.1f | %s |\n",
			c.Stream, c.Clients, r.RPS, b.RPS, r.CPUPer1k, b.CPUPer1k, ratio(r.CPUPer1k, b.CPUPer1k),
			r.Allocs, b.Allocs, ratio(r.Allocs, b.Allocs), r.Bytes, b.Bytes, addP50r, addP50b, addP99r, addP99b,
			float64(r.HWMKiB)/1024, float64(b.HWMKiB)/1024, ratio(float64(r.HWMKiB), float64(b.HWMKiB)))
		if r.Failed+b.Failed+c.Direct.Failed > 0 {
			fmt.Printf("|   | failed: router %d, baseline %d, direct %d |\n", r.Failed, b.Failed, c.Direct.Failed)
		}
	}
	if serve != nil {
		fmt.Printf("\nRouter-only `pegaflow serve --engine=false` under 64 clients: VmHWM %.1f MiB, VmRSS %.1f MiB\n",
			float64(serve.hwm)/1024, float64(serve.rss)/1024)
	}
}

// proc is a child process of the bench.
type proc struct {
	cmd         *exec.Cmd
	addr, daddr string
}

// start runs this binary with args, pinned to cores, and waits for the
// address(es) it prints.
func start(cores []int, env []string, args ...string) *proc {
	exe, err := os.Executable()
	if err != nil {
		fatal(err)
	}
	cmd := exec.Command("taskset", append([]string{"-c", cpuList(cores), exe}, args...)...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		fatal(err)
	}
	if err := cmd.Start(); err != nil {
		fatal(err)
	}
	p := &proc{cmd: cmd}
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 2 && f[0] == "DADDR" {
			p.daddr = f[1]
		}
		if len(f) == 2 && f[0] == "ADDR" {
			p.addr = f[1]
			break
		}
	}
	if p.addr == "" {
		fatal(fmt.Errorf("%v printed no address", args))
	}
	go func() { _, _ = io.Copy(io.Discard, out) }()
	return p
}

func (p *proc) stop() {
	_ = p.cmd.Process.Signal(os.Interrupt)
	done := make(chan struct{})
	go func() { _ = p.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		_ = p.cmd.Process.Kill()
		<-done
	}
}

func (p *proc) stats() procStats {
	var s procStats
	resp, err := client.Get("http://" + p.addr + "/bench/stats")
	if err != nil {
		return s
	}
	defer resp.Body.Close()
	_ = json.NewDecoder(resp.Body).Decode(&s)
	return s
}

// cpu is the process's utime+stime in seconds.
func (p *proc) cpu() float64 {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p.cmd.Process.Pid))
	if err != nil {
		return 0
	}
	rest := string(data[bytes.LastIndexByte(data, ')')+2:])
	f := strings.Fields(rest) // f[0] is field 3 (state): utime is field 14, stime 15
	ut, _ := strconv.ParseFloat(f[11], 64)
	st, _ := strconv.ParseFloat(f[12], 64)
	return (ut + st) / 100 // USER_HZ
}

// memory is VmHWM and VmRSS in KiB.
func (p *proc) memory() (hwm, rssKiB int) {
	data, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.cmd.Process.Pid))
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) >= 2 && f[0] == "VmHWM:" {
			hwm, _ = strconv.Atoi(f[1])
		}
		if len(f) >= 2 && f[0] == "VmRSS:" {
			rssKiB, _ = strconv.Atoi(f[1])
		}
	}
	return hwm, rssKiB
}
