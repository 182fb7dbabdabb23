package engine

import "github.com/pegaflow/pegaflow/native"

// Health is whether the engine serves requests ("ok" or "closed") and
// what it is.
type Health struct {
	Status, Backend, Version string
}

// Stats is a snapshot of the engine's gauges (pool bytes, blocks by state,
// live namespaces, instances and sessions) and monotonic counters.
type Stats struct {
	PoolCapacityBytes, PoolUsedBytes             uint64
	ResidentBlocks, PinnedBlocks, InflightBlocks uint64
	Hits, Misses, Saves, Loads                   uint64
	Evictions, SaveFailures                      uint64
	Namespaces, Instances, Sessions              uint64
	BytesSaved, BytesLoaded                      uint64
}

// Health reports whether the engine serves requests.
func (e *Engine) Health() Health {
	e.mu.Lock()
	defer e.mu.Unlock()
	status := "ok"
	if e.closed {
		status = "closed"
	}
	return Health{Status: status, Backend: native.Backend(), Version: e.cfg.Version}
}

// counters are monotonic totals, guarded by e.mu.
type counters struct {
	hits, misses, saves, loads, evictions, saveFailures uint64
	bytesSaved, bytesLoaded                             uint64
	transfersReady, transfersFailed                     uint64
	// blockEventGaps counts BlockEvents answers whose reader missed
	// events (events.go).
	blockEventGaps uint64
	// kinds are per group kind (metrics.go); a namespace without groups
	// is all kindFull.
	kinds [numKinds]kindCounters
	// tierHits are Query hits by where the block's bytes came from
	// (originDRAM, originSSD, originPeer; promote.go).
	tierHits [3]uint64
}

// kindCounters are the counts kept per group kind: resident blocks (a
// gauge), and block shares saved and loaded with their bytes.
type kindCounters struct {
	resident                              int
	saves, loads, bytesSaved, bytesLoaded uint64
}

// Stats is a snapshot of the engine's gauges and counters.
func (e *Engine) Stats() Stats {
	e.mu.Lock()
	defer e.mu.Unlock()
	var pinned, inflight uint64
	for _, ns := range e.namespaces {
		for _, g := range ns.groups {
			for _, b := range g.blocks {
				if b.pins > 0 {
					pinned++
				}
				if b.saving != 0 || b.loading > 0 {
					inflight++
				}
			}
		}
	}
	return Stats{
		PoolCapacityBytes: e.capacity(),
		PoolUsedBytes:     e.usedLocked(),
		ResidentBlocks:    uint64(e.numBlocks),
		PinnedBlocks:      pinned,
		InflightBlocks:    inflight,
		Hits:              e.stats.hits,
		Misses:            e.stats.misses,
		Saves:             e.stats.saves,
		Loads:             e.stats.loads,
		Evictions:         e.stats.evictions,
		SaveFailures:      e.stats.saveFailures,
		Namespaces:        uint64(len(e.namespaces)),
		Instances:         uint64(len(e.instances)),
		Sessions:          uint64(len(e.sessions)),
		BytesSaved:        e.stats.bytesSaved,
		BytesLoaded:       e.stats.bytesLoaded,
	}
}
