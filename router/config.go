package router

import (
	"errors"
	"flag"
	"fmt"
	"net"
	"net/url"
	"time"

	"github.com/pegaflow/pegaflow/internal/cli"
)

// Handoff is how the decode leg learns that P's KV can be loaded
// (--handoff).
type Handoff string

// Handoff modes.
const (
	// HandoffCallback waits until the transfer's KV is ready (in-process
	// engine or POST /kv_ready) before the decode leg.
	HandoffCallback Handoff = "callback"
	// HandoffSync decodes as soon as P answered and passes P's
	// kv_transfer_params through unchanged (any connector, e.g. NIXL).
	HandoffSync Handoff = "sync"
)

// OnKVTimeout is the policy when the KV-ready wait expires or the
// transfer failed (--on-kv-timeout).
type OnKVTimeout string

// OnKVTimeout policies.
const (
	OnKVTimeoutDecodeAnyway OnKVTimeout = "decode-anyway" // D recomputes what is missing
	OnKVTimeoutFail         OnKVTimeout = "fail"          // 504 to the client
)

// LB is a load-balancing policy (--lb), used for P and D alike; each
// names a selector (selector.go).
type LB string

// Load-balancing policies.
const (
	LBRoundRobin    LB = "round-robin"
	LBLeastInflight LB = "least-inflight" // power of two choices on in-flight count
	// LBKV routes by where the prompt's KV already is (kvroute.go).
	LBKV LB = "kv"
)

// maxBodyLimit caps --max-body-bytes: a body's member offsets are int32.
const maxBodyLimit = 1 << 30

// minBufferedBytes is the least --max-buffered-bytes: room for a few
// ordinary answers.
const minBufferedBytes = 1 << 20

// maxBackends bounds each pool so selection can work on the stack.
const maxBackends = 64

// Config of the router. DefaultConfig gives the documented defaults; New
// rejects a Config that fails Validate.
type Config struct {
	// Prefill and Decode are the P/D backends: base URLs (http://p1:8100)
	// or DNS names re-resolved every ResolveInterval, each address a
	// backend (dns://pegaflow-prefill.ns.svc.cluster.local:8100).
	Prefill, Decode []string
	// Backends are aggregated (non-disaggregated) servers: each request goes
	// whole to one of them, no prefill leg. Exclusive with Prefill/Decode.
	// Same forms as Prefill.
	Backends        []string
	ResolveInterval time.Duration // how often dns:// backends are re-resolved
	Handoff         Handoff
	KVReadyTimeout  time.Duration
	OnKVTimeout     OnKVTimeout
	LB              LB

	ConnectTimeout    time.Duration // dialing a backend
	PrefillTimeout    time.Duration // one whole prefill attempt (P answers after its prefill)
	FirstByteTimeout  time.Duration // decode: until D's first response byte (first SSE event when streaming)
	IdleStreamTimeout time.Duration // decode stream: longest gap between reads
	DecodeTimeout     time.Duration // one whole decode attempt (caps non-streaming answers too)
	// ClientWriteTimeout bounds every write (and flush) to a client: one
	// that stops reading for this long is cut.
	ClientWriteTimeout time.Duration
	// ClientReadTimeout bounds reading a request's body: a client that
	// sends the headers and then stalls holds no handler longer.
	ClientReadTimeout time.Duration

	PrefillAttempts int           // attempts, each on another P
	DecodeAttempts  int           // attempts before the first byte reached the client, each on another D
	RetryBackoff    time.Duration // delay before the first retry, doubled per retry
	RetryBackoffMax time.Duration // cap on the retry delay

	HealthInterval time.Duration // active GET /health polling; 0 disables
	HealthTimeout  time.Duration // one poll (also bounds GET /v1/models)
	FailThreshold  int           // consecutive failures that eject a backend
	Cooldown       time.Duration // how long an ejected backend stays out

	APIKey       string // when set, clients must send Authorization: Bearer <APIKey>
	MaxBodyBytes int64  // largest accepted request body
	// MaxBufferedBytes bounds the answer bytes the router holds at once,
	// all requests together (buffered.go): beyond it a request gets 503.
	MaxBufferedBytes int64

	// KVReadyURL is put in kv_transfer_params as pegaflow_ready_url. Empty:
	// http://<InternalAddr or ListenAddr>/kv_ready (an unspecified host
	// becomes 127.0.0.1, so remote engines need it set explicitly).
	KVReadyURL string
	// InternalAddr, when set, is where the caller serves InternalHandler
	// (/kv_ready alone); Register then leaves /kv_ready off the main server.
	InternalAddr string
	// ListenAddr is the main (--http-addr) address; set by the caller.
	ListenAddr string

	// UpstreamClient is the legs' HTTP client: UpstreamPegaFlow
	// (router/upstream) or UpstreamNetHTTP (net/http, the fallback).
	UpstreamClient UpstreamClient

	// The KV policy (--lb kv). KVEngines map backend hosts to engine peer
	// addresses (BACKEND_HOST[:PORT]=ENGINE_HOST:PORT); otherwise a
	// backend's engine is its host at KVEnginePort, or the in-process
	// engine for a loopback backend when KVEnginePort is 0.
	KVEngines         []string
	KVEnginePort      int
	KVLookupBudget    time.Duration // all of a request's engine lookups
	KVTokenizeTimeout time.Duration // one POST /tokenize
	// KVBlockSize, KVHashAlgo and KVHashSeed must be the backends' vLLM
	// block_size, prefix_caching_hash_algo and PYTHONHASHSEED ("": unset).
	KVBlockSize int
	KVHashAlgo  string
	KVHashSeed  string
	// KVHashMemo bounds the memory remembering recent prompts' block
	// hashes (kvmemo.go); 0: every prompt hashed in full.
	KVHashMemo   cli.ByteSize
	KVFallbackLB LB // requests the KV policy cannot route
	// PDBypassRatio: a D whose host holds at least this share of the
	// prompt gets the request alone, without P (0: never).
	PDBypassRatio float64
}

