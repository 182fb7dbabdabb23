"""Engine trouble and vLLM lifecycle hazards: nothing hangs, nothing corrupts."""

from __future__ import annotations

import random
import threading
import time
import uuid

import numpy as np
import pytest
from harness import CacheSpec, Engine, Instance, ReadyServer, Request, ask, expected_block


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 50000) for _ in range(n)]


def assert_blocks_are(inst: Instance, block_ids: list[int], tokens: list[int], n: int) -> None:
    for rank in range(inst.tp):
        got = inst.read_blocks(rank, block_ids[:n])
        for i in range(n):
            want = expected_block(inst.cache, inst.tp, rank, tokens, i)
            for layer in range(inst.cache.num_layers):
                assert np.array_equal(got[i][layer], want[layer]), (rank, i, layer)


def assert_loads(inst: Instance, rid: str, tokens: list[int], n: int) -> None:
    """A new request for `tokens` loads n full blocks, byte-exact."""
    r = inst.add_request(rid, tokens, max_tokens=1)
    inst.run()
    assert r.load_done_computed == n * inst.bs
    assert_blocks_are(inst, inst.last_blocks[rid], tokens, n)


def wm(inst: Instance, key: str) -> float:
    return sum(m.get(key, 0) for m in inst.worker_metrics())


def test_engine_killed_mid_save_then_restarted(engine: Engine, ready_server: ReadyServer) -> None:
    cache = CacheSpec("flash_attn", num_layers=2)
    p = Instance(engine, name="p", tp=2, cache=cache)
    d = Instance(engine, name="d", tp=2, cache=cache)
    try:
        p.handshake()
        d.handshake()
        tokens = prompt(150, 1)
        tid = uuid.uuid4().hex
        req = p.add_request("r1", tokens, max_tokens=1, kv_transfer_params={
            "do_remote_decode": True, "pegaflow_transfer_id": tid,
            "pegaflow_ready_url": ready_server.url, "pegaflow_ready_token": "t"})
        ask(p.connector, req)  # its cache query answered before the engine stalls
        engine.pause()  # the saves of this step get stuck in the engine
        p.step()
        assert req.is_finished() and "r1" in p.delayed, "blocks must stay while saves run"
        engine.kill()  # ... and then it dies
        p.run(timeout_s=30)  # the request's blocks get freed, nothing hangs
        assert "r1" not in p.delayed and ("freed", "r1") in p.events
        assert wm(p, "saves_dropped") > 0
        # Nobody but P can settle the transfer now: P's worker tells the
        # router it failed, so D does not wait out the KV-ready timeout.
        report = ready_server.wait_for(tid, 10)
        assert report is not None and report["status"] == "failed" and report["token"] == "t", report
        assert "engine" in report["message"]
        assert wm(p, "transfers_reported_failed") >= 1
        # vLLM kept serving meanwhile: a request while the engine is down
        # computes locally.
        r2 = d.add_request("r2", prompt(80, 2), max_tokens=2)
        d.run(timeout_s=30)
        assert len(r2.output_token_ids) == 2 and r2.load_done_computed is None

        engine.start()  # restarted on the same socket: everyone reconnects
        p.wait_registered()
        d.wait_registered()
        assert p.connector.metrics.get("reconnects") >= 1
        assert wm(p, "reconnects") >= 2 and wm(p, "registrations") >= 4
        p.add_request("r3", tokens, max_tokens=1)
        p.run()
        assert p.flush()
        assert_loads(d, "r4", tokens, 9)
    finally:
        p.close()
        d.close()


def test_engine_killed_mid_load(engine: Engine) -> None:
    cache = CacheSpec("flash_attn", num_layers=2)
    a = Instance(engine, name="a", tp=2, cache=cache)
    b = Instance(engine, name="b", tp=2, cache=cache)
    try:
        a.handshake()
        b.handshake()
        tokens = prompt(150, 3)
        a.add_request("src", tokens, max_tokens=1)
        a.run()
        assert a.flush()
        req = b.add_request("dst", tokens, max_tokens=2)
        ask(b.connector, req)  # the query's answer is ready for the step
        step = b.schedule()  # query hits, blocks allocated, load in the metadata
        assert step.meta.loads and req.status == "WAITING_FOR_REMOTE_KVS"
        load_ids = list(step.meta.loads[0].block_ids)
        engine.pause()
        b.update(step, b.execute(step))  # loads start and get stuck
        engine.kill()
        b.run(timeout_s=30)  # reported failed, recomputed, finished
        assert set(load_ids) <= b.invalid, "failed blocks must be reported to vLLM"
        assert req.load_done_computed == 0, "recompute starts at the first failed block"
        assert len(req.output_token_ids) == 2
        assert wm(b, "loads_failed") >= 2
        # The recomputed KV is right (the harness recomputed it).
        assert_blocks_are(b, b.last_blocks["dst"], tokens, 9)
    finally:
        a.close()
        b.close()


