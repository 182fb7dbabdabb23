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

// Handoff modes.
const (
	HandoffCallback = "callback" // wait for "transfer ready" before decode
	HandoffSync     = "sync"     // decode as soon as prefill answered
)

// Policies when the KV-ready wait times out or the transfer failed.
const (
	OnTimeoutDecodeAnyway = "decode-anyway"
	OnTimeoutFail         = "fail"
)

// Load-balancing policies.
const (
	LBRoundRobin    = "round-robin"
	LBLeastInflight = "least-inflight"
)

// Config of the router. DefaultConfig gives the documented defaults.
type Config struct {
	Prefill, Decode cli.StringList
	Handoff         string
	KVReadyTimeout  time.Duration
	OnKVTimeout     string
	LB              string

	ConnectTimeout    time.Duration // dialing a backend
	PrefillTimeout    time.Duration // a whole prefill attempt
	FirstByteTimeout  time.Duration // decode response headers
	IdleStreamTimeout time.Duration // gap between decode stream reads
	PrefillAttempts   int
	DecodeAttempts    int
	RetryBackoff      time.Duration

	HealthInterval time.Duration
	HealthTimeout  time.Duration
	FailThreshold  int
	Cooldown       time.Duration

	APIKey       string
	MaxBodyBytes int64
	// KVReadyURL is where engines report readiness; derived from
	// InternalAddr or ListenAddr when empty.
	KVReadyURL string
	// InternalAddr serves /kv_ready alone on a separate address.
	InternalAddr string
	// ListenAddr is the public address (set by the caller).
	ListenAddr string
}

// DefaultConfig returns the defaults documented in docs/router.md.
func DefaultConfig() Config {
	return Config{
		Handoff: HandoffCallback, KVReadyTimeout: 30 * time.Second, OnKVTimeout: OnTimeoutDecodeAnyway,
		LB: LBRoundRobin, ConnectTimeout: 3 * time.Second, PrefillTimeout: 120 * time.Second,
		FirstByteTimeout: 60 * time.Second, IdleStreamTimeout: 60 * time.Second,
		PrefillAttempts: 3, DecodeAttempts: 3, RetryBackoff: 50 * time.Millisecond,
		HealthInterval: 5 * time.Second, HealthTimeout: 2 * time.Second, FailThreshold: 3, Cooldown: 10 * time.Second,
		MaxBodyBytes: 16 << 20,
	}
}

// BindFlags registers the router's flags on fs, with c's values as defaults.
func BindFlags(fs *flag.FlagSet, c *Config) {
	fs.Var(&c.Prefill, "prefill", "prefill (P) backend base URL, repeatable")
	fs.Var(&c.Decode, "decode", "decode (D) backend base URL, repeatable")
	fs.StringVar(&c.Handoff, "handoff", c.Handoff, "callback (wait for KV ready) or sync (decode right after prefill)")
	fs.DurationVar(&c.KVReadyTimeout, "kv-ready-timeout", c.KVReadyTimeout, "longest wait for a transfer's KV to be ready")
	fs.StringVar(&c.OnKVTimeout, "on-kv-timeout", c.OnKVTimeout, "decode-anyway (D recomputes what is missing) or fail (504)")
	fs.StringVar(&c.LB, "lb", c.LB, "round-robin or least-inflight (power of two choices)")
	fs.DurationVar(&c.ConnectTimeout, "connect-timeout", c.ConnectTimeout, "backend dial timeout")
	fs.DurationVar(&c.PrefillTimeout, "prefill-timeout", c.PrefillTimeout, "timeout of one prefill attempt")
	fs.DurationVar(&c.FirstByteTimeout, "first-byte-timeout", c.FirstByteTimeout, "timeout for a decode backend's response headers")
	fs.DurationVar(&c.IdleStreamTimeout, "idle-stream-timeout", c.IdleStreamTimeout, "longest gap between decode stream reads")
	fs.IntVar(&c.PrefillAttempts, "prefill-attempts", c.PrefillAttempts, "prefill attempts, each on another P (connect error, timeout, 5xx, 429)")
	fs.IntVar(&c.DecodeAttempts, "decode-attempts", c.DecodeAttempts, "decode attempts before the first byte reached the client")
	fs.DurationVar(&c.RetryBackoff, "retry-backoff", c.RetryBackoff, "first retry delay, doubled per attempt")
	fs.DurationVar(&c.HealthInterval, "health-interval", c.HealthInterval, "active /health polling interval (0 disables)")
	fs.DurationVar(&c.HealthTimeout, "health-timeout", c.HealthTimeout, "timeout of one /health poll")
	fs.IntVar(&c.FailThreshold, "fail-threshold", c.FailThreshold, "consecutive failures that eject a backend")
	fs.DurationVar(&c.Cooldown, "cooldown", c.Cooldown, "how long an ejected backend stays out")
	fs.StringVar(&c.APIKey, "api-key", c.APIKey, "require Authorization: Bearer <key> from clients")
	fs.Int64Var(&c.MaxBodyBytes, "max-body-bytes", c.MaxBodyBytes, "largest accepted request body")
	fs.StringVar(&c.KVReadyURL, "kv-ready-url", c.KVReadyURL, "URL engines POST readiness to (default: derived from the listen address)")
	fs.StringVar(&c.InternalAddr, "kv-ready-addr", c.InternalAddr, "serve /kv_ready on this separate (internal) address instead")
}

