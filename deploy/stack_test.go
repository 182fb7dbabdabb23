package deploy

import (
	"bufio"
	"context"
	"fmt"
	"math"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.yaml.in/yaml/v3"
)

// Port layout of demo-stack.sh relative to --port-base, and the base the
// shipped prometheus.yml scrapes; the test's Prometheus listens at +40.
const (
	shippedPortBase = 8080
	promPortOffset  = 40
	rateInterval    = "30s" // stands in for Grafana's $__rate_interval
)

var stackPortOffsets = []int{0, 10, 20, 21, 30, 31, promPortOffset}

// TestMonitoringAgainstDemoStack runs the demo stack (deploy/demo-stack.sh:
// the `make demo` topology with load) and a real Prometheus scraping it at
// 1 s with the shipped config and rules (hold times cut to testHold), then checks through Prometheus's
// HTTP API that every dashboard panel query returns data, the dashboard's
// variables list both routers and both modes, every rule evaluates and none
// fires on the healthy run, and PegaflowNoHealthyDecodeBackend fires once
// the D sim is killed.
func TestMonitoringAgainstDemoStack(t *testing.T) {
	if testing.Short() {
		t.Skip("starts 8 processes and Prometheus (~40 s)")
	}
	promBin := lookPathOrSkip(t, "prometheus", "apt-get install prometheus")
	lookPathOrSkip(t, "curl", "apt-get install curl") // demo-stack.sh polls /health with it
	bin := pegaflowBinary(t)
	ctx := context.Background()
	dir := t.TempDir()
	base := freePortBase(t)
	pd, dp2 := addr(base, 0), addr(base, 10)

	stackDir := filepath.Join(dir, "stack")
	startStack(t, bin, base, stackDir)
	// One rejected /kv_ready report, so that series exists as in a fleet.
	resp, err := http.Post("http://"+pd+"/kv_ready", "application/json", strings.NewReader("{}"))
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, http.StatusBadRequest, resp.StatusCode)

	prom := startPrometheus(t, promBin, dir, base)

	// Traffic through both routers, seen by two scrapes at least (rate()).
	waitFor(t, 60*time.Second, "both routers' requests in Prometheus", func() (bool, string) {
		s, err := prom.query(ctx, `sum by (mode) (rate(pegaflow_router_requests_total{outcome="ok"}[`+rateInterval+`])) > 0`)
		return err == nil && len(s) == 2, fmt.Sprintf("%v %v", s, err)
	})
	up, err := prom.query(ctx, `up`)
	require.NoError(t, err)
	require.Len(t, up, 6, "targets: 2 pegaflow serve + 4 sims")
	for _, s := range up {
		require.Equal(t, 1.0, s.Value, "target %v down: the shipped config's ports must match demo-stack.sh's layout", s.Metric)
	}

	d := loadDashboard(t)
	vars := dashboardVars(ctx, t, prom, d)
	require.ElementsMatch(t, []string{pd, dp2}, vars.values["instance"], "instance variable")
	require.ElementsMatch(t, []string{"aggregated", "pd"}, vars.values["mode"], "mode variable")
	names := make([]string, 0)
	queries := d.queries()
	for where := range queries {
		names = append(names, where)
	}
	sort.Strings(names)
	t.Logf("evaluating %d panel queries", len(names))
	for _, where := range names {
		q := vars.substitute(queries[where])
		s, err := prom.query(ctx, q)
		if err != nil {
			t.Errorf("%s: %v\n  query: %s", where, err, q)
			continue
		}
		if !anyFinite(s) {
			t.Errorf("%s: no data (%v)\n  query: %s", where, s, q)
		}
	}

	// Healthy: every rule evaluated without error, no alert pending or firing.
	rf := loadRules(t)
	since := time.Now()
	waitFor(t, 20*time.Second, "every alert rule evaluated", func() (bool, string) {
		rules, err := prom.rules(ctx)
		if err != nil || len(rules) != len(rf.alerts()) {
			return false, fmt.Sprintf("%d rules loaded, want %d (%v)", len(rules), len(rf.alerts()), err)
		}
		for _, r := range rules {
			if r.LastEvaluation.Before(since) {
				return false, r.Name + " not evaluated yet"
			}
		}
		return true, ""
	})
	rules, err := prom.rules(ctx)
	require.NoError(t, err)
	for _, r := range rules {
		require.Equal(t, "ok", r.Health, "rule %s: %s", r.Name, r.LastError)
	}
	active, err := prom.alerts(ctx)
	require.NoError(t, err)
	for _, a := range active {
		if a.State == "firing" {
			t.Errorf("alert firing on the healthy run: %v", a.Labels)
		} else {
			t.Logf("alert %s on the healthy run: %v", a.State, a.Labels)
		}
	}

	// The D sim dies: the P/D router's health polls fail, the alert fires.
	pid := readPid(t, filepath.Join(stackDir, "pids", "sim-d.pid"))
	require.NoError(t, syscall.Kill(pid, syscall.SIGKILL))
	var fired []alert
	waitFor(t, 30*time.Second, "PegaflowNoHealthyDecodeBackend firing", func() (bool, string) {
		fired, err = prom.alerts(ctx)
		for _, a := range fired {
			if a.Labels["alertname"] == "PegaflowNoHealthyDecodeBackend" && a.State == "firing" {
				return true, ""
			}
		}
		return false, fmt.Sprintf("%v %v", fired, err)
	})
	t.Logf("alerts after the D sim was killed: %v", fired)
	for _, a := range fired {
		switch a.Labels["alertname"] {
		case "PegaflowNoHealthyDecodeBackend":
			require.Equal(t, pd, a.Labels["instance"])
			require.Equal(t, "pd", a.Labels["mode"])
		case "PegaflowNoHealthyPrefillBackend", "PegaflowNoHealthyAggregatedBackend", "PegaflowEngineDown":
			t.Errorf("%s fired when only D was killed: %v", a.Labels["alertname"], a.Labels)
		}
	}

	// Every metric the dashboard and rules name is one the binaries export.
	exported := map[string]bool{}
	series, err := prom.query(ctx, `count by (__name__) ({__name__=~"pegaflow_.+"})`)
	require.NoError(t, err)
	for _, s := range series {
		exported[s.Metric["__name__"]] = true
	}
	all := make([]string, 0, len(queries))
	for _, q := range queries {
		all = append(all, q)
	}
	for _, q := range rf.alerts() {
		all = append(all, q)
	}
	for _, m := range metricNames(all) {
		switch {
		case exported[m]:
		case lazyMetrics[m]:
			t.Logf("metric %s not seen (nothing happened to create it)", m)
		default:
			t.Errorf("metric %s is used but not exported", m)
		}
	}
}

