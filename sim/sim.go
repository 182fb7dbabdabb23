// Package sim is `pegaflow sim`: a stand-in for one vLLM instance running
// with PegaFlow's connector, for demos and end-to-end tests without GPUs.
//
// It serves the OpenAI API (/v1/completions, /v1/chat/completions, streaming
// or not, /v1/models, /health, /metrics) and vLLM's POST /tokenize, and
// models one accelerator: a scheduler loop batches decode tokens and prefill chunks per step and takes
// each step's time from a CostModel, so a long prefill stalls the decodes
// that share its instance.
//
// Its KV cache is real memory: a shared-memory file per layer shaped like
// vLLM's FlashAttention cache, registered with the engine as TP rank 0 with
// split K/V segments. Prompts are tokenized deterministically, full blocks
// get vLLM's chained sha256_cbor hashes, and the KV bytes written for a token
// are a function of its position and its token prefix. Roles follow the
// request's kv_transfer_params as with vLLM:
//
//   - do_remote_decode (P): prefill, answer with one token at once, then
//     save the prompt's full blocks through the engine API tagged with
//     pegaflow_transfer_id (transfer_last, ready_url/ready_token), and return
//     kv_transfer_params for the decode leg (with pegaflow_source_engine,
//     the engine's peer address, when it serves peers);
//   - do_remote_prefill (D): query the engine (bounded wait, lease; naming
//     pegaflow_source_engine as the query's source_engine, so that an
//     engine on another host than P's fetches the KV from P's), load the
//     hit blocks, verify every loaded byte against what the tokens imply (a
//     mismatch fails the request with HTTP 500 and counts in
//     sim_kv_verify_failures_total), skip their prefill cost, and decode;
//   - neither: serve alone (aggregated).
//
// With a KVRole (--kv-role), as vLLM with the connector in that role,
// every request also loads the prefix its engine holds (kv_both,
// kv_consumer: a P/D bypass or a chat's next turn) and saves every full
// block it computed, generated tokens' included (kv_both, kv_producer).
//
// Output text depends only on the prompt tokens and the sampling seed, so
// P/D and aggregated serving of a prompt give the same text.
//
// The pieces, each in its own file:
//   - sim.go (this file): Config, Sim's wiring, Run and the HTTP routes;
//     flags.go: its flags;
//   - request.go: parsing and validating a generation request (prompt or
//     messages, limits, the role from kv_transfer_params);
//   - generate.go: serving it: submit to the scheduler, relay the tokens,
//     count the latencies;
//   - connector.go: what vLLM's connector does around it: P saves the
//     prompt's full blocks through the engine, D queries, loads and
//     verifies them;
//   - writer.go: the OpenAI answer, streamed or whole; tokenize.go: POST
//     /tokenize;
//   - scheduler.go: the step loop and its CostModel; alloc.go: KV blocks;
//   - kvcache.go: the shared-memory KV cache and its expected bytes;
//     blockhash.go: vLLM's block hashes (internal/vllmhash); tokenizer.go: tokens and sampling;
//   - enginelink.go: the engine session (dial, register, re-dial on loss);
//   - metrics.go: the vLLM-named metrics.
package sim

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"sync"
	"time"

	"github.com/labstack/echo/v4"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	pb "github.com/pegaflow/pegaflow/engine/api/pegaflowv1"
	"github.com/pegaflow/pegaflow/internal/ids"
	"github.com/pegaflow/pegaflow/internal/kvtest"
	"github.com/pegaflow/pegaflow/internal/openai"
	"github.com/pegaflow/pegaflow/internal/vllmhash"
)