// DefaultConfig returns the defaults documented in docs/router.md.
func DefaultConfig() Config {
	return Config{
		Handoff:            HandoffCallback,
		KVReadyTimeout:     30 * time.Second,
		OnKVTimeout:        OnKVTimeoutDecodeAnyway,
		LB:                 LBRoundRobin,
		ConnectTimeout:     3 * time.Second,
		PrefillTimeout:     2 * time.Minute,
		FirstByteTimeout:   time.Minute,
		IdleStreamTimeout:  time.Minute,
		DecodeTimeout:      30 * time.Minute,
		ClientWriteTimeout: 30 * time.Second,
		ClientReadTimeout:  30 * time.Second,
		PrefillAttempts:    3,
		DecodeAttempts:     3,
		RetryBackoff:       50 * time.Millisecond,
		RetryBackoffMax:    time.Second,
		HealthInterval:     5 * time.Second,
		HealthTimeout:      2 * time.Second,
		FailThreshold:      3,
		Cooldown:           10 * time.Second,
		MaxBodyBytes:       16 << 20,
		MaxBufferedBytes:   256 << 20,
		ResolveInterval:    5 * time.Second,
		UpstreamClient:     UpstreamPegaFlow,
		KVLookupBudget:     5 * time.Millisecond,
		KVTokenizeTimeout:  250 * time.Millisecond,
		KVBlockSize:        16,
		KVHashAlgo:         "sha256",
		KVHashMemo:         64 << 20,
		KVFallbackLB:       LBLeastInflight,
	}
}

// byteSizeFlag adapts an int64 byte count to cli's size syntax (16MiB).
type byteSizeFlag struct{ p *int64 }

func (b byteSizeFlag) String() string {
	if b.p == nil {
		return "0"
	}
	// The short form only when it is exact (FormatBytes rounds).
	if s := cli.FormatBytes(uint64(*b.p)); *b.p >= 0 {
		if n, err := cli.ParseBytes(s); err == nil && n == uint64(*b.p) {
			return s
		}
	}
	return fmt.Sprint(*b.p)
}

