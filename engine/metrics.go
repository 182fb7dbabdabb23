package engine

import (
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics exports the engine to Prometheus. Gauges and counters that the
// engine already keeps are read at scrape time; histograms are observed on
// the request path. A nil *metrics ignores observations.
type metrics struct {
	saveDuration, loadDuration prometheus.Histogram
	saveBytes, loadBytes       prometheus.Histogram
	transfers                  *prometheus.CounterVec
	// Peer fetches (fetch.go); failures resolved per reason at start.
	fetchBlocks, fetchBytes prometheus.Counter
	fetchDuration           prometheus.Histogram
	fetchFailures           map[string]prometheus.Counter
}

func newMetrics(e *Engine, reg prometheus.Registerer) (*metrics, error) {
	const ns = "pegaflow_engine"
	m := &metrics{
		saveDuration: prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: ns, Name: "save_duration_seconds",
			Help: "Duration of Save calls, copies included.", Buckets: prometheus.ExponentialBuckets(50e-6, 2, 18)}),
		loadDuration: prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: ns, Name: "load_duration_seconds",
			Help: "Duration of Load calls, copies included.", Buckets: prometheus.ExponentialBuckets(50e-6, 2, 18)}),
		saveBytes: prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: ns, Name: "save_bytes",
			Help: "Bytes copied into the pool per Save call.", Buckets: prometheus.ExponentialBuckets(4096, 4, 12)}),
		loadBytes: prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: ns, Name: "load_bytes",
			Help: "Bytes copied out of the pool per Load call.", Buckets: prometheus.ExponentialBuckets(4096, 4, 12)}),
		transfers: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "transfers_total",
			Help: "P/D transfers settled, by outcome."}, []string{"status"}),
		fetchBlocks: prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Name: "peer_fetch_blocks_total",
			Help: "Blocks fetched from peer engines and sealed here."}),
		fetchBytes: prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Name: "peer_fetch_bytes_total",
			Help: "Bytes of the blocks fetched from peer engines, all ranks' shares."}),
		fetchDuration: prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: ns, Name: "peer_fetch_duration_seconds",
			Help: "Duration of fetches from peer engines (handshake, open, reads, seal).", Buckets: prometheus.ExponentialBuckets(100e-6, 2, 18)}),
		fetchFailures: map[string]prometheus.Counter{},
	}
	failures := prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "peer_fetch_failures_total",
		Help: "Fetches from peer engines that ended short of what was asked, by reason."}, []string{"reason"})
	for _, r := range fetchFailureReasons() {
		m.fetchFailures[r] = failures.WithLabelValues(r)
	}
	locked := func(f func() float64) func() float64 {
		return func() float64 {
			e.mu.Lock()
			defer e.mu.Unlock()
			return f()
		}
	}
	gauge := func(name, help string, f func() float64) prometheus.Collector {
		return prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: ns, Name: name, Help: help}, locked(f))
	}
	counter := func(name, help string, f func() float64) prometheus.Collector {
		return prometheus.NewCounterFunc(prometheus.CounterOpts{Namespace: ns, Name: name, Help: help}, locked(f))
	}
	collectors := []prometheus.Collector{
		m.saveDuration, m.loadDuration, m.saveBytes, m.loadBytes, m.transfers,
		m.fetchBlocks, m.fetchBytes, m.fetchDuration, failures,
		gauge("peer_transfers_open", "Transfers peers opened here (blocks pinned for their reads).", func() float64 { return float64(len(e.peerOpens)) }),
		gauge("peer_fetches_inflight", "Fetches from peer engines in their read phase now (from their plan to their seal).",
			func() float64 { return float64(e.fetchesReading) }),
		gauge("pool_capacity_bytes", "Pool capacity, all NUMA nodes' pools together.", func() float64 { return float64(e.capacity()) }),
		gauge("pool_used_bytes", "Pool bytes held by blocks, all pools together.", func() float64 { return float64(e.usedLocked()) }),
		gauge("resident_blocks", "Blocks in the pool, sealed or being saved.", func() float64 { return float64(e.numBlocks) }),
		gauge("evictable_blocks", "Sealed, unpinned blocks.", func() float64 { return float64(e.policy.evictable) }),
		gauge("leases", "Open query leases.", func() float64 { return float64(len(e.leases)) }),
		gauge("transfers", "Tracked P/D transfers.", func() float64 { return float64(len(e.transfers)) }),
		gauge("transfer_waits", "Transfer ids waited for that no save has named yet.", func() float64 { return float64(len(e.waits)) }),
		gauge("copy_ops_limit", "Copy ops allowed in flight across all calls (--max-copy-ops).", func() float64 { return float64(e.budget.max) }),
		gauge("sessions", "Attached clients.", func() float64 { return float64(len(e.sessions)) }),
		gauge("instances", "Registered instance ranks.", func() float64 { return float64(len(e.instances)) }),
		gauge("namespaces", "Namespaces.", func() float64 { return float64(len(e.namespaces)) }),
		gauge("gpus", "GPUs listed by NVML at start (0: CPU mode).", func() float64 { return float64(len(e.cfg.Topology.Devices)) }),
		gauge("pool_numa_node", "NUMA node of the default pool (-1: none).", func() float64 { return float64(e.placement.Node) }),
		newNodePoolCollector(e),
		newKindCollector(e),
		newTierCollector(e),
		counter("hits_total", "Query hashes found sealed (prefix).", func() float64 { return float64(e.stats.hits) }),
		counter("misses_total", "Query hashes not in the sealed prefix.", func() float64 { return float64(e.stats.misses) }),
		counter("saves_total", "Block shares saved (one per rank).", func() float64 { return float64(e.stats.saves) }),
		counter("loads_total", "Block shares loaded (one per rank).", func() float64 { return float64(e.stats.loads) }),
		counter("saved_bytes_total", "Bytes copied into the pool.", func() float64 { return float64(e.stats.bytesSaved) }),
		counter("loaded_bytes_total", "Bytes copied out of the pool.", func() float64 { return float64(e.stats.bytesLoaded) }),
		counter("evictions_total", "Blocks evicted for space.", func() float64 { return float64(e.stats.evictions) }),
		counter("block_event_gaps_total", "BlockEvents answers whose reader had missed events (the ring overran it).", func() float64 { return float64(e.stats.blockEventGaps) }),
		counter("save_failures_total", "Block saves that could not be stored.", func() float64 { return float64(e.stats.saveFailures) }),
	}
	if e.tier != nil {
		collectors = append(collectors, e.tier.spillSeconds, e.tier.promoteSeconds)
	}
	for _, c := range collectors {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// nodePoolCollector exports each pool's capacity and use, labelled by
// its NUMA node. The totals stay unlabelled in pool_capacity_bytes and
// pool_used_bytes, so existing queries keep working.
type nodePoolCollector struct {
	e              *Engine
	capacity, used *prometheus.Desc
}

func newNodePoolCollector(e *Engine) *nodePoolCollector {
	return &nodePoolCollector{e: e,
		capacity: prometheus.NewDesc("pegaflow_engine_numa_pool_capacity_bytes",
			"Capacity of the pool on a NUMA node (-1: unbound).", []string{"numa_node"}, nil),
		used: prometheus.NewDesc("pegaflow_engine_numa_pool_used_bytes",
			"Bytes held by block shares in the pool on a NUMA node (-1: unbound).", []string{"numa_node"}, nil),
	}
}

func (c *nodePoolCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.capacity
	ch <- c.used
}

func (c *nodePoolCollector) Collect(ch chan<- prometheus.Metric) {
	c.e.mu.Lock()
	defer c.e.mu.Unlock()
	for _, p := range c.e.pools {
		node := strconv.Itoa(p.node)
		ch <- prometheus.MustNewConstMetric(c.capacity, prometheus.GaugeValue, float64(p.mem.Size()), node)
		ch <- prometheus.MustNewConstMetric(c.used, prometheus.GaugeValue, float64(p.alloc.used), node)
	}
}

// kindCollector exports the per-kind counts (stats.go kindCounters),
// labelled by group kind: a namespace without groups counts as "full".
// The unlabelled totals (resident_blocks, saves_total, ...) stay as they
// were, all kinds together.
type kindCollector struct {
	e                                             *Engine
	resident, saves, loads, savedBytes, loadBytes *prometheus.Desc
}

func newKindCollector(e *Engine) *kindCollector {
	desc := func(name, help string) *prometheus.Desc {
		return prometheus.NewDesc("pegaflow_engine_group_"+name, help, []string{"kind"}, nil)
	}
	return &kindCollector{e: e,
		resident:   desc("resident_blocks", "Blocks in the pool, sealed or being saved, by KV cache group kind."),
		saves:      desc("saves_total", "Block shares saved, by KV cache group kind."),
		loads:      desc("loads_total", "Block shares loaded, by KV cache group kind."),
		savedBytes: desc("saved_bytes_total", "Bytes copied into the pool, by KV cache group kind."),
		loadBytes:  desc("loaded_bytes_total", "Bytes copied out of the pool, by KV cache group kind."),
	}
}

func (c *kindCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.resident, c.saves, c.loads, c.savedBytes, c.loadBytes} {
		ch <- d
	}
}