// Config sets up a Sim. Start from DefaultConfig.
type Config struct {
	// Model is the served model name (also part of the engine namespace).
	Model string
	// VocabSize of the tokenizer; instances sharing KV must agree.
	VocabSize int
	// HashSeed derives NONE_HASH (vLLM's PYTHONHASHSEED; "" = unset, vLLM's
	// fixed default); instances sharing KV must agree. The namespace
	// records its fingerprint as the connector does, so a router's lookup
	// with the same seed matches it.
	HashSeed string
	Geometry Geometry
	// MaxModelLen caps prompt + output tokens of a request.
	MaxModelLen int
	// MaxNumSeqs caps the running batch; MaxBatchTokens caps the tokens
	// (decodes + prefill chunks) of one step.
	MaxNumSeqs, MaxBatchTokens int
	Cost                       CostModel
	// ShmDir holds the KV cache files (default /dev/shm, else the temp dir).
	ShmDir string
	// EngineSocket is the engine's UNIX socket; empty runs without an
	// engine (kv_transfer_params are then ignored, as vLLM ignores them
	// without a connector).
	EngineSocket string
	// InstanceID names this instance to the engine; empty derives one from
	// the listen address.
	InstanceID string
	// KVQueryWait bounds how long a decode-side query waits for an
	// in-flight transfer.
	KVQueryWait time.Duration
	// EngineTimeout bounds each engine call (save, load).
	EngineTimeout time.Duration
	// KVRole is the connector's kv_role beyond the P/D legs: "" (the
	// legs alone: P saves, D loads, a request without kv_transfer_params
	// touches no engine), KVBoth, KVProducer or KVConsumer, which behave
	// as vLLM with PegaFlow's connector in that role: every request loads
	// the prefix its engine holds (consumer, both) and saves every full
	// block it computed, generated tokens' too (producer, both), so a P/D
	// bypass loads locally and a chat's next turn finds the answer's KV.
	KVRole string
	// CorruptSavedKV is fault injection for tests: before each save the
	// sim flips one byte of the first block in its own KV memory, so the
	// engine stores bytes that do not match the tokens.
	CorruptSavedKV bool
}

// DefaultConfig returns `pegaflow sim`'s defaults: a small model whose
// steps take milliseconds, so a laptop shows P/D effects in seconds.
func DefaultConfig() Config {
	return Config{
		Model:          "pegaflow-sim",
		VocabSize:      32000,
		HashSeed:       "0",
		Geometry:       Geometry{NumLayers: 4, NumBlocks: 1024, BlockSize: 16, NumKVHeads: 2, HeadSize: 64},
		MaxModelLen:    8192,
		MaxNumSeqs:     64,
		MaxBatchTokens: 2048,
		Cost:           CostModel{StepBase: 8 * time.Millisecond, PrefillPerToken: 40 * time.Microsecond, DecodePerToken: 100 * time.Microsecond},
		KVQueryWait:    2 * time.Second,
		EngineTimeout:  30 * time.Second,
	}
}

// Validate reports the first invalid field.
func (c *Config) Validate() error {
	if err := c.Geometry.validate(); err != nil {
		return err
	}
	switch {
	case c.Model == "":
		return errors.New("model name is empty")
	case c.VocabSize < MinVocabSize:
		return fmt.Errorf("vocab size %d: want at least %d", c.VocabSize, MinVocabSize)
	case c.MaxModelLen < 2:
		return fmt.Errorf("max model len %d: want at least 2", c.MaxModelLen)
	case c.MaxNumSeqs < 1:
		return fmt.Errorf("max num seqs %d: want at least 1", c.MaxNumSeqs)
	case c.MaxBatchTokens < c.MaxNumSeqs:
		return fmt.Errorf("max batch tokens %d: want at least max num seqs (%d) so every running sequence can decode each step", c.MaxBatchTokens, c.MaxNumSeqs)
	case c.Cost.StepBase < 0 || c.Cost.PrefillPerToken < 0 || c.Cost.DecodePerToken < 0:
		return errors.New("cost model times must not be negative")
	case c.KVQueryWait < 0 || c.KVQueryWait > time.Minute:
		return fmt.Errorf("KV query wait %s: want 0..1m", c.KVQueryWait)
	case c.KVRole != "" && c.KVRole != KVBoth && c.KVRole != KVProducer && c.KVRole != KVConsumer:
		return fmt.Errorf("kv role %q: want %s, %s or %s (or empty: the P/D legs alone)", c.KVRole, KVBoth, KVProducer, KVConsumer)
	case c.EngineTimeout <= 0:
		return fmt.Errorf("engine timeout %s: want a positive duration", c.EngineTimeout)
	}
	if _, err := noneHash(c.HashSeed); err != nil {
		return fmt.Errorf("hash seed: %w", err)
	}
	return nil
}