func (b byteSizeFlag) Set(v string) error {
	n, err := cli.ParseBytes(v)
	if err != nil {
		return err
	}
	if n > 1<<62 {
		return fmt.Errorf("size %q is too large", v)
	}
	*b.p = int64(n)
	return nil
}

// BindFlags registers every router flag on fs, with c's values as defaults.
// List flags repeat (--prefill a --prefill b) and, through cli.Parse, take a
// comma-separated PEGAFLOW_PREFILL / PEGAFLOW_DECODE.
func BindFlags(fs *flag.FlagSet, c *Config) {
	fs.Var((*cli.StringList)(&c.Prefill), "prefill", "prefill (P) backend base URL, e.g. http://p1:8100, or dns://name:port (every address it resolves to, re-resolved); repeatable")
	fs.Var((*cli.StringList)(&c.Decode), "decode", "decode (D) backend base URL or dns://name:port; repeatable")
	fs.Var((*cli.StringList)(&c.Backends), "backend", "aggregated backend base URL or dns://name:port (whole requests, no P/D); repeatable; not with --prefill/--decode")
	fs.DurationVar(&c.ResolveInterval, "resolve-interval", c.ResolveInterval, "how often dns:// backends are re-resolved")
	fs.StringVar((*string)(&c.Handoff), "handoff", string(c.Handoff), "callback (decode once the KV is ready) or sync (decode right after P answered; P's kv_transfer_params passed through)")
	fs.DurationVar(&c.KVReadyTimeout, "kv-ready-timeout", c.KVReadyTimeout, "longest wait for a transfer's KV to be ready (callback handoff)")
	fs.StringVar((*string)(&c.OnKVTimeout), "on-kv-timeout", string(c.OnKVTimeout), "when the KV is not ready in time or the transfer failed: decode-anyway (D recomputes what is missing) or fail (504)")
	fs.StringVar((*string)(&c.LB), "lb", string(c.LB), "backend selection: round-robin, least-inflight (power of two choices) or kv (where the prompt's KV already is; docs/router.md)")
	fs.Var((*cli.StringList)(&c.KVEngines), "kv-engine", "--lb kv: BACKEND_HOST[:PORT]=ENGINE_HOST:PORT, the engine (peer address) serving a backend; repeatable")
	fs.IntVar(&c.KVEnginePort, "kv-engine-port", c.KVEnginePort, "--lb kv: the engines' peer port: a backend's engine is its host at this port (dns:// backends too); 0: loopback backends use the engine in this process")
	fs.DurationVar(&c.KVLookupBudget, "kv-lookup-budget", c.KVLookupBudget, "--lb kv: longest wait for the engines' lookups (all in parallel); a slower engine counts as no hit")
	fs.DurationVar(&c.KVTokenizeTimeout, "kv-tokenize-timeout", c.KVTokenizeTimeout, "--lb kv: longest wait for a backend's POST /tokenize (beyond: --kv-fallback-lb)")
	fs.IntVar(&c.KVBlockSize, "kv-block-size", c.KVBlockSize, "--lb kv: the backends' vLLM --block-size")
	fs.StringVar(&c.KVHashAlgo, "kv-hash-algo", c.KVHashAlgo, "--lb kv: the backends' vLLM --prefix-caching-hash-algo")
	fs.StringVar(&c.KVHashSeed, "kv-hash-seed", c.KVHashSeed, "--lb kv: the backends' PYTHONHASHSEED (empty: unset, vLLM's fixed default)")
	fs.Var(&c.KVHashMemo, "kv-hash-memo", "--lb kv: memory remembering recent prompts' block hashes, so a shared prefix (multi-turn, system prompt) is not hashed again (0: off)")
	fs.StringVar((*string)(&c.KVFallbackLB), "kv-fallback-lb", string(c.KVFallbackLB), "--lb kv: round-robin or least-inflight for requests it cannot route by KV (multimodal, tokenize failed)")
	fs.Float64Var(&c.PDBypassRatio, "pd-bypass-ratio", c.PDBypassRatio, "--lb kv, P/D: when a D's host holds at least this share of the prompt, send the request to that D alone, no P (0: never)")
	fs.DurationVar(&c.ConnectTimeout, "connect-timeout", c.ConnectTimeout, "backend dial timeout")
	fs.DurationVar(&c.PrefillTimeout, "prefill-timeout", c.PrefillTimeout, "timeout of one whole prefill attempt")
	fs.DurationVar(&c.FirstByteTimeout, "first-byte-timeout", c.FirstByteTimeout, "decode: timeout until D's first byte (first SSE event when streaming)")
	fs.DurationVar(&c.IdleStreamTimeout, "idle-stream-timeout", c.IdleStreamTimeout, "decode stream: longest gap between two reads from D")
	fs.DurationVar(&c.DecodeTimeout, "decode-timeout", c.DecodeTimeout, "timeout of one whole decode attempt (bounds non-streaming answers)")
	fs.DurationVar(&c.ClientWriteTimeout, "client-write-timeout", c.ClientWriteTimeout, "longest a write to a client may block (a client that stops reading is cut)")
	fs.DurationVar(&c.ClientReadTimeout, "client-read-timeout", c.ClientReadTimeout, "longest a client may take to send a request body (408 beyond)")
	fs.IntVar(&c.PrefillAttempts, "prefill-attempts", c.PrefillAttempts, "prefill attempts, each on another P (on connect error, timeout, 5xx, 429)")
	fs.IntVar(&c.DecodeAttempts, "decode-attempts", c.DecodeAttempts, "decode attempts, each on another D, while no byte reached the client")
	fs.DurationVar(&c.RetryBackoff, "retry-backoff", c.RetryBackoff, "delay before the first retry, doubled per retry (with jitter)")
	fs.DurationVar(&c.RetryBackoffMax, "retry-backoff-max", c.RetryBackoffMax, "cap on the retry delay")
	fs.DurationVar(&c.HealthInterval, "health-interval", c.HealthInterval, "active GET /health polling of every backend (0 disables)")
	fs.DurationVar(&c.HealthTimeout, "health-timeout", c.HealthTimeout, "timeout of one health poll")
	fs.IntVar(&c.FailThreshold, "fail-threshold", c.FailThreshold, "consecutive request failures that eject a backend (passive health)")
	fs.DurationVar(&c.Cooldown, "cooldown", c.Cooldown, "how long an ejected backend stays out of selection")
	fs.StringVar(&c.APIKey, "api-key", c.APIKey, "require Authorization: Bearer <key> from clients (prefer PEGAFLOW_API_KEY)")
	fs.Var(byteSizeFlag{&c.MaxBodyBytes}, "max-body-bytes", "largest accepted request body, e.g. 16MiB (413 beyond)")
	fs.Var(byteSizeFlag{&c.MaxBufferedBytes}, "max-buffered-bytes", "most bytes of non-streaming answers the router holds at once, all requests together (503 with Retry-After beyond)")
	fs.StringVar(&c.KVReadyURL, "kv-ready-url", c.KVReadyURL, "URL engines POST readiness to (default http://<kv-ready-addr or http-addr>/kv_ready)")
	fs.StringVar(&c.InternalAddr, "kv-ready-addr", c.InternalAddr, "serve /kv_ready alone on this separate (internal) address instead of --http-addr")
	fs.StringVar((*string)(&c.UpstreamClient), "upstream-client", string(c.UpstreamClient), "the legs' HTTP client: pegaflow (router/upstream) or nethttp (Go's net/http, a fallback)")
}

