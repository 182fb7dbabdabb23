package bench

import (
	"flag"
	"fmt"
	"math"
	"strconv"
	"strings"
)

// BindFlags registers the benchmark's flags on fs, writing into cfg (whose
// current values are the defaults shown).
func BindFlags(fs *flag.FlagSet, cfg *Config) {
	fs.StringVar(&cfg.BaseURL, "base-url", cfg.BaseURL, "server to benchmark (OpenAI-compatible), e.g. http://127.0.0.1:8080")
	fs.StringVar(&cfg.Endpoint, "endpoint", cfg.Endpoint, "API path: "+EndpointCompletions+" or "+EndpointChat)
	fs.StringVar(&cfg.Model, "model", cfg.Model, "model name to send (default: the first of GET /v1/models)")
	fs.StringVar(&cfg.APIKey, "api-key", cfg.APIKey, "Bearer token to send, if the server wants one")
	fs.IntVar(&cfg.NumPrompts, "num-prompts", cfg.NumPrompts, "number of requests")
	fs.Var((*rateValue)(&cfg.RequestRate), "request-rate", "requests per second, or inf to send all at once")
	fs.Float64Var(&cfg.Burstiness, "burstiness", cfg.Burstiness, "gamma shape of the gaps between requests: 1 = Poisson, <1 burstier, >1 more regular")
	fs.IntVar(&cfg.MaxConcurrency, "max-concurrency", cfg.MaxConcurrency, "most requests in flight (0 = no cap)")
	fs.Int64Var(&cfg.Seed, "seed", cfg.Seed, "seed of the dataset and the arrival times")
	fs.IntVar(&cfg.InputLen, "random-input-len", cfg.InputLen, "prompt length in tokens (words), excluding the shared prefix")
	fs.IntVar(&cfg.OutputLen, "random-output-len", cfg.OutputLen, "output length in tokens (max_tokens)")
	fs.IntVar(&cfg.PrefixLen, "random-prefix-len", cfg.PrefixLen, "tokens of a prefix shared by every prompt")
	fs.Float64Var(&cfg.RangeRatio, "random-range-ratio", cfg.RangeRatio, "lengths vary uniformly within ±ratio of the given ones (0 <= ratio < 1)")
	fs.BoolVar(&cfg.IgnoreEOS, "ignore-eos", cfg.IgnoreEOS, "send ignore_eos and min_tokens so every request generates its full output length (vLLM extensions)")
	fs.IntVar(&cfg.Users, "users", cfg.Users, "multi-turn chat: conversations (0: one-turn prompts); needs --endpoint "+EndpointChat)
	fs.IntVar(&cfg.Turns, "turns", cfg.Turns, "multi-turn chat: turns per conversation, each sending the conversation so far with the previous answer")
	fs.IntVar(&cfg.SystemPromptLen, "system-prompt-len", cfg.SystemPromptLen, "multi-turn chat: words of the system prompt every conversation shares")
	fs.DurationVar(&cfg.ThinkTime, "think-time", cfg.ThinkTime, "multi-turn chat: mean pause (exponential) between an answer and the next turn")
	fs.DurationVar(&cfg.Timeout, "timeout", cfg.Timeout, "deadline of each request, from send to the end of its stream")
	fs.Var((*floatList)(&cfg.Percentiles), "percentiles", "comma-separated percentiles to report besides mean and median, e.g. 50,90,99")
}

type rateValue float64

func (r *rateValue) String() string {
	if r == nil || math.IsInf(float64(*r), 1) {
		return "inf"
	}
	return strconv.FormatFloat(float64(*r), 'g', -1, 64)
}

func (r *rateValue) Set(s string) error {
	if strings.EqualFold(strings.TrimSpace(s), "inf") {
		*r = rateValue(math.Inf(1))
		return nil
	}
	v, err := strconv.ParseFloat(strings.TrimSpace(s), 64)
	if err != nil || math.IsNaN(v) || v <= 0 {
		return fmt.Errorf("want a positive number or inf")
	}
	*r = rateValue(v)
	return nil
}

type floatList []float64

func (l *floatList) String() string {
	if l == nil {
		return ""
	}
	parts := make([]string, len(*l))
	for i, v := range *l {
		parts[i] = strconv.FormatFloat(v, 'f', -1, 64)
	}
	return strings.Join(parts, ",")
}

// Set replaces the list (a flag given twice keeps the last).
func (l *floatList) Set(s string) error {
	var out []float64
	for _, part := range strings.Split(s, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		v, err := strconv.ParseFloat(part, 64)
		if err != nil || math.IsNaN(v) || v <= 0 || v > 100 {
			return fmt.Errorf("percentile %q: want a number in (0, 100]", part)
		}
		out = append(out, v)
	}
	if len(out) == 0 {
		return fmt.Errorf("empty percentile list")
	}
	*l = out
	return nil
}
