package sim

import (
	"github.com/prometheus/client_golang/prometheus"
)

// metrics follow vLLM's names (vllm:*) where vLLM has one, so dashboards
// and scrapers built for vLLM work on the sim; sim_* are the sim's own.
type metrics struct {
	running, waiting, kvUsage               prometheus.Gauge
	promptTokens, generationTokens          prometheus.Counter
	externalQueries, externalHits           prometheus.Counter
	success                                 *prometheus.CounterVec
	ttft, itl, e2e                          prometheus.Histogram
	steps                                   prometheus.Counter
	stepSeconds                             prometheus.Histogram
	iterationTokens, stepSeqs               prometheus.Histogram
	prefillTokens                           prometheus.Counter
	blocksLoaded, blocksSaved               prometheus.Counter
	prefixHits                              prometheus.Counter
	verifyFailures, loadFailures, saveFails prometheus.Counter
	requestErrors                           *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer, model string) *metrics {
	l := prometheus.Labels{"model_name": model}
	latency := []float64{0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80}
	m := &metrics{
		running:          prometheus.NewGauge(prometheus.GaugeOpts{Name: "vllm:num_requests_running", Help: "Requests in the running batch.", ConstLabels: l}),
		waiting:          prometheus.NewGauge(prometheus.GaugeOpts{Name: "vllm:num_requests_waiting", Help: "Requests waiting to be scheduled.", ConstLabels: l}),
		kvUsage:          prometheus.NewGauge(prometheus.GaugeOpts{Name: "vllm:kv_cache_usage_perc", Help: "Fraction of KV cache blocks in use (0-1).", ConstLabels: l}),
		promptTokens:     prometheus.NewCounter(prometheus.CounterOpts{Name: "vllm:prompt_tokens_total", Help: "Prompt tokens received.", ConstLabels: l}),
		generationTokens: prometheus.NewCounter(prometheus.CounterOpts{Name: "vllm:generation_tokens_total", Help: "Tokens generated.", ConstLabels: l}),
		externalQueries:  prometheus.NewCounter(prometheus.CounterOpts{Name: "vllm:external_prefix_cache_queries_total", Help: "Prompt tokens looked up in the KV engine.", ConstLabels: l}),
		externalHits:     prometheus.NewCounter(prometheus.CounterOpts{Name: "vllm:external_prefix_cache_hits_total", Help: "Prompt tokens loaded from the KV engine.", ConstLabels: l}),
		success:          prometheus.NewCounterVec(prometheus.CounterOpts{Name: "vllm:request_success_total", Help: "Requests finished, by reason.", ConstLabels: l}, []string{"finished_reason"}),
		ttft:             prometheus.NewHistogram(prometheus.HistogramOpts{Name: "vllm:time_to_first_token_seconds", Help: "Time from arrival to the first token.", ConstLabels: l, Buckets: latency}),
		itl:              prometheus.NewHistogram(prometheus.HistogramOpts{Name: "vllm:inter_token_latency_seconds", Help: "Time between consecutive tokens.", ConstLabels: l, Buckets: latency}),
		e2e:              prometheus.NewHistogram(prometheus.HistogramOpts{Name: "vllm:e2e_request_latency_seconds", Help: "Time from arrival to the last token.", ConstLabels: l, Buckets: latency}),
		steps:            prometheus.NewCounter(prometheus.CounterOpts{Name: "sim_steps_total", Help: "Scheduler steps (forward passes) run."}),
		stepSeconds:      prometheus.NewHistogram(prometheus.HistogramOpts{Name: "sim_step_duration_seconds", Help: "Wall time of a scheduler step.", Buckets: latency}),
		iterationTokens: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "vllm:iteration_tokens_total", Help: "Tokens (decodes + prefill chunks) per step.", ConstLabels: l,
			Buckets: []float64{1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384}}),
		stepSeqs: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "sim_step_sequences", Help: "Sequences per step.",
			Buckets: []float64{1, 2, 4, 8, 16, 32, 64, 128, 256, 512}}),
		prefillTokens:  prometheus.NewCounter(prometheus.CounterOpts{Name: "sim_prefill_tokens_computed_total", Help: "Prompt tokens computed (not loaded)."}),
		blocksLoaded:   prometheus.NewCounter(prometheus.CounterOpts{Name: "sim_kv_blocks_loaded_total", Help: "KV blocks loaded from the engine and verified."}),
		prefixHits:     prometheus.NewCounter(prometheus.CounterOpts{Name: "sim_kv_prefix_hit_tokens_total", Help: "Prompt tokens a request loaded from its own engine's prefix (--kv-role), not from a P/D transfer."}),
		blocksSaved:    prometheus.NewCounter(prometheus.CounterOpts{Name: "sim_kv_blocks_saved_total", Help: "KV blocks the engine stored from this sim (saved or already present)."}),
		verifyFailures: prometheus.NewCounter(prometheus.CounterOpts{Name: "sim_kv_verify_failures_total", Help: "Loads whose bytes differed from what the tokens imply (request failed)."}),
		loadFailures:   prometheus.NewCounter(prometheus.CounterOpts{Name: "sim_kv_load_failures_total", Help: "Engine query/load errors; the blocks were recomputed."}),
		saveFails:      prometheus.NewCounter(prometheus.CounterOpts{Name: "sim_kv_save_failures_total", Help: "Engine saves that failed or stored fewer blocks than asked."}),
		requestErrors:  prometheus.NewCounterVec(prometheus.CounterOpts{Name: "sim_request_errors_total", Help: "Requests answered with an error, by HTTP status."}, []string{"code"}),
	}
	reg.MustRegister(m.running, m.waiting, m.kvUsage, m.promptTokens, m.generationTokens, m.externalQueries,
		m.externalHits, m.success, m.ttft, m.itl, m.e2e, m.steps, m.stepSeconds, m.iterationTokens, m.stepSeqs, m.prefillTokens, m.blocksLoaded,
		m.blocksSaved, m.prefixHits, m.verifyFailures, m.loadFailures, m.saveFails, m.requestErrors)
	return m
}
