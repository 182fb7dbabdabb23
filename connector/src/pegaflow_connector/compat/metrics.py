"""vLLM's connector stats and Prometheus classes, or stand-ins.

The stats hooks (get_kv_connector_stats, build_kv_connector_stats,
build_prom_metrics) and the cache-hit source label came in different
releases; each class below says which.
"""

from __future__ import annotations

import enum
from typing import Any

# KVConnectorStats / KVConnectorPromMetrics (v1/metrics.py) came with the
# connector stats hooks (get_kv_connector_stats, build_kv_connector_stats,
# build_prom_metrics; NIXL's stats, 0.10/0.11). Stand-ins keep the stats
# class usable without vLLM (tests); without vLLM nothing calls the hooks.
try:  # pragma: no cover
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (  # type: ignore
        KVConnectorPromMetrics,
        KVConnectorStats,
    )
except Exception:  # noqa: BLE001
    import dataclasses as _dc

    @_dc.dataclass
    class KVConnectorStats:  # type: ignore[no-redef]
        """Stand-in for vLLM's stats base (a dataclass with `data`)."""

        data: dict[str, Any] = _dc.field(default_factory=dict)

    class KVConnectorPromMetrics:  # type: ignore[no-redef]
        """Stand-in for vLLM's per-connector Prometheus base."""

        def __init__(self, vllm_config: Any, metric_types: dict[Any, Any], labelnames: list[str],
                     per_engine_labelvalues: dict[int, list[object]]):
            self._kv_transfer_config = vllm_config.kv_transfer_config
            self._counter_cls = next((v for k, v in metric_types.items()
                                      if getattr(k, "__name__", "") == "Counter"), None)
            self._labelnames = labelnames
            self.per_engine_labelvalues = per_engine_labelvalues


# CacheHitSource (vllm/v1/metrics/cache_hit_source.py, 2026) labels where
# external hits came from; releases before it never call
# get_external_cache_hit_sources, and the stand-in keeps the value.
try:  # pragma: no cover
    from vllm.v1.metrics.cache_hit_source import CacheHitSource  # type: ignore
except Exception:  # noqa: BLE001

    class CacheHitSource(str, enum.Enum):  # type: ignore[no-redef]
        HOST = "host"


def prom_counter_cls(prom: Any, metric_types: dict[Any, Any]) -> Any:
    """The Counter class vLLM hands build_prom_metrics (Ray wraps them)."""
    cls = getattr(prom, "_counter_cls", None)
    if cls is None:
        cls = next(v for k, v in metric_types.items() if getattr(k, "__name__", "") == "Counter")
    return cls
