"""Scheduler-side behaviour against the real engine: claims, memo, leases."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator

import pytest
from harness import CacheSpec, Engine, Instance, Request, ask


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 50000) for _ in range(n)]


def wait_until(cond: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


@pytest.fixture
def pair(engine: Engine) -> Iterator[tuple[Instance, Instance]]:
    cache = CacheSpec("flash_attn", num_layers=2)
    a = Instance(engine, name="a", tp=1, cache=cache)
    b = Instance(engine, name="b", tp=1, cache=cache)
    try:
        a.handshake()
        b.handshake()
        yield a, b
    finally:
        a.close()
        b.close()


def compute(inst: Instance, rid: str, tokens: list[int]) -> None:
    inst.add_request(rid, tokens, max_tokens=1)
    inst.run()
    assert inst.flush()


def req_for(inst: Instance, rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, 1, inst.bs, inst.seed_hash)


def test_claims_full_blocks_but_never_the_last_token(pair: tuple[Instance, Instance]) -> None:
    a, b = pair
    exact = prompt(64, 1)  # 4 full blocks, nothing after
    tail = prompt(69, 2)  # 4 full blocks + 5 tokens
    compute(a, "exact", exact)
    compute(a, "tail", tail)
    sched = b.connector
    assert ask(sched, req_for(b, "x1", exact), 0) == (48, True)
    assert ask(sched, req_for(b, "x2", tail), 0) == (64, True)
    # Beyond the local prefix cache only, block aligned.
    assert ask(sched, req_for(b, "x3", tail), 32) == (32, True)
    assert ask(sched, req_for(b, "x4", tail), 64) == (0, False)
    # A shared prefix hits up to the first differing block.
    fork = tail[:40] + prompt(60, 3)
    assert ask(sched, req_for(b, "x5", fork), 0) == (32, True)


def test_repeated_calls_are_memoised(pair: tuple[Instance, Instance]) -> None:
    a, b = pair
    tokens = prompt(100, 4)
    compute(a, "m", tokens)
    m = b.connector.metrics
    before = m.get("queries")
    req = req_for(b, "memo", tokens)
    answers = {ask(b.connector, req, 0)} | {b.connector.get_num_new_matched_tokens(req, 0)
                                            for _ in range(20)}
    assert answers == {(96, True)}
    assert m.get("queries") - before == 1
    # A different local prefix is a different question.
    assert ask(b.connector, req, 16) == (80, True)
    assert m.get("queries") - before == 2


def test_nothing_to_ask_costs_no_rpc(pair: tuple[Instance, Instance], engine: Engine) -> None:
    _, b = pair
    m = b.connector.metrics
    before = m.get("queries") + m.get("queries_failed")
    assert b.connector.get_num_new_matched_tokens(req_for(b, "short", prompt(15, 5)), 0) == (0, False)
    assert b.connector.get_num_new_matched_tokens(req_for(b, "one", prompt(16, 5)), 0) == (0, False)
    assert m.get("queries") + m.get("queries_failed") == before
    # Engine gone: answers "no hit" at once, without attempting an RPC.
    engine.kill()
    wait_until(lambda: not b.connector.client.connected)
    assert b.connector.get_num_new_matched_tokens(req_for(b, "down", prompt(200, 6)), 0) == (0, False)
    assert m.get("queries") + m.get("queries_failed") == before
    assert m.get("queries_skipped") >= 1


def test_unused_lease_is_released(pair: tuple[Instance, Instance], engine: Engine) -> None:
    a, b = pair
    tokens = prompt(100, 7)
    compute(a, "l", tokens)
    req = req_for(b, "lease", tokens)
    assert ask(b.connector, req, 0) == (96, True)
    wait_until(lambda: engine.stats().pinned_blocks == 6)
    # The request goes away before any load (e.g. aborted while waiting).
    assert b.connector.request_finished(req, []) == (False, None)
    wait_until(lambda: engine.stats().pinned_blocks == 0)


def test_lease_ends_after_the_load(pair: tuple[Instance, Instance], engine: Engine) -> None:
    a, b = pair
    tokens = prompt(100, 8)
    compute(a, "src", tokens)
    req = b.add_request("dst", tokens, max_tokens=2)
    b.run()
    assert req.load_done_computed == 96 and len(req.output_token_ids) == 2
    assert engine.stats().pinned_blocks == 0
    assert b.connector.scheduler_core.num_tracked() == 0, "scheduler state leaked"


@pytest.mark.parametrize("announce", [True, False], ids=["on_new_request", "no-announce"])
def test_scheduler_thread_never_waits_for_the_engine(engine: Engine, announce: bool) -> None:
    """A stalled engine (SIGSTOP) costs vLLM's scheduler step nothing: the
    connector answers None ("ask again next step") until the query, run
    off the scheduler thread, returns; the request then loads its hit."""
    cache = CacheSpec("flash_attn", num_layers=2)
    a = Instance(engine, name="a", tp=1, cache=cache)
    b = Instance(engine, name="b", tp=1, cache=cache, announce=announce)
    try:
        a.handshake()
        b.handshake()
        tokens = prompt(100, 9)
        compute(a, "src", tokens)
        engine.pause()
        try:
            req = b.add_request("dst", tokens, max_tokens=2)
            t0 = time.perf_counter()
            step = b.schedule()
            took = time.perf_counter() - t0
            assert took < 0.05, f"scheduler step waited {took * 1e3:.0f} ms on the engine"
            assert req.status == "WAITING" and not step.meta.loads
            t0 = time.perf_counter()
            assert b.connector.get_num_new_matched_tokens(req, 0) == (None, False)
            assert time.perf_counter() - t0 < 0.01
        finally:
            engine.resume()
        b.run()
        assert req.load_done_computed == 96 and len(req.output_token_ids) == 2
        assert engine.stats().pinned_blocks == 0
    finally:
        a.close()
        b.close()


def test_synchronous_mode_answers_at_once(engine: Engine) -> None:
    """async_query=false (the old behaviour, kept for comparison): the
    answer comes from an RPC on the calling thread, never None."""
    cache = CacheSpec("flash_attn", num_layers=2)
    a = Instance(engine, name="a", tp=1, cache=cache)
    b = Instance(engine, name="b", tp=1, cache=cache, extra={"async_query": False})
    try:
        a.handshake()
        b.handshake()
        tokens = prompt(100, 10)
        compute(a, "src", tokens)
        assert b.connector.get_num_new_matched_tokens(req_for(b, "s1", tokens), 0) == (96, True)
        assert b.connector.get_num_new_matched_tokens(req_for(b, "s2", prompt(100, 11)), 0) == (0, False)
    finally:
        a.close()
        b.close()


def test_prefetch_from_block_zero_serves_a_local_prefix(pair: tuple[Instance, Instance]) -> None:
    """on_new_request asks from block 0; when vLLM's own prefix cache then
    covers some blocks, the prefetched answer still serves the rest."""
    a, b = pair
    tokens = prompt(100, 12)
    compute(a, "src", tokens)
    m = b.connector.metrics
    req = req_for(b, "pre", tokens)
    b.connector.on_new_request(req)
    wait_until(lambda: m.get("queries") >= 1)
    before = m.get("queries")
    assert ask(b.connector, req, 32) == (64, True)
    assert m.get("queries") == before, "the prefetched answer was asked again"