// lazyMetrics are counters with labels that appear only once something
// happens (a retry, an ejection): the panels fall back to 0 for them with
// `or on() vector(0)`, and the test cannot expect them on its short run.
var lazyMetrics = map[string]bool{
	"pegaflow_router_retries_total":           true,
	"pegaflow_router_backend_ejections_total": true,
}

func addr(base, offset int) string { return "127.0.0.1:" + strconv.Itoa(base+offset) }

// freePortBase finds a port base whose demo-stack ports are all free now.
func freePortBase(t *testing.T) int {
	t.Helper()
	for range 50 {
		base := 20000 + rand.IntN(40000)
		free := true
		for _, off := range stackPortOffsets {
			ln, err := net.Listen("tcp", addr(base, off))
			if err != nil {
				free = false
				break
			}
			ln.Close()
		}
		if free {
			return base
		}
	}
	t.Fatal("no free port range for the demo stack")
	return 0
}

// startStack runs demo-stack.sh until the test ends and waits for its
// ready line. Its process group is killed at cleanup (the script stops its
// children on SIGTERM; SIGKILL to the group catches what is left).
func startStack(t *testing.T, bin string, base int, dir string) {
	t.Helper()
	cmd := exec.Command("./demo-stack.sh", "--port-base", strconv.Itoa(base), "--work-dir", dir, "--bin", bin)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	stdout, err := cmd.StdoutPipe()
	require.NoError(t, err)
	cmd.Stderr = cmd.Stdout
	require.NoError(t, cmd.Start())
	// Its own output (the ready line, or why it gave up) goes to t.Log;
	// Wait only after the last read (os/exec's rule for pipes), and the
	// cleanup returns only after both, so no t.Log outlives the test.
	ready, done := make(chan struct{}), make(chan struct{})
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			t.Log(sc.Text())
			if strings.Contains(sc.Text(), "demo-stack: ready") {
				close(ready)
			}
		}
		_ = cmd.Wait()
		close(done)
	}()
	t.Cleanup(func() {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(10 * time.Second):
		}
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-done
	})
	select {
	case <-ready:
	case <-done:
		t.Fatalf("demo-stack.sh exited before it was ready; logs in %s/logs", dir)
	case <-time.After(60 * time.Second):
		t.Fatalf("demo-stack.sh not ready after 60s; logs in %s/logs", dir)
	}
}

