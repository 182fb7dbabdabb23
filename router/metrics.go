package router

import (
	"github.com/prometheus/client_golang/prometheus"
)

// metrics is the P/D latency breakdown and outcome counters.
type metrics struct {
	phase         *prometheus.HistogramVec // routing, prefill, kv_ready_wait, decode_first_byte, ttft, itl, tpot, e2e
	requests      *prometheus.CounterVec   // outcome
	retries       *prometheus.CounterVec   // leg
	unanswered    *prometheus.CounterVec   // role: request read, connection closed before an answer
	kvTimeouts    prometheus.Counter
	kvRejected    *prometheus.CounterVec // reason
	inflight      *prometheus.GaugeVec   // role, backend
	healthy       *prometheus.GaugeVec   // role, backend
	ejections     *prometheus.CounterVec // role, backend
	kvReadyWhen   *prometheus.CounterVec // source: callback or engine
	noKVParams    *prometheus.CounterVec // backend: P answers without pegaflow_transfer_id
	resolveErrors *prometheus.CounterVec // target: dns:// lookups that failed (last good addresses kept)
	// bufferedBytes and bufferRefusals are the answer budget's
	// (buffered.go): bytes held now, answers refused.
	bufferedBytes  prometheus.Gauge
	bufferRefusals prometheus.Counter

	// The KV policy's (--lb kv; registered only then).
	kvDecisions    *prometheus.CounterVec // leg, reason
	kvFallbackVec  *prometheus.CounterVec // reason
	kvHitTokens    *prometheus.CounterVec // leg: predicted hit tokens of the picks
	kvPromptTokens prometheus.Counter
	kvLookups      *prometheus.CounterVec // result
	kvLookupTime   prometheus.Histogram
	kvFallbacks    map[string]prometheus.Counter // by reason; read-only after New

	// Series resolved once (New), so a request does no label lookup; a
	// backend's own series are on the backend (backendSeries).
	phases   [numPhases]prometheus.Observer // nil: the mode never observes it
	outcomes map[string]prometheus.Counter  // requests_total by outcome; read-only after New
	readyBy  map[string]prometheus.Counter  // kv_ready_total by source; read-only after New
}

// Phases of phase_seconds.
type phase int

const (
	phaseRouting phase = iota
	phasePrefill
	phaseKVReadyWait
	phaseDecodeFirstByte
	phaseTTFT
	phaseITL
	phaseTPOT
	phaseE2E
	phaseKVTokenize // --lb kv: the prompt's /tokenize
	phaseKVRoute    // --lb kv: hashing and the engines' lookups
	numPhases
)

var phaseNames = [numPhases]string{"routing", "prefill", "kv_ready_wait", "decode_first_byte", "ttft", "itl", "tpot", "e2e",
	"kv_tokenize", "kv_route"}

// observe records d seconds in phase p.
func (m *metrics) observe(p phase, seconds float64) { m.phases[p].Observe(seconds) }

// count adds one request with outcome.
func (m *metrics) count(outcome string) { m.outcomes[outcome].Inc() }

// backendSeries are one backend's series, resolved once.
type backendSeries struct {
	inflight, healthy prometheus.Gauge
	ejections         prometheus.Counter
	noKVParams        prometheus.Counter // prefill backends only
}

func (m *metrics) forBackend(b *backend) backendSeries {
	s := backendSeries{
		inflight:  m.inflight.WithLabelValues(b.role, b.name),
		healthy:   m.healthy.WithLabelValues(b.role, b.name),
		ejections: m.ejections.WithLabelValues(b.role, b.name),
	}
	if b.role == rolePrefill {
		s.noKVParams = m.noKVParams.WithLabelValues(b.name)
	}
	return s
}

// attach gives b its series (a backend that joined a pool), selectable
// and idle.
func (m *metrics) attach(b *backend) {
	b.m = m.forBackend(b)
	b.m.healthy.Set(1)
	b.m.inflight.Set(0)
}

// detach drops b's series (a backend that left its pool): its in-flight
// requests finish on series no longer exported, and a backend joining at
// the same address later starts fresh ones.
func (m *metrics) detach(b *backend) {
	m.inflight.DeleteLabelValues(b.role, b.name)
	m.healthy.DeleteLabelValues(b.role, b.name)
	m.ejections.DeleteLabelValues(b.role, b.name)
	if b.role == rolePrefill {
		m.noKVParams.DeleteLabelValues(b.name)
	}
}