// Enabled reports whether any backend was given, i.e. whether the caller
// should run the router at all.
func (c Config) Enabled() bool {
	return len(c.Prefill) > 0 || len(c.Decode) > 0 || len(c.Backends) > 0
}

// Aggregated reports whether the router runs in aggregated mode (--backend).
func (c Config) Aggregated() bool { return len(c.Backends) > 0 }

// Validate checks the configuration with messages fit for a CLI user.
func (c Config) Validate() error {
	var errs []error
	add := func(format string, a ...any) { errs = append(errs, fmt.Errorf(format, a...)) }
	type urlList struct {
		flag string
		urls []string
	}
	lists := []urlList{{"--prefill", c.Prefill}, {"--decode", c.Decode}}
	if c.Aggregated() {
		// One router is one mode: mixing would need a policy for which
		// requests go P/D, and the demo's baseline wants them apart.
		if len(c.Prefill) > 0 || len(c.Decode) > 0 {
			add("--backend (aggregated mode) cannot be combined with --prefill/--decode (P/D mode): run one router per mode")
		}
		lists = []urlList{{"--backend", c.Backends}}
	}
	for _, l := range lists {
		if len(l.urls) == 0 {
			add("%s: at least one backend URL is required (e.g. %s http://host:8100)", l.flag, l.flag)
		}
		if len(l.urls) > maxBackends {
			add("%s: at most %d backends", l.flag, maxBackends)
		}
		seen := map[string]bool{}
		for _, u := range l.urls {
			norm, err := normalizeBackendURL(u)
			if isDNSTarget(u) {
				var t *dnsTarget
				if t, err = parseDNSTarget(u); err == nil {
					norm = t.key()
				}
			}
			if err != nil {
				add("%s %q: %v", l.flag, redactURL(u), err)
				continue
			}
			if seen[norm] {
				add("%s %q: given twice", l.flag, redactURL(u))
			}
			seen[norm] = true
		}
	}
	if c.UpstreamClient != UpstreamPegaFlow && c.UpstreamClient != UpstreamNetHTTP {
		add("--upstream-client %q: want %s or %s", c.UpstreamClient, UpstreamPegaFlow, UpstreamNetHTTP)
	}
	if c.Handoff != HandoffCallback && c.Handoff != HandoffSync {
		add("--handoff %q: want %s or %s", c.Handoff, HandoffCallback, HandoffSync)
	}
	if c.OnKVTimeout != OnKVTimeoutDecodeAnyway && c.OnKVTimeout != OnKVTimeoutFail {
		add("--on-kv-timeout %q: want %s or %s", c.OnKVTimeout, OnKVTimeoutDecodeAnyway, OnKVTimeoutFail)
	}
	if newSelector(c.LB, c.KVFallbackLB) == nil {
		add("--lb %q: want %s, %s or %s", c.LB, LBRoundRobin, LBLeastInflight, LBKV)
	}
	errs = append(errs, c.validateKV()...)
	for _, d := range []struct {
		flag string
		v    time.Duration
	}{
		{"--kv-ready-timeout", c.KVReadyTimeout}, {"--connect-timeout", c.ConnectTimeout},
		{"--prefill-timeout", c.PrefillTimeout}, {"--first-byte-timeout", c.FirstByteTimeout},
		{"--idle-stream-timeout", c.IdleStreamTimeout}, {"--decode-timeout", c.DecodeTimeout},
		{"--health-timeout", c.HealthTimeout}, {"--cooldown", c.Cooldown},
		{"--client-write-timeout", c.ClientWriteTimeout}, {"--client-read-timeout", c.ClientReadTimeout},
		{"--resolve-interval", c.ResolveInterval},
	} {
		if d.v <= 0 {
			add("%s must be positive (got %s)", d.flag, d.v)
		}
	}
	if c.HealthInterval < 0 {
		add("--health-interval must be >= 0 (0 disables polling)")
	}
	if c.RetryBackoff < 0 || c.RetryBackoffMax < c.RetryBackoff {
		add("--retry-backoff must be >= 0 and at most --retry-backoff-max")
	}
	for _, n := range []struct {
		flag string
		v    int
	}{{"--prefill-attempts", c.PrefillAttempts}, {"--decode-attempts", c.DecodeAttempts}, {"--fail-threshold", c.FailThreshold}} {
		if n.v < 1 {
			add("%s must be at least 1 (got %d)", n.flag, n.v)
		}
	}
	if c.MaxBodyBytes < 1024 || c.MaxBodyBytes > maxBodyLimit {
		add("--max-body-bytes must be between 1KiB and 1GiB (got %d)", c.MaxBodyBytes)
	}
	if c.MaxBufferedBytes < minBufferedBytes {
		add("--max-buffered-bytes must be at least 1MiB (got %d)", c.MaxBufferedBytes)
	}
	if c.KVReadyURL != "" {
		if u, err := url.Parse(c.KVReadyURL); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			add("--kv-ready-url %q: want an http(s) URL like http://router:8080/kv_ready", c.KVReadyURL)
		}
	}
	if c.InternalAddr != "" {
		if _, _, err := net.SplitHostPort(c.InternalAddr); err != nil {
			add("--kv-ready-addr %q: want host:port (%v)", c.InternalAddr, err)
		}
	}
	return errors.Join(errs...)
}

