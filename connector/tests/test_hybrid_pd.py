"""Hybrid models through the real engine and the real connector (#22).

hybrid_harness.HybridInstance allocates blocks the way vLLM 0.32's hybrid
allocator does (null blocks out of the window, freed and reused mid-request,
align-mode state offers) and every forward checks what it reads: a wrong,
missing or null block of any group on D is a read error, so "no read
errors" below means D computed on exactly the bytes P's prefix produces."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from harness import Engine, ReadyServer, ask, save_then_load
from hybrid_harness import HybridCache, HybridInstance, expected_group_block
from test_faults import prompt, wm
from test_pd import decode_params, pd_params

BS = 16


def instances(engine: Engine, cache: HybridCache, *roles_budgets: tuple[str, str, int],
              tp: int = 1, **kw: Any) -> list[HybridInstance]:
    out = []
    for name, role, budget in roles_budgets:
        inst = HybridInstance(engine, name=name, tp=tp, cache=cache, kv_role=role,
                              token_budget=budget, **kw)
        out.append(inst)
        inst.handshake()
    return out


@pytest.fixture
def closing() -> Iterator[list[HybridInstance]]:
    made: list[HybridInstance] = []
    yield made
    for inst in made:
        inst.close()


def assert_loaded_bytes(d: HybridInstance, rid: str, tokens: list[int], k: int) -> None:
    """Every block D loaded (its non-null ids below k, per group) holds
    exactly what P's prefix computes."""
    table = d.blocks[rid]
    for rank in range(d.tp):
        for g in range(len(d.hcache.kinds)):
            ids = [(i, b) for i, b in enumerate(table[g][:k]) if b]  # type: ignore[index]
            got = d.read_group(rank, g, [b for _, b in ids])
            for (i, _), blocks in zip(ids, got, strict=True):
                want = expected_group_block(d.hcache, d.tp, rank, tokens, g, i)
                for w, b in zip(want, blocks, strict=True):
                    assert np.array_equal(w, b), (d.hcache.kinds[g], rank, i)


def pd(p: HybridInstance, d: HybridInstance, ready: ReadyServer, tokens: list[int],
       max_tokens: int = 3) -> tuple[Any, str]:
    tid = uuid.uuid4().hex
    pr = p.add_request("p", tokens, kv_transfer_params=pd_params(ready, tid))
    p.run()
    assert pr.finished_params is not None
    report = ready.wait_for(tid, 10)
    assert report is not None, "P's transfer was never settled"
    req = d.add_request("d", tokens, max_tokens=max_tokens,
                        kv_transfer_params=decode_params(pr.finished_params))
    d.run(until=lambda: req.load_done_computed is not None or req.is_finished())
    return req, report["status"]


@pytest.mark.parametrize("kinds, tp", [
    (("full", "sliding_window"), 1),
    (("full", "sliding_window"), 2),
    (("full", "chunked_local"), 1),
    (("full", "state"), 1),
    (("full", "sliding_window", "state"), 2),
], ids=["full+swa", "full+swa-tp2", "full+chunked", "full+state", "full+swa+state-tp2"])
def test_hybrid_pd_loads_every_group_byte_exact(engine: Engine, ready_server: ReadyServer,
                                                closing: list[HybridInstance],
                                                kinds: tuple[str, ...], tp: int) -> None:
    """P prefills in 48-token chunks (SWA / chunked blocks leave the window
    and are reused mid-request, states are offered at chunk ends); D's hit
    is every usable prompt block, every group loaded byte-exact."""
    cache = HybridCache(kinds=kinds)
    p, d = instances(engine, cache, ("p", "kv_producer", 48), ("d", "kv_consumer", 256), tp=tp)
    closing += [p, d]
    tokens = prompt(BS * 9 + 5, 31)
    req, status = pd(p, d, ready_server, tokens)
    assert status == "ready"
    usable = (len(tokens) - 1) // BS
    assert req.load_done_computed == usable * BS, "D did not load every usable prompt block"
    assert d.connector.get_loaded_kv_cache_group_ids(req) == tuple(range(len(kinds)))
    assert_loaded_bytes(d, "d", tokens, usable)
    # Null blocks where vLLM needs nothing: D loaded only the window.
    for g, kind in enumerate(kinds):
        nulls = sum(1 for b in d.blocks["d"][g][:usable] if b == 0)  # type: ignore[index]
        assert nulls == cache.skipped(g, usable * BS), kind
    d.run()
    assert req.is_finished() and len(req.output_token_ids) == 3
    assert p.read_errors == [] and d.read_errors == []
    if "sliding_window" in kinds:
        assert p.freed_ids, "P's window never moved: the test lost its point"