// Sim is one simulated vLLM instance. Create with New, then Run.
type Sim struct {
	cfg      Config
	log      *slog.Logger
	gatherer prometheus.Gatherer
	m        *metrics
	tok      *Tokenizer
	noneHash []byte
	kv       *kvCache
	pool     *blockPool
	sched    *scheduler
	engine   *engineLink // nil without EngineSocket
	saves    sync.WaitGroup
	ran      bool
	// Set by Run: the sim's lifetime (saves outlive their request).
	lifeCtx context.Context
	wake    chan struct{}
}

// New allocates the KV cache. reg receives the sim's metrics; when it is
// also a prometheus.Gatherer (a *prometheus.Registry is), /metrics serves
// it. The caller must Run the sim (which releases the cache when it
// returns).
func New(cfg Config, log *slog.Logger, reg prometheus.Registerer) (*Sim, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	tok, err := NewTokenizer(cfg.VocabSize)
	if err != nil {
		return nil, err
	}
	dir := cfg.ShmDir
	if dir == "" {
		dir = kvtest.ShmDir()
	}
	none, err := noneHash(cfg.HashSeed)
	if err != nil {
		return nil, err
	}
	kv, err := newKVCache(dir, fmt.Sprintf("pegaflow-sim-%d-%s", os.Getpid(), ids.Hex(4)), cfg.Geometry)
	if err != nil {
		return nil, err
	}
	s := &Sim{
		cfg: cfg, log: log, m: newMetrics(reg, cfg.Model), tok: tok, noneHash: none,
		kv: kv, pool: newBlockPool(cfg.Geometry.NumBlocks), wake: make(chan struct{}, 1),
	}
	if g, ok := reg.(prometheus.Gatherer); ok {
		s.gatherer = g
	}
	s.sched = &scheduler{
		cost: cfg.Cost, maxBatchTokens: cfg.MaxBatchTokens, maxNumSeqs: cfg.MaxNumSeqs,
		kv: kv, pool: s.pool, sampler: Sampler{tok: tok}, m: s.m, in: make(chan *seq), wake: s.wake,
	}
	return s, nil
}

// Namespace is the engine namespace of this sim's KV: instances with equal
// namespaces (and hash seeds) share blocks.
func (s *Sim) Namespace() *pb.Namespace {
	g := s.cfg.Geometry
	return &pb.Namespace{
		Model: s.cfg.Model, Dtype: "bfloat16", KvLayout: "flash_attn", BlockSize: uint32(g.BlockSize),
		TpSize: 1, NumLayers: uint32(g.NumLayers), NumKvHeads: uint32(g.NumKVHeads), HeadSize: uint32(g.HeadSize),
		HashAlgo: HashAlgo, HashSeedFingerprint: vllmhash.SeedFingerprint(HashAlgo, s.cfg.HashSeed),
		Extra: map[string]string{"sim_vocab_size": fmt.Sprint(s.cfg.VocabSize)},
	}
}

