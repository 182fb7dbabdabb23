"""vLLM-native connector stats: what `/metrics` and vLLM's log show.

vLLM collects `get_kv_connector_stats()` from every worker after each step
and from the scheduler, sums them (`aggregate`), logs `reduce()` every log
interval ("KV Transfer metrics: ...") and feeds the raw `data` dict to the
Prometheus object `build_prom_metrics` returned. `data` is a flat dict of
counter deltas since the previous call, so aggregation is a sum and every
Prometheus metric is a Counter (`vllm:pegaflow_<name>_total`). Worker
counters are summed over TP ranks (bytes are totals; block counts are block
copies, one per rank).
"""

from __future__ import annotations

from typing import Any

from .compat import KVConnectorPromMetrics, KVConnectorStats, prom_counter_cls
from .metrics import Metrics

# Metrics counter -> (Prometheus name, help). Every one is a delta in `data`.
EXPORTED: dict[str, tuple[str, str]] = {
    "external_hit_tokens": ("hit_tokens", "Prompt tokens vLLM loads from PegaFlow instead of computing"),
    "queries": ("queries", "Query RPCs to the engine"),
    "query_hit_blocks": ("query_hit_blocks", "Blocks found by queries"),
    "blocks_loaded": ("blocks_loaded", "Blocks loaded into vLLM's KV cache (summed over TP ranks)"),
    "blocks_saved": ("blocks_saved", "Blocks stored by the engine (summed over TP ranks)"),
    "bytes_loaded": ("bytes_loaded", "KV bytes loaded"),
    "bytes_saved": ("bytes_saved", "KV bytes saved"),
    "load_seconds": ("load_seconds", "Time in Load RPCs"),
    "load_calls": ("load_calls", "Load RPCs"),
    "save_seconds": ("save_seconds", "Time in Save RPCs"),
    "save_calls": ("save_calls", "Save RPCs"),
    "blocks_load_failed": ("load_failed_blocks", "Blocks that did not load (vLLM recomputes them)"),
    "saves_dropped": ("save_dropped_blocks", "Blocks whose save was dropped"),
    "preempted_saves_cancelled": ("preempted_saves_cancelled",
                                  "Preempted requests whose save was cancelled (wait timed out)"),
    "queries_failed": ("query_failures", "Query RPCs that failed"),
    "connector_disabled": ("disabled", "Processes whose connector could not start"),
    "kv_events_stored_blocks": ("kv_events_stored_blocks",
                                "Blocks published as BlockStored (medium CPU, KV events)"),
    "kv_events_removed_blocks": ("kv_events_removed_blocks",
                                 "Blocks published as BlockRemoved (medium CPU, KV events)"),
    "kv_events_resyncs": ("kv_events_resyncs",
                          "KV event resyncs: the engine restarted or its feed overran the reader"),
}


class StatsTap:
    """Deltas of a Metrics object's exported counters since the last take.
    Called on one thread (vLLM's step); the Metrics object is thread-safe."""

    def __init__(self, metrics: Metrics):
        self._metrics = metrics
        self._last: dict[str, float] = {}

    def take(self) -> dict[str, float]:
        snap = self._metrics.snapshot()
        out: dict[str, float] = {}
        for key in EXPORTED:
            v = snap.get(key, 0)
            d = v - self._last.get(key, 0)
            if d:
                out[key] = d
            self._last[key] = v
        return out


class PegaFlowStats(KVConnectorStats):
    """KVConnectorStats over a flat dict of counter deltas."""

    def __init__(self, data: dict[str, Any] | None = None):
        super().__init__(data=dict(data or {}))

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> PegaFlowStats:
        for k, v in (getattr(other, "data", None) or {}).items():
            if isinstance(v, (int, float)):
                self.data[k] = self.data.get(k, 0) + v
        return self

    def reduce(self) -> dict[str, int | float]:
        d = self.data
        out: dict[str, int | float] = {
            "hit_tokens": int(d.get("external_hit_tokens", 0)),
            "blocks_loaded": int(d.get("blocks_loaded", 0)),
            "blocks_saved": int(d.get("blocks_saved", 0)),
            "MiB_loaded": round(d.get("bytes_loaded", 0) / 2**20, 3),
            "MiB_saved": round(d.get("bytes_saved", 0) / 2**20, 3),
            "load_failed_blocks": int(d.get("blocks_load_failed", 0)),
            "save_dropped_blocks": int(d.get("saves_dropped", 0)),
        }
        for op in ("load", "save"):
            calls = d.get(f"{op}_calls", 0)
            if calls:
                out[f"avg_{op}_ms"] = round(1000 * d.get(f"{op}_seconds", 0) / calls, 3)
        return out

    def is_empty(self) -> bool:
        return not any(self.data.values())


class PegaFlowPromMetrics(KVConnectorPromMetrics):
    """One Counter per exported key, labelled per engine as vLLM asks."""

    def __init__(self, vllm_config: Any, metric_types: dict[Any, Any], labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        counter = prom_counter_cls(self, metric_types)
        self._counters: dict[str, dict[int, Any]] = {}
        for key, (name, doc) in EXPORTED.items():
            c = counter(name=f"vllm:pegaflow_{name}", documentation=f"PegaFlow: {doc}",
                        labelnames=labelnames)
            self._counters[key] = {idx: c.labels(*vals)
                                   for idx, vals in per_engine_labelvalues.items()}

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for key, v in transfer_stats_data.items():
            per_engine = self._counters.get(key)
            if per_engine is not None and isinstance(v, (int, float)) and v > 0:
                child = per_engine.get(engine_idx)
                if child is not None:
                    child.inc(v)
