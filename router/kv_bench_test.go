package router

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"slices"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// O(1) answers: the benchmark measures the router's side of the
// decision (hashing, fan-out, selection); an engine's own lookup cost is
// the engine's benchmark.
type benchIndex map[string]int

func (x benchIndex) Lookup(_ context.Context, engine string, q KVQuery) (int, error) {
	return min(x[engine], len(q.Hashes)), nil
}

// BenchmarkKVRoute is --lb kv's routing decision without tokenizing: the
// prompt's block hashes (vLLM's default sha256), one lookup per engine
// (each backend's host its own engine, P and D of a host sharing it),
// then the P and the D picks. cold: a prompt never seen (every block
// hashed); warm: a follow-up turn, all but its last 256 tokens seen by
// the previous request (the memo answers the prefix). p50-us is the
// median decision.
func BenchmarkKVRoute(b *testing.B) {
	const newTail = 256
	for _, tokens := range []int{8 << 10, 32 << 10} {
		for _, backends := range []int{8, 64} {
			for _, temp := range []string{"cold", "warm"} {
				b.Run(fmt.Sprintf("tokens=%d/backends=%d/%s", tokens, backends, temp), func(b *testing.B) {
					r, ids := benchKVRouter(b, tokens, backends)
					ctx := context.Background()
					decide := func() {
						rt := r.routeTokens(ctx, ids, "")
						rt.prefill = r.prefill.pick(nil, rt)
						if r.decode.pick(nil, rt) == nil {
							b.Fatal("no decode pick")
						}
					}
					decide()
					var took []time.Duration
					b.ReportAllocs()
					b.ResetTimer()
					for i := 0; b.Loop(); i++ {
						if temp == "cold" {
							ids[0] = uint32(1<<20 + i) // a new first block: a new chain
						} else {
							ids[len(ids)-newTail] = uint32(1<<20 + i) // a new tail on the same prefix
						}
						t0 := time.Now()
						decide()
						took = append(took, time.Since(t0))
					}
					slices.Sort(took)
					b.ReportMetric(float64(took[len(took)/2].Nanoseconds())/1e3, "p50-us")
				})
			}
		}
	}
}

// benchKVRouter is a router over backends/2 P and backends/2 D on
// backends/2 hosts, each engine holding a different share of the prompt.
func benchKVRouter(b *testing.B, tokens, backends int) (*Router, []uint32) {
	b.Helper()
	cfg := DefaultConfig()
	cfg.LB, cfg.HealthInterval = LBKV, 0
	idx := benchIndex{}
	for i := range backends / 2 {
		host := fmt.Sprintf("10.0.%d.%d", i/250, i%250+1)
		cfg.Prefill = append(cfg.Prefill, "http://"+host+":8100")
		cfg.Decode = append(cfg.Decode, "http://"+host+":8200")
		idx[host+":7000"] = i * tokens / cfg.KVBlockSize / backends
	}
	cfg.KVEnginePort = 7000
	r, err := New(cfg, Deps{KVIndex: idx, Registerer: prometheus.NewRegistry(), Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		b.Fatal(err)
	}
	ids := make([]uint32, tokens)
	for i := range ids {
		ids[i] = uint32(i*7919) % 151936
	}
	return r, ids
}

// BenchmarkKVTokenize is the tokenizing apart: one POST /tokenize to a
// loopback backend answering tokens ids (the HTTP round trip and the
// answer's parse; a real vLLM adds its tokenizer's time).
func BenchmarkKVTokenize(b *testing.B) {
	for _, tokens := range []int{8 << 10, 32 << 10} {
		b.Run(fmt.Sprintf("tokens=%d", tokens), func(b *testing.B) {
			ids := make([]uint32, tokens)
			for i := range ids {
				ids[i] = uint32(i*7919) % 151936
			}
			answer := fmt.Appendf(nil, `{"tokens":%s,"count":%d,"max_model_len":131072}`, jsonIDs(ids), tokens)
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				_, _ = io.Copy(io.Discard, r.Body)
				w.Header().Set("Content-Type", "application/json")
				_, _ = w.Write(answer)
			}))
			defer srv.Close()
			cfg := DefaultConfig()
			cfg.Backends, cfg.HealthInterval = []string{srv.URL}, 0
			r, err := New(cfg, Deps{})
			if err != nil {
				b.Fatal(err)
			}
			be := r.agg.backends()[0]
			req := []byte(`{"model":"m","prompt":"hello"}`)
			ctx := context.Background()
			b.SetBytes(int64(len(answer)))
			b.ResetTimer()
			for b.Loop() {
				if got, err := r.tokenize(ctx, be, "", req); err != nil || len(got) != tokens {
					b.Fatal(err, len(got))
				}
			}
		})
	}
}

func jsonIDs(ids []uint32) []byte {
	out := []byte{'['}
	for i, id := range ids {
		if i > 0 {
			out = append(out, ',')
		}
		out = fmt.Append(out, id)
	}
	return append(out, ']')
}
