"""vLLM-native stats (issue 17, item 7): fed from the workers and the scheduler."""

from __future__ import annotations

import random
from types import SimpleNamespace
from typing import Any

from harness import CacheSpec, Engine, Instance, save_then_load

from pegaflow_connector import PegaFlowConnector
from pegaflow_connector.stats import EXPORTED, PegaFlowStats


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 50000) for _ in range(n)]


class _Child:
    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, v: float) -> None:
        self.value += v


class Counter:
    """prometheus_client.Counter's surface vLLM hands the connector."""

    made: dict[str, Counter] = {}

    def __init__(self, name: str, documentation: str, labelnames: list[str]) -> None:
        self.children: dict[tuple[Any, ...], _Child] = {}
        Counter.made[name] = self

    def labels(self, *values: Any) -> _Child:
        return self.children.setdefault(values, _Child())


class Gauge(Counter):
    pass


class Histogram(Counter):
    pass


def test_stats_reach_vllm_metrics(engine: Engine) -> None:
    cache = CacheSpec("flash_attn", num_layers=2)
    a = Instance(engine, name="a", tp=2, cache=cache)
    b = Instance(engine, name="b", tp=2, cache=cache)
    try:
        a.handshake()
        b.handshake()
        r = save_then_load(a, b, prompt(100, 4))
        assert r.load_done_computed == 96
        # vLLM: the workers' stats after the step, summed, plus the scheduler's.
        stats = PegaFlowStats()
        for w in b.workers:
            s = w.call("stats")
            assert s is not None
            stats = stats.aggregate(s)
        stats = stats.aggregate(b.connector.get_kv_connector_stats())
        assert b.connector.get_kv_connector_stats() is None  # deltas: nothing new
        d = stats.data
        assert d["external_hit_tokens"] == 96
        assert d["blocks_loaded"] == 6 * 2  # 6 blocks, 2 TP ranks
        assert d["bytes_loaded"] > 0 and d["load_calls"] == 2
        red = stats.reduce()
        assert red["hit_tokens"] == 96 and red["MiB_loaded"] > 0 and "avg_load_ms" in red
        # The frontend rebuilds the stats from `data` and feeds Prometheus.
        rebuilt = PegaFlowConnector.build_kv_connector_stats(dict(d))
        assert rebuilt.data == d and not rebuilt.is_empty()
        Counter.made = {}
        prom = PegaFlowConnector.build_prom_metrics(
            SimpleNamespace(kv_transfer_config=None), {Counter: Counter, Gauge: Gauge, Histogram: Histogram},
            ["model_name", "engine"],
            {0: ["m", "0"]})
        prom.observe(d, 0)
        assert set(Counter.made) == {f"vllm:pegaflow_{n}" for n, _ in EXPORTED.values()}
        assert Counter.made["vllm:pegaflow_hit_tokens"].children[("m", "0")].value == 96
        assert Counter.made["vllm:pegaflow_bytes_loaded"].children[("m", "0")].value == d["bytes_loaded"]
    finally:
        a.close()
        b.close()