// Enabled reports whether any backend was given.
func (c Config) Enabled() bool { return len(c.Prefill) > 0 || len(c.Decode) > 0 }

// Validate checks the configuration with messages fit for a CLI user.
func (c Config) Validate() error {
	var errs []error
	if len(c.Prefill) == 0 {
		errs = append(errs, errors.New("--prefill: at least one prefill backend is required"))
	}
	if len(c.Decode) == 0 {
		errs = append(errs, errors.New("--decode: at least one decode backend is required"))
	}
	for _, u := range append(append([]string{}, c.Prefill...), c.Decode...) {
		if err := checkURL(u); err != nil {
			errs = append(errs, err)
		}
	}
	if c.Handoff != HandoffCallback && c.Handoff != HandoffSync {
		errs = append(errs, fmt.Errorf("--handoff %q: want callback or sync", c.Handoff))
	}
	if c.OnKVTimeout != OnTimeoutDecodeAnyway && c.OnKVTimeout != OnTimeoutFail {
		errs = append(errs, fmt.Errorf("--on-kv-timeout %q: want decode-anyway or fail", c.OnKVTimeout))
	}
	if c.LB != LBRoundRobin && c.LB != LBLeastInflight {
		errs = append(errs, fmt.Errorf("--lb %q: want round-robin or least-inflight", c.LB))
	}
	for name, d := range map[string]time.Duration{"--kv-ready-timeout": c.KVReadyTimeout, "--connect-timeout": c.ConnectTimeout,
		"--prefill-timeout": c.PrefillTimeout, "--first-byte-timeout": c.FirstByteTimeout, "--idle-stream-timeout": c.IdleStreamTimeout,
		"--health-timeout": c.HealthTimeout} {
		if d <= 0 {
			errs = append(errs, fmt.Errorf("%s must be positive", name))
		}
	}
	if c.PrefillAttempts < 1 || c.DecodeAttempts < 1 || c.FailThreshold < 1 {
		errs = append(errs, errors.New("--prefill-attempts, --decode-attempts and --fail-threshold must be at least 1"))
	}
	if c.MaxBodyBytes < 1024 {
		errs = append(errs, errors.New("--max-body-bytes must be at least 1024"))
	}
	if c.KVReadyURL != "" {
		if err := checkURL(c.KVReadyURL); err != nil {
			errs = append(errs, err)
		}
	}
	if c.InternalAddr != "" {
		if _, _, err := net.SplitHostPort(c.InternalAddr); err != nil {
			errs = append(errs, fmt.Errorf("--kv-ready-addr %q: %w", c.InternalAddr, err))
		}
	}
	return errors.Join(errs...)
}

func checkURL(raw string) error {
	u, err := url.Parse(raw)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return fmt.Errorf("backend %q: want an http(s) base URL like http://host:8100", raw)
	}
	return nil
}

// readyURL is the /kv_ready address put in kv_transfer_params.
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
	if host == "" || host == "0.0.0.0" || host == "::" {
		host = "127.0.0.1"
	}
	return "http://" + net.JoinHostPort(host, port) + "/kv_ready"
}