func (c *kindCollector) Collect(ch chan<- prometheus.Metric) {
	c.e.mu.Lock()
	defer c.e.mu.Unlock()
	for k, n := range c.e.stats.kinds {
		kind := groupKind(k).String()
		ch <- prometheus.MustNewConstMetric(c.resident, prometheus.GaugeValue, float64(n.resident), kind)
		ch <- prometheus.MustNewConstMetric(c.saves, prometheus.CounterValue, float64(n.saves), kind)
		ch <- prometheus.MustNewConstMetric(c.loads, prometheus.CounterValue, float64(n.loads), kind)
		ch <- prometheus.MustNewConstMetric(c.savedBytes, prometheus.CounterValue, float64(n.bytesSaved), kind)
		ch <- prometheus.MustNewConstMetric(c.loadBytes, prometheus.CounterValue, float64(n.bytesLoaded), kind)
	}
}

func (m *metrics) observeSave(d time.Duration, bytes uint64) {
	if m == nil {
		return
	}
	m.saveDuration.Observe(d.Seconds())
	m.saveBytes.Observe(float64(bytes))
}

func (m *metrics) observeLoad(d time.Duration, bytes uint64) {
	if m == nil {
		return
	}
	m.loadDuration.Observe(d.Seconds())
	m.loadBytes.Observe(float64(bytes))
}

func (m *metrics) observeTransfer(s transferState) {
	if m == nil {
		return
	}
	m.transfers.WithLabelValues(s.String()).Inc()
}

// observeFetch records a fetch; reason is empty when it got all it asked.
func (m *metrics) observeFetch(blocks int, bytes uint64, d time.Duration, reason string) {
	if m == nil {
		return
	}
	m.fetchBlocks.Add(float64(blocks))
	m.fetchBytes.Add(float64(bytes))
	m.fetchDuration.Observe(d.Seconds())
	if reason != "" {
		m.fetchFailures[reason].Inc()
	}
}