def test_block_free_waits_for_saves(engine: Engine) -> None:
    cache = CacheSpec("flash_attn", num_layers=2)
    a = Instance(engine, name="a", tp=2, cache=cache)
    b = Instance(engine, name="b", tp=2, cache=cache)
    try:
        a.handshake()
        b.handshake()
        tokens = prompt(150, 4)
        req = a.add_request("r", tokens, max_tokens=1)
        ask(a.connector, req)  # its cache query answered before the engine stalls
        engine.pause()
        a.step()
        assert req.is_finished()
        t_end = time.monotonic() + 0.6
        while time.monotonic() < t_end:  # vLLM keeps stepping meanwhile
            a.step()
            time.sleep(0.02)
        assert "r" in a.delayed and ("freed", "r") not in a.events
        resumed = time.monotonic()
        engine.resume()
        a.run()
        assert a.freed_at["r"] >= resumed
        # By the time the blocks were freed, every block was in the engine.
        probe = b.add_request("probe", tokens, max_tokens=1)
        b.run()
        assert probe.load_done_computed == 144
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("preempt_ids", [False, True], ids=["metadata", "id-set"])
def test_preemption_does_not_corrupt_a_save(engine: Engine, preempt_ids: bool) -> None:
    # 6 blocks: preempting A hands A's blocks to B in the very same step.
    cache = CacheSpec("flash_attn", num_layers=2, num_blocks=6)
    a = Instance(engine, name="a", tp=1, cache=cache, token_budget=512,
                 extra={"query_timeout_ms": 100}, preempt_ids=preempt_ids)
    d = Instance(engine, name="d", tp=1, cache=CacheSpec("flash_attn", num_layers=2))
    try:
        a.handshake()
        d.handshake()
        ta, tb = prompt(70, 5), prompt(70, 6)  # 4 full blocks + 6 tokens each
        ra = a.add_request("A", ta, max_tokens=4)
        # Both cache queries answered (misses) before the engine stalls; B
        # joins the queue only after A's prefill.
        ask(a.connector, ra)
        ask(a.connector, Request("B", tb, 1, a.bs, a.seed_hash))
        engine.pause()
        a.step()  # A's prefill; its 4 full blocks are being saved (stuck)
        a_blocks = list(a.blocks["A"])
        rb = a.add_request("B", tb, max_tokens=1)
        step = a.schedule(preempt=["A"], preempt_to_back=True)
        assert set(a.blocks["B"]) & set(a_blocks), "B must reuse A's blocks"
        assert "A" in step.meta.preempted
        threading.Timer(1.0, engine.resume).start()
        a.update(step, a.execute(step))  # B's forward overwrites A's old blocks
        assert wm(a, "preemption_waits") == 1, "the forward did not wait for A's save"
        a.run()
        assert ra.num_preemptions == 1 and len(ra.output_token_ids) == 4 and rb.is_finished()
        # What the engine stored under A's hashes is A's KV, not B's.
        assert_loads(d, "probe", ta, 4)
    finally:
        a.close()
        d.close()


def test_engine_down_before_prefill_reports_failed_transfer(engine: Engine,
                                                           ready_server: ReadyServer) -> None:
    cache = CacheSpec("flash_attn", num_layers=2)
    p = Instance(engine, name="p", tp=2, cache=cache)
    try:
        p.handshake()
        engine.kill()
        tid = uuid.uuid4().hex
        t0 = time.monotonic()
        p.add_request("r", prompt(150, 3), max_tokens=1, kv_transfer_params={
            "do_remote_decode": True, "pegaflow_transfer_id": tid,
            "pegaflow_ready_url": ready_server.url, "pegaflow_ready_token": "t"})
        p.run(timeout_s=30)
        report = ready_server.wait_for(tid, 10)
        assert report is not None and report["status"] == "failed", report
        assert time.monotonic() - t0 < 10
        # Both ranks dropped their saves; each reports at most once, and
        # the router keeps the first.
        reports = [r for r in ready_server.reports if r.get("transfer_id") == tid]
        assert 1 <= len(reports) <= 2
    finally:
        p.close()


def test_aborted_prefill_fails_its_transfer(engine: Engine, ready_server: ReadyServer) -> None:
    cache = CacheSpec("flash_attn", num_layers=2)
    p = Instance(engine, name="p", tp=1, cache=cache, kv_role="kv_producer", token_budget=64)
    try:
        p.handshake()
        tid = uuid.uuid4().hex
        p.add_request("r", prompt(200, 7), max_tokens=1, kv_transfer_params={
            "do_remote_decode": True, "pegaflow_transfer_id": tid,
            "pegaflow_ready_url": ready_server.url, "pegaflow_ready_token": "t"})
        p.step()  # first 64-token chunk: 4 tagged blocks saved, not the last
        p.abort("r")
        p.run()
        report = ready_server.wait_for(tid, 10)
        assert report is not None and report["status"] == "failed", report
        assert p.requests["r"].finished_params is None
        assert p.connector.metrics.get("transfers_abandoned") == 1
    finally:
        p.close()