// startPrometheus runs Prometheus on the shipped config, rewritten for the
// test: targets moved to the stack's port base, 1 s scrapes and rule
// evaluation, and the rules' `for:` cut to testHold.
func startPrometheus(t *testing.T, promBin, dir string, base int) promAPI {
	t.Helper()
	raw, err := os.ReadFile(promConfigPath)
	require.NoError(t, err)
	var cfg map[string]any
	require.NoError(t, yaml.Unmarshal(raw, &cfg))
	cfg["global"] = map[string]any{"scrape_interval": "1s", "evaluation_interval": "1s"}
	cfg["rule_files"] = []string{writeTestRules(t, dir)}
	jobs, _ := cfg["scrape_configs"].([]any)
	require.NotEmpty(t, jobs)
	for _, j := range jobs {
		job := j.(map[string]any)
		delete(job, "scrape_interval")
		statics, _ := job["static_configs"].([]any)
		for _, s := range statics {
			sc := s.(map[string]any)
			targets, _ := sc["targets"].([]any)
			for i, tg := range targets {
				host, port, err := net.SplitHostPort(tg.(string))
				require.NoError(t, err)
				p, err := strconv.Atoi(port)
				require.NoError(t, err)
				targets[i] = net.JoinHostPort(host, strconv.Itoa(p-shippedPortBase+base))
			}
		}
	}
	out, err := yaml.Marshal(cfg)
	require.NoError(t, err)
	cfgPath := filepath.Join(dir, "prometheus.yml")
	require.NoError(t, os.WriteFile(cfgPath, out, 0o644))
	if promtool, err := exec.LookPath("promtool"); err == nil {
		out, err := exec.Command(promtool, "check", "config", cfgPath).CombinedOutput()
		require.NoError(t, err, "promtool check config (test copy):\n%s", out)
	}

	listen := addr(base, promPortOffset)
	logPath := filepath.Join(dir, "prometheus.log")
	logFile, err := os.Create(logPath)
	require.NoError(t, err)
	cmd := exec.Command(promBin, "--config.file="+cfgPath, "--storage.tsdb.path="+filepath.Join(dir, "tsdb"),
		"--web.listen-address="+listen, "--log.level=warn")
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	require.NoError(t, cmd.Start())
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		logFile.Close()
	})
	api := promAPI{base: "http://" + listen}
	waitFor(t, 30*time.Second, "Prometheus ready", func() (bool, string) {
		resp, err := http.Get(api.base + "/-/ready")
		if err != nil {
			return false, err.Error()
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK, fmt.Sprintf("status %d; log %s", resp.StatusCode, logPath)
	})
	return api
}

// vars are the dashboard variables' values, resolved as Grafana does with
// "All" selected: a multi-value variable in a =~ matcher becomes (a|b),
// each value regex-escaped.
type vars struct{ values map[string][]string }

var labelValuesQuery = regexp.MustCompile(`^label_values\((.+),\s*(\w+)\)$`)

func dashboardVars(ctx context.Context, t *testing.T, prom promAPI, d dashboard) vars {
	t.Helper()
	v := vars{values: map[string][]string{}}
	for _, tv := range d.Templating.List {
		if tv.Type != "query" {
			continue
		}
		m := labelValuesQuery.FindStringSubmatch(tv.queryString())
		require.NotNil(t, m, "variable %s: only label_values(selector, label) is resolved here", tv.Name)
		values, err := prom.labelValues(ctx, v.substitute(m[1]), m[2])
		require.NoError(t, err, "variable %s", tv.Name)
		require.NotEmpty(t, values, "variable %s lists nothing", tv.Name)
		v.values[tv.Name] = values
	}
	return v
}

func (v vars) substitute(expr string) string {
	return varRef.ReplaceAllStringFunc(expr, func(ref string) string {
		m := varRef.FindStringSubmatch(ref)
		name := m[1] + m[2] + m[3]
		if name == "__rate_interval" || name == "__interval" || name == "__range" {
			return rateInterval
		}
		values, ok := v.values[name]
		if !ok {
			return ref
		}
		quoted := make([]string, len(values))
		for i, val := range values {
			// Regex-escaped, then escaped again for the PromQL string.
			quoted[i] = strings.ReplaceAll(regexp.QuoteMeta(val), `\`, `\\`)
		}
		return "(" + strings.Join(quoted, "|") + ")"
	})
}

func anyFinite(s []sample) bool {
	for _, x := range s {
		if !math.IsNaN(x.Value) && !math.IsInf(x.Value, 0) {
			return true
		}
	}
	return false
}

func readPid(t *testing.T, path string) int {
	t.Helper()
	raw, err := os.ReadFile(path)
	require.NoError(t, err)
	pid, err := strconv.Atoi(strings.TrimSpace(string(raw)))
	require.NoError(t, err)
	return pid
}

// waitFor polls cond every 250 ms until it holds or timeout passes; cond's
// text says what it saw, for the failure message.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ok, seen := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not after %s (last: %s)", what, timeout, seen)
		}
		time.Sleep(250 * time.Millisecond)
	}
}
