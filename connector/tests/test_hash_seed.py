"""The hash-seed fingerprint matches the seed vLLM resolved (issue 17, item 4)."""

from __future__ import annotations

import logging
import random
import time
from types import SimpleNamespace

import pytest
from harness import CacheSpec, Engine, Instance, save_then_load, vllm_config

from pegaflow_connector import PegaKVConnector
from pegaflow_connector.compat import KVConnectorRole


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 50000) for _ in range(n)]


def test_unset_and_set_seed_in_one_fleet_is_rejected(engine: Engine) -> None:
    """Without PYTHONHASHSEED vLLM hashes sha256 with a fixed seed, so an
    unseeded and a seeded instance never match: the second is refused
    loudly instead of sharing a namespace at a silent 0% hit rate."""
    cache = CacheSpec("flash_attn", num_layers=2)
    a = Instance(engine, name="a", tp=1, cache=cache, seed=None)
    b = None
    try:
        a.handshake()
        b = Instance(engine, name="b", tp=1, cache=cache, seed="0")
        deadline = time.monotonic() + 10
        while sum(m.get("namespace_rejected", 0) for m in b.worker_metrics()) < 1:
            assert time.monotonic() < deadline, "unset vs set PYTHONHASHSEED was not detected"
            time.sleep(0.05)
    finally:
        a.close()
        if b is not None:
            b.close()


def test_unset_seed_instances_share_like_vllm(engine: Engine) -> None:
    cache = CacheSpec("flash_attn", num_layers=2)
    a = Instance(engine, name="a", tp=1, cache=cache, seed=None)
    b = Instance(engine, name="b", tp=1, cache=cache, seed=None)
    try:
        a.handshake()
        b.handshake()
        r = save_then_load(a, b, prompt(100, 1))
        assert r.load_done_computed == 96
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("role", [KVConnectorRole.SCHEDULER, KVConnectorRole.WORKER])
def test_random_seed_keeps_blocks_private(workdir: str, monkeypatch: pytest.MonkeyPatch,
                                          caplog: pytest.LogCaptureFixture, role: object) -> None:
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    vc = vllm_config(model="m", block_size=16, tp=1, kv_role="kv_both", engine_id="e1",
                     extra={"socket_path": f"{workdir}/none.sock"})
    vc.cache_config.prefix_caching_hash_algo = "xxhash"
    with caplog.at_level(logging.WARNING, logger="vllm.pegaflow_connector"):
        c = PegaKVConnector(vc, role, SimpleNamespace(num_blocks=8))
    try:
        ns = c._ns_template
        assert ns.hash_seed_fingerprint, "an empty fingerprint skips the engine's check"
        assert ns.extra["hash_seed"] == "random:vllm-e1"
        if role == KVConnectorRole.SCHEDULER:
            assert "seeds block hashes randomly" in caplog.text and "xxhash" in caplog.text
    finally:
        c.shutdown()
    # sha256 without PYTHONHASHSEED is vLLM's fixed seed: shared, no warning.
    caplog.clear()
    vc.cache_config.prefix_caching_hash_algo = "sha256"
    with caplog.at_level(logging.WARNING, logger="vllm.pegaflow_connector"):
        c = PegaKVConnector(vc, role, SimpleNamespace(num_blocks=8))
    try:
        assert "hash_seed" not in c._ns_template.extra
        assert "randomly" not in caplog.text
    finally:
        c.shutdown()
