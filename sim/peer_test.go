package sim

import (
	"context"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"

	"github.com/pegaflow/pegaflow/engine"
	"github.com/pegaflow/pegaflow/engine/peer"
)

const simPeerToken = "sim-peer-token-sim-peer-token-sim-peer-token"

// servePeerEngine is an engine on its own socket serving the peer API on
// addr (loopback), allowed to fetch from the peers listed in allow.
func servePeerEngine(t *testing.T, addr string, allow ...string) (*engine.Engine, string, *prometheus.Registry) {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "engine.sock")
	reg := prometheus.NewRegistry()
	ctl := peer.NewClient([]byte(simPeerToken))
	t.Cleanup(func() { ctl.Close() })
	eng, _ := serveEngineWith(t, sock, engine.Config{Peers: ctl, PeerAddress: addr, PeerAllow: allow}, reg)
	srv, err := peer.New(peer.Config{Addr: addr, Token: []byte(simPeerToken)}, eng, testLogger(t))
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx) }()
	t.Cleanup(func() { cancel(); <-served })
	return eng, sock, reg
}

func loopbackAddr(t *testing.T) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer lis.Close()
	return lis.Addr().String()
}

// P and D on two engines: P returns its engine's peer address as
// pegaflow_source_engine, D names it in its query, and D's engine fetches
// the prompt's blocks from P's; D verifies every loaded byte.
func TestPDAcrossEnginesNamesTheSource(t *testing.T) {
	aAddr := loopbackAddr(t)
	aEng, aSock, _ := servePeerEngine(t, aAddr)
	_, bSock, bReg := servePeerEngine(t, loopbackAddr(t), aAddr)
	envA := &pdEnv{eng: aEng, socket: aSock, ready: map[string]map[string]string{}}
	envA.serveCallback(t)
	envB := &pdEnv{socket: bSock}
	p := envA.startSim(t, "sim-p", nil)
	d := envB.startSim(t, "sim-d", func(c *Config) { c.KVQueryWait = 5 * time.Second })

	body := map[string]any{"prompt": promptOf(41, "across"), "max_tokens": 3}
	params := envA.prefill(t, p, "/v1/completions", body)
	require.Equal(t, aAddr, params[kvSourceEngine])
	envA.mu.Lock()
	require.Equal(t, aAddr, envA.ready[params["pegaflow_transfer_id"].(string)]["source_engine"], "the /kv_ready report names it too")
	envA.mu.Unlock()
	code, got := post(t, d.url+"/v1/completions", decodeBody(body, params))
	require.Equal(t, 200, code, "%v", got)
	require.EqualValues(t, 10, params["pegaflow_num_blocks"])
	require.EqualValues(t, 40, got["usage"].(map[string]any)["prompt_tokens_details"].(map[string]any)["cached_tokens"])
	require.EqualValues(t, 10, metricValue(t, d.reg, "sim_kv_blocks_loaded_total"))
	require.Zero(t, metricValue(t, d.reg, "sim_kv_verify_failures_total"))
	require.EqualValues(t, 10, metricValue(t, bReg, "pegaflow_engine_peer_fetch_blocks_total"))
}
