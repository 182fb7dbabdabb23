"""P/D end to end through the real engine: P saves, D loads, bytes match."""

from __future__ import annotations

import random
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
        src = p.read_blocks(rank, p.last_blocks[p_rid][:n])
        got = d.read_blocks(rank, d.blocks[d_rid][:n])
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
