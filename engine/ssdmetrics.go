package engine

import (
	"github.com/prometheus/client_golang/prometheus"
)

// tierCollector exports tier attribution (every engine) and the SSD
// tier's counters, queue depths and per-directory space (with a tier).
type tierCollector struct {
	e                                                      *Engine
	queryBlocks                                            *prometheus.Desc
	spillBlocks, spillBytes, skipped                       *prometheus.Desc
	promoteBlocks, promoteBytes, promoteLate               *prometheus.Desc
	corrupt, ioErrors, queueDepth, queueBytes              *prometheus.Desc
	used, capacity, blocks, recovery, recovered, evictions *prometheus.Desc
	usable, dropped                                        *prometheus.Desc
}

func newTierCollector(e *Engine) *tierCollector {
	d := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc("pegaflow_engine_"+name, help, labels, nil)
	}
	return &tierCollector{e: e,
		queryBlocks: d("query_blocks_total", "Query hashes by the tier that served them: dram, ssd (promoted for it), peer (fetched for it) or miss.", "tier"),
		spillBlocks: d("ssd_spill_blocks_total", "Blocks written to the SSD tier."),
		spillBytes:  d("ssd_spill_bytes_total", "Payload bytes written to the SSD tier."),
		skipped: d("ssd_spill_skipped_total", "Blocks that proved reuse but were not spilled, by reason (queue_full: staging full; ring_busy: "+
			"the slot ring's next slot in use; io_error, no_space: the write failed; device_failed: the directory is backing off; no_class: no size class yet).", "reason"),
		promoteBlocks: d("ssd_promote_blocks_total", "Blocks read back from the SSD tier and sealed in the pool."),
		promoteBytes:  d("ssd_promote_bytes_total", "Payload bytes read back from the SSD tier."),
		promoteLate:   d("ssd_promote_late_total", "Promotions that finished after their query's SSD budget (the query had a shorter hit)."),
		corrupt:       d("ssd_corrupt_total", "SSD slots whose payload failed its checksum on promote (dropped, never served)."),
		ioErrors:      d("ssd_io_errors_total", "SSD I/O errors, by op (read, write).", "op"),
		queueDepth:    d("ssd_queue_depth", "SSD work in flight: spill (blocks staged or being written), promote (blocks being read).", "op"),
		queueBytes:    d("ssd_spill_queue_bytes", "Staging bytes held by blocks waiting to be written."),
		used:          d("ssd_used_bytes", "Payload bytes of live SSD blocks, by directory.", "dir"),
		capacity:      d("ssd_capacity_bytes", "Space of the SSD tier's slot files, headers included, by directory (0: directory left out).", "dir"),
		blocks:        d("ssd_blocks", "Live blocks on SSD, by directory.", "dir"),
		evictions:     d("ssd_evictions_total", "SSD blocks overwritten by newer ones (FIFO per size class), by directory.", "dir"),
		recovery:      d("ssd_recovery_seconds", "How long the directory's last open (checkpoint load and scan) took.", "dir"),
		recovered:     d("ssd_recovered_blocks", "Blocks the directory's last open found (a warm restart's blocks).", "dir"),
		dropped:       d("ssd_recovery_dropped_slots", "Slots the directory's last open dropped as torn or corrupt.", "dir"),
		usable:        d("ssd_dir_usable", "1 while the directory is in use, 0 once it was left out (ownership, mode, space; the log says why).", "dir"),
	}
}

func (c *tierCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.queryBlocks, c.spillBlocks, c.spillBytes, c.skipped, c.promoteBlocks, c.promoteBytes,
		c.promoteLate, c.corrupt, c.ioErrors, c.queueDepth, c.queueBytes, c.used, c.capacity, c.blocks, c.evictions, c.recovery, c.recovered, c.usable, c.dropped} {
		ch <- d
	}
}

func (c *tierCollector) Collect(ch chan<- prometheus.Metric) {
	e := c.e
	e.mu.Lock()
	hits, misses := e.stats.tierHits, e.stats.misses
	e.mu.Unlock()
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	counter(c.queryBlocks, hits[originDRAM], "dram")
	counter(c.queryBlocks, hits[originSSD], "ssd")
	counter(c.queryBlocks, hits[originPeer], "peer")
	counter(c.queryBlocks, misses, "miss")
	t := e.tier
	if t == nil {
		return
	}
	s, queued, jobs, promoting := t.counters()
	counter(c.spillBlocks, s.spillBlocks)
	counter(c.spillBytes, s.spillBytes)
	for _, r := range spillSkipReasons {
		counter(c.skipped, s.skipped[r], r)
	}
	counter(c.promoteBlocks, s.promoteBlocks)
	counter(c.promoteBytes, s.promoteBytes)
	counter(c.promoteLate, s.promoteLate)
	counter(c.corrupt, s.corrupt)
	counter(c.ioErrors, s.ioErrors["read"], "read")
	counter(c.ioErrors, s.ioErrors["write"], "write")
	gauge(c.queueDepth, float64(jobs), "spill")
	gauge(c.queueDepth, float64(promoting), "promote")
	gauge(c.queueBytes, float64(queued))
	for _, d := range t.dirStats() {
		gauge(c.used, float64(d.used), d.path)
		gauge(c.capacity, float64(d.capacity), d.path)
		gauge(c.blocks, float64(d.blocks), d.path)
		counter(c.evictions, d.evicted, d.path)
		gauge(c.recovery, d.recovery.Seconds(), d.path)
		gauge(c.recovered, float64(d.recovered), d.path)
		gauge(c.dropped, float64(d.dropped), d.path)
		usable := 0.0
		if d.usable {
			usable = 1
		}
		gauge(c.usable, usable, d.path)
	}
}
