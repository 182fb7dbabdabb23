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
	numPhases
)

var phaseNames = [numPhases]string{"routing", "prefill", "kv_ready_wait", "decode_first_byte", "ttft", "itl", "tpot", "e2e"}

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

func newMetrics(reg prometheus.Registerer, mode string) (*metrics, error) {
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
	if reg == nil {
		return m, nil
	}
	for _, c := range []prometheus.Collector{m.phase, m.requests, m.retries, m.unanswered, m.kvTimeouts, m.kvRejected, m.inflight, m.healthy, m.ejections, m.kvReadyWhen, m.noKVParams, m.resolveErrors, m.bufferedBytes, m.bufferRefusals} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}