def test_missing_boundary_state_gives_a_smaller_hit(engine: Engine, ready_server: ReadyServer,
                                                    closing: list[HybridInstance]) -> None:
    """vLLM dropped the state offer at D's boundary (its block was freed
    first, pop_blocks_for_free): P settles the transfer with what it saved
    and D's hit shrinks to the last boundary whose state P saved (96 of
    144 tokens), still correct; with no state at all, 0."""
    cache = HybridCache(kinds=("full", "sliding_window", "state"))
    p, d = instances(engine, cache, ("p", "kv_producer", 48), ("d", "kv_consumer", 256))
    closing += [p, d]
    tokens = prompt(BS * 9 + 5, 32)
    offer = p._offer
    p._offer = lambda rid, end: None if end == 144 else offer(rid, end)  # type: ignore[method-assign]
    req, status = pd(p, d, ready_server, tokens)
    assert status == "ready"
    assert req.load_done_computed == 96
    assert wm_sched(p, "transfers_without_state") == 1
    d.run()
    assert p.read_errors == [] and d.read_errors == [] and req.is_finished()

    p._offer = lambda rid, end: None  # type: ignore[method-assign]
    other = prompt(BS * 9 + 5, 33)
    p.requests.pop("p")
    d.requests.pop("d")
    req2, _ = pd(p, d, ready_server, other)
    assert req2.load_done_computed is None, "a hit was claimed without any state"
    d.run()
    assert req2.is_finished() and d.read_errors == []


def wm_sched(inst: HybridInstance, key: str) -> int:
    sc = inst.connector.scheduler_core
    assert sc is not None
    return int(sc.metrics.get(key) or 0)


def test_a_load_missing_one_group_is_caught(engine: Engine, closing: list[HybridInstance]) -> None:
    """The harness itself: a connector that loads every group but the
    state (LMCache's garbled outputs) makes D's forward read wrong bytes."""
    cache = HybridCache(kinds=("full", "sliding_window", "state"))
    (p,) = instances(engine, cache, ("p", "kv_both", 48))
    (d,) = instances(engine, cache, ("d", "kv_both", 256), fail_at={0: "drop_load_group:2"})
    closing += [p, d]
    tokens = prompt(BS * 9 + 5, 34)
    req = save_then_load(p, d, tokens)
    assert req.load_done_computed == 144
    assert d.read_errors and all("state" in e for _, e in d.read_errors), d.read_errors


@pytest.mark.parametrize("kinds, budget, steps", [
    (("full", "sliding_window"), 64, 1),
    (("full", "state"), 32, 2),
], ids=["swa", "state"])
def test_block_freed_while_its_save_copies_is_fenced(engine: Engine, closing: list[HybridInstance],
                                                     kinds: tuple[str, ...], budget: int,
                                                     steps: int) -> None:
    """A block whose save is still copying (the engine is stopped) leaves
    the window / is a spent state, and vLLM hands it out again at once:
    the next forward must wait for the copy, or the engine stores the new
    bytes under the old hash. D then loads each prefix boundary and reads
    exactly P's prefix."""
    cache = HybridCache(kinds=kinds, window=17)
    (p,) = instances(engine, cache, ("p", "kv_both", budget))
    closing.append(p)
    tokens = prompt(BS * 6 + 1, 35)
    ask(p.connector, p.add_request("a", tokens))  # answered (a miss) before the engine stops
    engine.pause()
    try:
        for _ in range(steps):  # saves queued behind the stopped engine
            s = p.schedule()
            p.update(s, p.execute(s))
        s = p.schedule()  # hands out a block whose save has not copied yet
        reused = set(p.freed_ids) & {b for ids in p.blocks["a"] for b in ids}  # type: ignore[union-attr]
        assert reused, "the harness did not reuse a freed block"
        out: list[Any] = []
        t = threading.Thread(target=lambda: out.append(p.execute(s)))
        t.start()
        t.join(1.0)
        held = t.is_alive()
    finally:
        engine.resume()
    t.join(30)
    p.update(s, out[0])
    p.run()
    assert p.flush() and p.read_errors == []
    (d,) = instances(engine, cache, ("d", "kv_both", 256))
    closing.append(d)
    # Every boundary P saved (a state only where vLLM offered one).
    ks = sorted({n // BS for *_, n in p.offered}) if "state" in kinds else range(1, 7)
    assert len(ks) >= 3
    for k in ks:
        r = d.add_request(f"probe{k}", tokens[:k * BS + 1])
        d.run()
        assert r.load_done_computed == k * BS, k
    assert d.read_errors == [], "D read bytes the reusing forward wrote"
    assert s.meta.fence == {"a"} and held, "the forward did not wait for the save"


def test_failed_load_is_reported_per_request_and_recomputed(engine: Engine,
                                                            closing: list[HybridInstance]) -> None:
    """The engine dies during D's load: vLLM 0.32 takes a hybrid's failure
    per request (failed_recving; block ids are per group), the request
    starts again from 0 and computes everything itself."""
    cache = HybridCache(kinds=("full", "sliding_window", "state"))
    a, b = instances(engine, cache, ("a", "kv_both", 256), ("b", "kv_both", 256))
    closing += [a, b]
    tokens = prompt(BS * 9 + 5, 36)
    a.add_request("src", tokens)
    a.run()
    assert a.flush()
    req = b.add_request("dst", tokens, max_tokens=2)
    ask(b.connector, req)
    step = b.schedule()
    assert step.meta.loads and req.status == "WAITING_FOR_REMOTE_KVS"
    engine.pause()
    b.update(step, b.execute(step))
    engine.kill()
    b.run(timeout_s=30)
    assert ("load_failed", "dst") in b.events
    assert b.invalid == set(), "block ids are per group: never reported as load errors"
    assert req.is_finished() and len(req.output_token_ids) == 2
    assert b.read_errors == [] and wm(b, "loads_failed") >= 1