func newMetrics(reg prometheus.Registerer, mode string, kv bool) (*metrics, error) {
	const ns = "pegaflow_router"
	if reg != nil {
		reg = prometheus.WrapRegistererWith(prometheus.Labels{"mode": mode}, reg)
	}
	m := &metrics{
		phase: prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: ns, Name: "phase_seconds",
			Help:    "P/D latency breakdown: routing, prefill, kv_ready_wait, decode_first_byte, ttft (client-observed), itl, tpot, e2e.",
			Buckets: prometheus.ExponentialBuckets(100e-6, 2, 20)}, []string{"phase"}),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "requests_total",
			Help: "Requests by outcome: ok, failed, client_cancelled, client_stalled (stopped reading), rejected (bad input or auth)."}, []string{"outcome"}),
		retries: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "retries_total",
			Help: "Retried legs: prefill, decode."}, []string{"leg"}),
		unanswered: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "unanswered_total",
			Help: "Leg attempts whose backend closed the connection after the request was written, before answering: it may have run the request. Never replayed silently; the leg's retry policy decides (retries_total)."}, []string{"role"}),
		kvTimeouts: prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Name: "kv_ready_timeouts_total",
			Help: "KV-ready waits that expired or reported failure."}),
		kvRejected: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "kv_ready_rejected_total",
			Help: "Rejected /kv_ready reports: bad_request, unknown_transfer, bad_token."}, []string{"reason"}),
		inflight: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: ns, Name: "backend_inflight",
			Help: "Requests in flight per backend."}, []string{"role", "backend"}),
		healthy: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: ns, Name: "backend_healthy",
			Help: "1 when the backend is selectable (active and passive health)."}, []string{"role", "backend"}),
		ejections: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "backend_ejections_total",
			Help: "Passive-health ejections per backend."}, []string{"role", "backend"}),
		kvReadyWhen: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "kv_ready_total",
			Help: "Transfers found ready, by source: callback (/kv_ready) or engine (in-process)."}, []string{"source"}),
		noKVParams: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "prefill_without_kv_params_total",
			Help: "Prefill answers without pegaflow_transfer_id in kv_transfer_params (a P without the PegaFlow connector): --on-kv-timeout applied at once, no KV-ready wait."}, []string{"backend"}),
		resolveErrors: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "resolve_errors_total",
			Help: "Failed lookups of a dns:// backend target (error, no such host, no address): its last good addresses were kept."}, []string{"target"}),
		bufferedBytes: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Name: "buffered_answer_bytes",
			Help: "Bytes of backends' non-streaming answers (and P's answers) the router holds now; at most --max-buffered-bytes."}),
		bufferRefusals: prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Name: "buffered_answer_refusals_total",
			Help: "Answers refused because they would take the buffered bytes past --max-buffered-bytes (503 with Retry-After; 502 for an answer larger than the whole budget)."}),
	}
	for p := range numPhases {
		if (p == phaseKVTokenize || p == phaseKVRoute) && !kv {
			continue
		}
		if mode == modePD || (p != phasePrefill && p != phaseKVReadyWait && p != phaseDecodeFirstByte) {
			m.phases[p] = m.phase.WithLabelValues(phaseNames[p])
		}
	}
	m.outcomes = map[string]prometheus.Counter{}
	for _, o := range []string{outcomeOK, outcomeFailed, outcomeCancelled, outcomeStalled, outcomeRejected} {
		m.outcomes[o] = m.requests.WithLabelValues(o)
	}
	m.readyBy = map[string]prometheus.Counter{}
	for _, src := range []string{sourceCallback, sourceEngine} {
		m.readyBy[src] = m.kvReadyWhen.WithLabelValues(src)
	}
	collectors := []prometheus.Collector{m.phase, m.requests, m.retries, m.unanswered, m.kvTimeouts, m.kvRejected, m.inflight, m.healthy, m.ejections, m.kvReadyWhen, m.noKVParams, m.resolveErrors, m.bufferedBytes, m.bufferRefusals}
	if kv {
		collectors = append(collectors, m.kvPolicySeries(ns)...)
	}
	if reg == nil {
		return m, nil
	}
	for _, c := range collectors {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// kvPolicySeries makes the KV policy's series and returns them to register.
func (m *metrics) kvPolicySeries(ns string) []prometheus.Collector {
	m.kvDecisions = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "kv_decisions_total",
		Help: "Backend picks of --lb kv by leg (prefill, decode, aggregated) and reason: prefix_hit (its engine holds part of the prompt), no_hit (chosen by load), colocated (a D on the chosen P's engine), bypass (a D alone, P skipped), fallback (no route: --kv-fallback-lb)."},
		[]string{"leg", "reason"})
	m.kvFallbackVec = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "kv_fallbacks_total",
		Help: "Requests --lb kv could not route by KV, by reason: multimodal, unsupported, unknown_model, tokenize_error, tokenize_timeout, no_backend, hash_error."},
		[]string{"reason"})
	m.kvFallbacks = map[string]prometheus.Counter{}
	for _, r := range []string{fallbackMultimodal, fallbackUnsupported, fallbackUnknownModel, fallbackTokenizeError,
		fallbackTokenizeTimout, fallbackNoTokenizer, fallbackHashError} {
		m.kvFallbacks[r] = m.kvFallbackVec.WithLabelValues(r)
	}
	m.kvHitTokens = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "kv_predicted_hit_tokens_total",
		Help: "Prompt tokens the picked backend's host held (full prompt for a D colocated with its P), by leg: over kv_prompt_tokens_total, the predicted hit ratio."},
		[]string{"leg"})
	m.kvPromptTokens = prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Name: "kv_prompt_tokens_total",
		Help: "Prompt tokens of the requests --lb kv routed by KV."})
	m.kvLookups = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "kv_lookups_total",
		Help: "Engine lookups by result: ok, error, timeout (no answer within --kv-lookup-budget), bogus (an impossible block count); all but ok count as no hit."},
		[]string{"result"})
	m.kvLookupTime = prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: ns, Name: "kv_lookup_seconds",
		Help:    "One engine lookup's latency (a timeout counts as the budget).",
		Buckets: prometheus.ExponentialBuckets(10e-6, 2, 16)})
	return []prometheus.Collector{m.kvDecisions, m.kvFallbackVec, m.kvHitTokens, m.kvPromptTokens, m.kvLookups, m.kvLookupTime}
}

// kvLookup records one engine lookup's result and latency.
func (m *metrics) kvLookup(result string, seconds float64) {
	m.kvLookups.WithLabelValues(result).Inc()
	m.kvLookupTime.Observe(seconds)
}
