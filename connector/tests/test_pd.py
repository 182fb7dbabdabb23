"""P/D end to end through the real engine: P saves, D loads, bytes match."""

from __future__ import annotations

import random
import time
import uuid

import numpy as np
import pytest
from harness import CacheSpec, Engine, Instance, ReadyServer, expected_block


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 50000) for _ in range(n)]


def pd_params(ready: ReadyServer | None, tid: str) -> dict:
    p = {"do_remote_decode": True, "do_remote_prefill": False, "pegaflow_transfer_id": tid}
    if ready is not None:
        p.update(pegaflow_ready_url=ready.url, pegaflow_ready_token="tok-" + tid)
    return p


def decode_params(p_params: dict) -> dict:
    # The router merges P's returned params with its own (router's keys win);
    # a router may echo do_remote_decode from the prefill leg.
    return {**p_params, "do_remote_decode": True}


def run_prefill(p: Instance, rid: str, tokens: list[int], params: dict) -> dict:
    req = p.add_request(rid, tokens, max_tokens=1, kv_transfer_params=params)
    p.run()
    assert req.finished_params is not None, "P returned no kv_transfer_params"
    return req.finished_params


def assert_loaded_blocks(p: Instance, d: Instance, p_rid: str, d_rid: str, n: int,
                         tokens: list[int]) -> None:
    """D's first n blocks equal P's, and P's are what P computed."""
    for rank in range(p.tp):
        # Freed blocks keep their bytes until reused; nothing reuses them here.
        src = p.read_blocks(rank, (p.blocks.get(p_rid) or p.last_blocks[p_rid])[:n])
        got = d.read_blocks(rank, (d.blocks.get(d_rid) or d.last_blocks[d_rid])[:n])
        for i in range(n):
            want = expected_block(p.cache, p.tp, rank, tokens, i)
            for layer in range(p.cache.num_layers):
                assert np.array_equal(src[i][layer], want[layer]), ("P", rank, i, layer)
                assert np.array_equal(got[i][layer], src[i][layer]), ("D", rank, i, layer)


@pytest.mark.parametrize("layout,tp", [
    ("flash_attn", 1), ("flash_attn", 2), ("mla", 1), ("mla", 2),
    ("flashinfer", 1), ("flash_attn_hnd", 2),
])
def test_pd_roundtrip(engine: Engine, ready_server: ReadyServer, layout: str, tp: int) -> None:
    cache = CacheSpec(layout)
    p = Instance(engine, name="p", tp=tp, cache=cache, kv_role="kv_producer")
    d = Instance(engine, name="d", tp=tp, cache=cache, kv_role="kv_consumer")
    try:
        p.handshake()
        d.handshake()
        tokens = prompt(16 * 9 + 5, 1)  # 9 full blocks + a partial one
        tid = uuid.uuid4().hex
        params = run_prefill(p, "req-p", tokens, pd_params(ready_server, tid))
        assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
        assert params["pegaflow_transfer_id"] == tid and params["pegaflow_num_blocks"] == 9
        report = ready_server.wait_for(tid, 10)
        assert report is not None and report["status"] == "ready", report
        assert report["token"] == "tok-" + tid

        # D: a fresh cache (different block ids: take some blocks first).
        d.free.rotate(7)
        req = d.add_request("req-d", tokens, max_tokens=3, kv_transfer_params=decode_params(params))
        d.run(until=lambda: req.load_done_computed is not None)
        assert req.load_done_computed == 9 * 16, "D did not load every full prompt block"
        assert d.blocks["req-d"][:9] != p.last_blocks["req-p"][:9]
        assert_loaded_blocks(p, d, "req-p", "req-d", 9, tokens)
        d.run()
        assert len(req.output_token_ids) == 3
        m = d.worker_metrics()
        assert sum(x.get("blocks_loaded", 0) for x in m) == 9 * tp
        assert all(x["_mode"] == "shm" for x in m)
        assert not d.invalid
        # Engine-side: MLA stores one copy, attention one share per rank.
        stats = engine.stats()
        assert stats.resident_blocks == 9
    finally:
        p.close()
        d.close()


def test_transfer_ready_only_after_every_rank_saved(engine: Engine, ready_server: ReadyServer) -> None:
    """TP=2 prefill whose rank 1 lags: no ready report and no decode hit
    until rank 1 saved too; the decode query issued meanwhile waits (the
    scheduler answers None, "ask again", instead of blocking or missing)."""
    cache = CacheSpec("flash_attn")
    p = Instance(engine, name="p", tp=2, cache=cache, kv_role="kv_producer")
    d = Instance(engine, name="d", tp=2, cache=cache, kv_role="kv_consumer")
    try:
        p.handshake()
        d.handshake()
        tokens = prompt(16 * 6 + 3, 2)
        tid = uuid.uuid4().hex
        p.add_request("rp", tokens, max_tokens=1, kv_transfer_params=pd_params(ready_server, tid))
        step = p.schedule()
        out0 = p.execute(step, ranks=[0])
        assert p.workers[0].call("flush", 10.0)  # rank 0's saves are in the engine
        # The router would forward P's answer now; D asks before rank 1 saved.
        rd = d.add_request("rd", tokens, max_tokens=1, kv_transfer_params={
            "do_remote_prefill": True, "pegaflow_transfer_id": tid, "pegaflow_num_blocks": 6})
        for _ in range(5):
            d.step()
            time.sleep(0.05)
        assert ("loading", "rd") not in d.events and rd.num_computed_tokens == 0
        assert ready_server.wait_for(tid, 0.3) is None, "ready before rank 1 saved"
        t_rank1 = time.monotonic()
        out1 = p.execute(step, ranks=[1])
        p.update(step, out0 + out1)
        report = ready_server.wait_for(tid, 10)
        assert report is not None and report["status"] == "ready" and report["_t"] >= t_rank1
        d.run(until=lambda: rd.load_done_computed is not None)
        assert rd.load_done_computed == 6 * 16
        assert d.connector.metrics.get("pd_transfer_hits") == 1
        p.run()
        assert_loaded_blocks(p, d, "rp", "rd", 6, tokens)
        d.run()
        assert engine.stats().pinned_blocks == 0, "transfer pins must end after D loaded"
    finally:
        p.close()
        d.close()


def test_staging_buffer_when_caches_are_not_shared(engine: Engine) -> None:
    """A real vLLM CPU worker's caches are private memory: the connector
    bounces blocks through a registered staging buffer (chunked: 3 slots)."""
    cache = CacheSpec("flash_attn", num_layers=2, in_shm=False)
    p = Instance(engine, name="p", tp=2, cache=cache, extra={"staging_blocks": 3})
    d = Instance(engine, name="d", tp=2, cache=cache, extra={"staging_blocks": 3})
    try:
        p.handshake()
        d.handshake()
        assert {m["_mode"] for m in p.worker_metrics()} == {"staging"}
        tokens = prompt(16 * 8 + 1, 3)
        p.add_request("rp", tokens, max_tokens=1)
        p.run()
        assert p.flush()
        rd = d.add_request("rd", tokens, max_tokens=1)
        d.run(until=lambda: rd.load_done_computed is not None)
        assert rd.load_done_computed == 8 * 16
        assert_loaded_blocks(p, d, "rp", "rd", 8, tokens)
        assert sum(m.get("load_calls", 0) for m in d.worker_metrics()) == 2 * 3  # 8 blocks / 3 slots
    finally:
        p.close()
        d.close()
