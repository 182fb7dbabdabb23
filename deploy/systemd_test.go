package deploy

import (
	"bufio"
	"bytes"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

const unitBinary = "/usr/local/bin/pegaflow"

// unitSettings reads a unit or env file's KEY=VALUE lines (comments and
// section headers skipped); repeated keys keep every value.
func unitSettings(t *testing.T, path string) map[string][]string {
	t.Helper()
	f, err := os.Open(path)
	require.NoError(t, err)
	defer f.Close()
	out := map[string][]string{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") || strings.HasPrefix(line, "[") {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		require.True(t, ok, "%s: %q is not KEY=VALUE", path, line)
		out[k] = append(out[k], v)
	}
	require.NoError(t, sc.Err())
	return out
}

// serveFlags lists `pegaflow serve`'s flag names from its usage text.
func serveFlags(t *testing.T) map[string]bool {
	t.Helper()
	out, _ := exec.Command(pegaflowBinary(t), "serve", "-h").CombinedOutput()
	flags := map[string]bool{}
	for _, m := range regexp.MustCompile(`(?m)^\s+-([a-z0-9-]+)`).FindAllStringSubmatch(string(out), -1) {
		flags[m[1]] = true
	}
	require.Contains(t, flags, "pool-size", "serve -h:\n%s", out)
	return flags
}

// TestSystemdUnits checks the units carry what the engine needs (socket
// directory, memlock limit, restart policy, a dedicated user sharing the
// socket with vLLM's group), that every PEGAFLOW_* variable in them and in
// the example env files is a real `pegaflow serve` flag (serve would ignore
// a misspelt one), and runs `systemd-analyze verify` where it exists.
func TestSystemdUnits(t *testing.T) {
	flags := serveFlags(t)
	envVar := regexp.MustCompile(`^(?:#)?(PEGAFLOW_[A-Z0-9_]+)=`)
	checkVar := func(where, name string) {
		flag := strings.ToLower(strings.ReplaceAll(strings.TrimPrefix(name, "PEGAFLOW_"), "_", "-"))
		require.True(t, flags[flag], "%s: %s is no `pegaflow serve` flag (--%s)", where, name, flag)
	}
	engine := unitSettings(t, "systemd/pegaflow-engine.service")
	for key, want := range map[string]string{
		"User": "pegaflow", "RuntimeDirectory": "pegaflow", "LimitMEMLOCK": "infinity",
		"Restart": "always", "SupplementaryGroups": "vllm", "ExecStart": unitBinary + " serve",
	} {
		require.Equal(t, []string{want}, engine[key], "pegaflow-engine.service %s", key)
	}
	env := strings.Join(engine["Environment"], "\n")
	for _, want := range []string{"PEGAFLOW_SOCKET=/run/pegaflow/", "PEGAFLOW_SOCKET_GROUP=vllm", "PEGAFLOW_POOL_SIZE=", "PEGAFLOW_HUGEPAGES="} {
		require.Contains(t, env, want, "pegaflow-engine.service Environment")
	}
	router := unitSettings(t, "systemd/pegaflow-router.service")
	require.Equal(t, []string{"/etc/pegaflow/router.env"}, router["EnvironmentFile"], "router: backends are required")
	checkListenDefaults(t, engine, router)
	checkPeerTransportSettings(t, "systemd/engine.env")

	units, err := filepath.Glob("systemd/*.service")
	require.NoError(t, err)
	envFiles, err := filepath.Glob("systemd/*.env")
	require.NoError(t, err)
	require.Len(t, units, 2)
	for _, f := range units {
		for _, e := range unitSettings(t, f)["Environment"] {
			m := envVar.FindStringSubmatch(e)
			require.NotNil(t, m, "%s: Environment=%s", f, e)
			checkVar(f, m[1])
		}
	}
	for _, f := range envFiles {
		raw, err := os.ReadFile(f)
		require.NoError(t, err)
		for _, line := range strings.Split(string(raw), "\n") {
			if m := envVar.FindStringSubmatch(strings.TrimSpace(line)); m != nil {
				checkVar(f, m[1])
			}
		}
	}

	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Log("systemd-analyze not installed: unit syntax not verified")
		return
	}
	// verify insists that ExecStart exists: point it at the real binary.
	dir := t.TempDir()
	var paths []string
	for _, f := range units {
		raw, err := os.ReadFile(f)
		require.NoError(t, err)
		path := filepath.Join(dir, filepath.Base(f))
		require.NoError(t, os.WriteFile(path, bytes.ReplaceAll(raw, []byte(unitBinary), []byte(pegaflowBinary(t))), 0o644))
		paths = append(paths, path)
	}
	out, err := exec.Command(analyze, append([]string{"verify"}, paths...)...).CombinedOutput()
	require.NoError(t, err, "systemd-analyze verify:\n%s", out)
	// Unknown keys are only warnings (exit 0): any output is a finding.
	require.Empty(t, strings.TrimSpace(string(out)), "systemd-analyze verify")
}

// envValue is the value a unit's Environment= lines give name ("" if none).
func envValue(settings map[string][]string, name string) string {
	v := ""
	for _, e := range settings["Environment"] {
		if k, val, _ := strings.Cut(e, "="); k == name {
			v = val
		}
	}
	return v
}

// checkListenDefaults holds the units to explicit listen addresses: the
// engine's HTTP (metrics, health, topology: no API key covers them) on
// loopback, and the router's /kv_ready on a listener of its own, never
// the client-facing port.
func checkListenDefaults(t *testing.T, engine, router map[string][]string) {
	t.Helper()
	host, _, err := net.SplitHostPort(envValue(engine, "PEGAFLOW_HTTP_ADDR"))
	require.NoError(t, err, "pegaflow-engine.service PEGAFLOW_HTTP_ADDR")
	ip := net.ParseIP(host)
	require.True(t, ip != nil && ip.IsLoopback(), "pegaflow-engine.service: HTTP on %q, want loopback by default", host)

	httpAddr, readyAddr := envValue(router, "PEGAFLOW_HTTP_ADDR"), envValue(router, "PEGAFLOW_KV_READY_ADDR")
	require.NotEmpty(t, readyAddr, "pegaflow-router.service: /kv_ready needs its own address (PEGAFLOW_KV_READY_ADDR)")
	_, httpPort, err := net.SplitHostPort(httpAddr)
	require.NoError(t, err)
	_, readyPort, err := net.SplitHostPort(readyAddr)
	require.NoError(t, err)
	require.NotEqual(t, httpPort, readyPort, "pegaflow-router.service: /kv_ready shares the client-facing port")
}

// checkPeerTransportSettings holds engine.env to the safe peer data plane:
// the validated TCP stream set explicitly, and UCX's RDMA-only settings
// present for --peer-transport=rdma but commented out.
func checkPeerTransportSettings(t *testing.T, path string) {
	t.Helper()
	env := unitSettings(t, path)
	require.Equal(t, []string{"tcp"}, env["PEGAFLOW_PEER_TRANSPORT"], "%s", path)
	raw, err := os.ReadFile(path)
	require.NoError(t, err)
	for _, name := range []string{"UCX_TLS", "UCX_NET_DEVICES"} {
		require.NotContains(t, env, name, "%s: %s applies only to --peer-transport=rdma", path, name)
		require.Regexp(t, `(?m)^#`+name+`=`, string(raw), "%s: document %s for --peer-transport=rdma", path, name)
	}
}