// readyURL is the /kv_ready address put in the prefill leg's
// kv_transfer_params ("" when it cannot be derived).
func (c Config) readyURL() string {
	if c.KVReadyURL != "" {
		return c.KVReadyURL
	}
	addr := c.ListenAddr
	if c.InternalAddr != "" {
		addr = c.InternalAddr
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return ""
	}
	if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
		host = "127.0.0.1"
	}
	return "http://" + net.JoinHostPort(host, port) + "/kv_ready"
}

// maxKVBlockSize bounds --kv-block-size (vLLM's largest is far below).
const maxKVBlockSize = 1 << 16

// maxKVHashMemo bounds --kv-hash-memo (it is allocated at start).
const maxKVHashMemo = 16 << 30

// validateKV checks the KV policy's flags (given only with --lb kv).
func (c Config) validateKV() []error {
	var errs []error
	add := func(format string, a ...any) { errs = append(errs, fmt.Errorf(format, a...)) }
	if c.PDBypassRatio < 0 || c.PDBypassRatio > 1 || c.PDBypassRatio != c.PDBypassRatio {
		add("--pd-bypass-ratio must be between 0 (off) and 1 (got %v)", c.PDBypassRatio)
	}
	if c.LB != LBKV {
		if c.PDBypassRatio > 0 || len(c.KVEngines) > 0 {
			add("--pd-bypass-ratio and --kv-engine need --lb kv")
		}
		return errs
	}
	if c.Aggregated() && c.PDBypassRatio > 0 {
		add("--pd-bypass-ratio is for P/D mode (--prefill/--decode), not --backend")
	}
	if c.KVFallbackLB != LBRoundRobin && c.KVFallbackLB != LBLeastInflight {
		add("--kv-fallback-lb %q: want %s or %s", c.KVFallbackLB, LBRoundRobin, LBLeastInflight)
	}
	if c.KVLookupBudget <= 0 || c.KVLookupBudget > time.Second {
		add("--kv-lookup-budget must be positive and at most 1s (got %s)", c.KVLookupBudget)
	}
	if c.KVTokenizeTimeout <= 0 {
		add("--kv-tokenize-timeout must be positive (got %s)", c.KVTokenizeTimeout)
	}
	if c.KVBlockSize < 1 || c.KVBlockSize > maxKVBlockSize {
		add("--kv-block-size must be between 1 and %d (got %d)", maxKVBlockSize, c.KVBlockSize)
	}
	if c.KVEnginePort < 0 || c.KVEnginePort > 65535 {
		add("--kv-engine-port must be a port (1..65535) or 0 (got %d)", c.KVEnginePort)
	}
	if _, err := parseKVEngines(c.KVEngines, c.KVEnginePort); err != nil {
		errs = append(errs, err)
	}
	if c.KVHashMemo > maxKVHashMemo {
		add("--kv-hash-memo %s: at most %s", c.KVHashMemo.String(), cli.FormatBytes(maxKVHashMemo))
	}
	if _, err := newKVHasher(c.KVHashAlgo, c.KVHashSeed, max(c.KVBlockSize, 1), 0); err != nil {
		add("--kv-hash-algo/--kv-hash-seed: %v", err)
	}
	return errs
}
