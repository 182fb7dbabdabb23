package sim

import (
	"flag"
	"fmt"
	"math"
	"strconv"
	"time"
)

// BindFlags registers the sim's flags on fs, writing into cfg (whose
// current values are the defaults shown).
func BindFlags(fs *flag.FlagSet, cfg *Config) {
	fs.StringVar(&cfg.Model, "model", cfg.Model, "served model name")
	fs.IntVar(&cfg.VocabSize, "vocab-size", cfg.VocabSize, "tokenizer vocabulary size (instances sharing KV must agree)")
	fs.StringVar(&cfg.HashSeed, "hash-seed", cfg.HashSeed, "seed of NONE_HASH, like vLLM's PYTHONHASHSEED (instances sharing KV must agree)")
	fs.IntVar(&cfg.Geometry.NumLayers, "num-layers", cfg.Geometry.NumLayers, "KV cache layers")
	fs.IntVar(&cfg.Geometry.NumBlocks, "num-blocks", cfg.Geometry.NumBlocks, "KV cache blocks (the instance's capacity)")
	fs.IntVar(&cfg.Geometry.BlockSize, "block-size", cfg.Geometry.BlockSize, "tokens per KV block")
	fs.IntVar(&cfg.Geometry.NumKVHeads, "num-kv-heads", cfg.Geometry.NumKVHeads, "KV heads per layer")
	fs.IntVar(&cfg.Geometry.HeadSize, "head-size", cfg.Geometry.HeadSize, "head size (elements, a multiple of 4)")
	fs.IntVar(&cfg.MaxModelLen, "max-model-len", cfg.MaxModelLen, "most prompt + output tokens per request")
	fs.IntVar(&cfg.MaxNumSeqs, "max-num-seqs", cfg.MaxNumSeqs, "most sequences in one step")
	fs.IntVar(&cfg.MaxBatchTokens, "max-batch-tokens", cfg.MaxBatchTokens, "most tokens (decodes + prefill chunks) in one step; a smaller budget chunks long prefills")
	fs.Var((*micros)(&cfg.Cost.PrefillPerToken), "prefill-us-per-token", "step time per prompt token computed (microseconds)")
	fs.Var((*micros)(&cfg.Cost.StepBase), "decode-us-per-step", "fixed time of every step (microseconds): what a step of decodes alone costs")
	fs.Var((*micros)(&cfg.Cost.DecodePerToken), "decode-us-per-token", "step time per decoding sequence (microseconds)")
	fs.StringVar(&cfg.EngineSocket, "engine-socket", cfg.EngineSocket, "UNIX socket of `pegaflow serve`; empty runs without an engine (no P/D roles)")
	fs.StringVar(&cfg.InstanceID, "instance-id", cfg.InstanceID, "instance name registered with the engine (default sim@<http-addr>)")
	fs.StringVar(&cfg.KVRole, "kv-role", cfg.KVRole, "the connector's kv_role for requests beyond the P/D legs: kv_both (every request loads its engine's prefix and saves its blocks, decode blocks too), kv_producer (saves), kv_consumer (loads); empty: P saves and D loads only")
	fs.DurationVar(&cfg.KVQueryWait, "kv-query-wait", cfg.KVQueryWait, "as D, longest wait for an in-flight transfer before recomputing")
	fs.DurationVar(&cfg.EngineTimeout, "engine-timeout", cfg.EngineTimeout, "deadline of each engine save/load")
	fs.StringVar(&cfg.ShmDir, "shm-dir", cfg.ShmDir, "directory of the KV cache files (default /dev/shm)")
}

// micros is a duration flag in (fractional) microseconds.
type micros time.Duration

func (m *micros) String() string {
	if m == nil {
		return "0"
	}
	return strconv.FormatFloat(float64(*m)/float64(time.Microsecond), 'f', -1, 64)
}

func (m *micros) Set(s string) error {
	v, err := strconv.ParseFloat(s, 64)
	if err != nil || math.IsNaN(v) || v < 0 || v > 1e9 {
		return fmt.Errorf("want microseconds between 0 and 1e9")
	}
	*m = micros(time.Duration(v * float64(time.Microsecond)))
	return nil
}