// Run serves HTTP on ln, runs the scheduler and, with an engine socket,
// keeps the engine registration, until ctx ends. It then fails requests in
// flight, waits (bounded) for saves, unregisters, and removes the KV cache.
// A Sim runs once.
func (s *Sim) Run(ctx context.Context, ln net.Listener) error {
	if s.ran {
		return errors.New("sim: Run called twice")
	}
	s.ran = true
	defer s.kv.Close()
	instanceID := s.cfg.InstanceID
	if instanceID == "" {
		instanceID = "sim@" + ln.Addr().String()
	}
	life, stopLife := context.WithCancel(context.Background())
	defer stopLife()
	s.lifeCtx = life

	schedCtx, stopSched := context.WithCancel(context.Background())
	schedDone := make(chan struct{})
	go func() { defer close(schedDone); s.sched.run(schedCtx) }()

	linkDone := make(chan struct{})
	engCtx, stopEngine := context.WithCancel(context.Background())
	if s.cfg.EngineSocket != "" {
		s.engine = &engineLink{socket: s.cfg.EngineSocket, instanceID: instanceID, ns: s.Namespace(),
			kv: s.kv, log: s.log}
		go func() { defer close(linkDone); s.engine.run(engCtx) }()
	} else {
		close(linkDone)
	}

	srv := &http.Server{Handler: s.handler(), ReadHeaderTimeout: 10 * time.Second}
	srvErr := make(chan error, 1)
	go func() { srvErr <- srv.Serve(ln) }()
	s.log.Info("sim serving", "addr", ln.Addr().String(), "model", s.cfg.Model, "instance", instanceID, "engine", s.cfg.EngineSocket)

	var err error
	select {
	case <-ctx.Done():
	case err = <-srvErr:
	}
	// Fail what is in flight so handlers return, then stop the server.
	stopSched()
	<-schedDone
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	_ = srv.Shutdown(sctx)
	cancel()
	// Saves are bounded by EngineTimeout; give them that long, then stop.
	waited := make(chan struct{})
	go func() { s.saves.Wait(); close(waited) }()
	select {
	case <-waited:
	case <-time.After(s.cfg.EngineTimeout):
		s.log.Warn("saves still running at shutdown; abandoning them")
	}
	stopLife()
	stopEngine()
	<-linkDone
	if errors.Is(err, http.ErrServerClosed) {
		err = nil
	}
	return err
}

// engineReady reports whether the sim can serve every role: it holds an
// engine registration, or runs without an engine.
func (s *Sim) engineReady() bool { return s.engine == nil || s.engine.connected() }

func (s *Sim) handler() http.Handler {
	e := echo.New()
	e.HideBanner, e.HidePort = true, true
	e.HTTPErrorHandler = func(err error, c echo.Context) {
		code, msg := http.StatusInternalServerError, err.Error()
		var he *echo.HTTPError
		if errors.As(err, &he) {
			code, msg = he.Code, fmt.Sprint(he.Message)
		}
		if !c.Response().Committed {
			_ = writeError(c, code, msg)
		}
	}
	e.POST("/v1/completions", func(c echo.Context) error { return s.serveGenerate(c, false) })
	e.POST("/v1/chat/completions", func(c echo.Context) error { return s.serveGenerate(c, true) })
	e.POST("/tokenize", s.serveTokenize)
	e.GET("/v1/models", s.serveModels)
	e.GET("/health", func(c echo.Context) error {
		if !s.engineReady() {
			return writeError(c, http.StatusServiceUnavailable, "not registered with the KV engine at "+s.cfg.EngineSocket)
		}
		return c.NoContent(http.StatusOK)
	})
	if s.gatherer != nil {
		e.GET("/metrics", echo.WrapHandler(promhttp.HandlerFor(s.gatherer, promhttp.HandlerOpts{})))
	}
	return e
}

func (s *Sim) serveModels(c echo.Context) error {
	return c.JSON(http.StatusOK, map[string]any{
		"object": "list",
		"data": []map[string]any{{
			"id": s.cfg.Model, "object": "model", "created": time.Now().Unix(), "owned_by": "pegaflow-sim",
			"root": s.cfg.Model, "max_model_len": s.cfg.MaxModelLen,
		}},
	})
}

// writeError answers in the OpenAI error shape.
func writeError(c echo.Context, code int, msg string) error {
	typ := "invalid_request_error"
	switch {
	case code == http.StatusNotFound:
		typ = "not_found_error"
	case code >= 500:
		typ = "server_error"
	}
	return c.JSON(code, openai.ErrorBody(msg, typ, code))
}