def test_hash_seed_mismatch_is_reported(engine: Engine) -> None:
    cache = CacheSpec("flash_attn", num_layers=2)
    a = Instance(engine, name="a", tp=1, cache=cache, seed="0")
    a.handshake()
    b = Instance(engine, name="b", tp=1, cache=cache, seed="1")
    try:
        deadline = time.monotonic() + 10
        while wm(b, "namespace_rejected") < 1:
            assert time.monotonic() < deadline, "seed mismatch was not detected"
            time.sleep(0.05)
        assert not b.workers[0].call("registered")
        # The scheduler learns the namespace from the handshake and is
        # rejected too: lookups are off, loudly, instead of silently missing.
        b.connector.set_xfer_handshake_metadata({0: b.workers[0].call("handshake")})
        deadline = time.monotonic() + 10
        while b.connector.metrics.get("namespace_rejected") < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        r = b.add_request("r", prompt(100, 8), max_tokens=1)
        b.run()  # still serves
        assert r.is_finished()
    finally:
        a.close()
        b.close()


def test_pd_block_size_mismatch_is_rejected(engine: Engine) -> None:
    # P and D of one model with different block sizes would silently never
    # share a block; the engine refuses D's registration instead, and D
    # keeps serving by recomputing (connector off, counted loudly).
    p = Instance(engine, name="p", tp=1, cache=CacheSpec("flash_attn", num_layers=2, block_size=16))
    p.handshake()
    d = Instance(engine, name="d", tp=1, cache=CacheSpec("flash_attn", num_layers=2, block_size=32))
    try:
        deadline = time.monotonic() + 10
        while wm(d, "namespace_rejected") < 1:
            assert time.monotonic() < deadline, "block size mismatch was not reported by D's worker"
            time.sleep(0.05)
        assert not d.workers[0].call("registered")
        d.connector.set_xfer_handshake_metadata({0: d.workers[0].call("handshake")})
        deadline = time.monotonic() + 10
        while d.connector.metrics.get("namespace_rejected") < 1:
            assert time.monotonic() < deadline, "block size mismatch was not reported by D's scheduler"
            time.sleep(0.05)
        tokens = prompt(150, 9)
        tid = uuid.uuid4().hex
        rp = p.add_request("p", tokens, max_tokens=1,
                           kv_transfer_params={"do_remote_decode": True, "pegaflow_transfer_id": tid})
        p.run()
        rd = d.add_request("d", tokens, max_tokens=1, kv_transfer_params=rp.finished_params)
        d.run()
        assert rd.is_finished() and rd.load_done_computed is None
    finally:
        p.close()
        d.close()


def test_timed_out_preemption_wait_cancels_the_save(engine: Engine) -> None:
    """A preempted request's save that cannot finish within
    preemption_wait_ms (the engine is stopped) is cancelled: its blocks now
    hold another request's KV, so the engine must seal none of its hashes."""
    cache = CacheSpec("flash_attn", num_layers=2, num_blocks=6)
    a = Instance(engine, name="a", tp=1, cache=cache, token_budget=512,
                 extra={"query_timeout_ms": 100, "preemption_wait_ms": 300})
    d = Instance(engine, name="d", tp=1, cache=CacheSpec("flash_attn", num_layers=2))
    try:
        a.handshake()
        d.handshake()
        ta, tb = prompt(70, 31), prompt(70, 32)
        ra = a.add_request("A", ta, max_tokens=4)
        ask(a.connector, ra)
        ask(a.connector, Request("B", tb, 1, a.bs, a.seed_hash))
        engine.pause()
        a.step()  # A's prefill; the save of its 4 full blocks is stuck
        rb = a.add_request("B", tb, max_tokens=1)
        step = a.schedule(preempt=["A"], preempt_to_back=True)
        assert "A" in step.meta.preempted
        t0 = time.monotonic()
        a.update(step, a.execute(step))  # waits 300 ms, cancels A's save, B overwrites
        assert time.monotonic() - t0 < 5
        assert wm(a, "preemption_wait_timeouts") == 1 and wm(a, "preempted_saves_cancelled") == 1
        engine.resume()
        assert a.flush()
        assert wm(a, "saves_cancelled_blocks") >= 4
        # Nothing of A's was sealed (Query: 0 hits for its hashes).
        assert ask(d.connector, Request("probe0", ta, 1, d.bs, d.seed_hash)) == (0, False)
        # A, recomputed, saves again: now its own KV.
        a.run()
        assert ra.num_preemptions == 1 and len(ra.output_token_ids) == 4 and rb.is_finished()
        assert a.flush()
        assert_loads(d, "probe", ta, 4)
    finally:
        engine.resume()
        a.close()
        d.close()
