"""A connector that cannot start never stalls vLLM (issue 17, item 1).

Each registration step of one TP rank is made to fail in turn; the
instance must keep serving every request (computed locally), free every
block it was asked to keep, answer 0 matched tokens, and tell the router
that a prefill's transfer will never come.
"""

from __future__ import annotations

import random
import time
import uuid

import pytest
from harness import REGISTRATION_STEPS, CacheSpec, Engine, Instance, ReadyServer

from pegaflow_connector.disabled import DisabledWorker
from pegaflow_connector.metadata import LoadSpec, PegaConnectorMetadata, SaveSpec
from pegaflow_connector.metrics import Metrics


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 50000) for _ in range(n)]


# Steps that leave the rank without a connector (the others leave it running
# but unregistered: saves dropped, loads recomputed).
DISABLING = [s for s in REGISTRATION_STEPS if s != "register_rpc"]


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("step", REGISTRATION_STEPS)
def test_registration_failure_never_stalls_vllm(engine: Engine, ready_server: ReadyServer,
                                                step: str, rank: int) -> None:
    cache = CacheSpec("flash_attn", num_layers=2)
    shared = prompt(120, 7)
    healthy = Instance(engine, name="h", tp=2, cache=cache)
    try:
        healthy.handshake()
        healthy.add_request("warm", shared, max_tokens=1)
        healthy.run()
        assert healthy.flush()
    finally:
        healthy.close()

    b = Instance(engine, name="b", tp=2, cache=cache, fail_at={rank: step})
    try:
        b.handshake(expect_disabled=True)
        if step not in DISABLING:
            # The scheduler claims the hit (the other rank registered the
            # namespace), so the unregistered rank fails its load.
            sched = b.connector.scheduler_core
            deadline = time.monotonic() + 10
            while sched.namespace_id() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            assert sched.namespace_id() is not None, "the namespace never opened"
        tid = uuid.uuid4().hex
        reqs = [
            b.add_request("hit", shared, max_tokens=3),  # the engine has its blocks
            b.add_request("long", prompt(200, 8), max_tokens=4),
            b.add_request("p", prompt(90, 9), max_tokens=1, kv_transfer_params={
                "do_remote_decode": True, "pegaflow_transfer_id": tid,
                "pegaflow_ready_url": ready_server.url, "pegaflow_ready_token": "t"}),
        ]
        b.run(timeout_s=60)
        for r in reqs:
            assert r.is_finished() and len(r.output_token_ids) == r.max_tokens, r.request_id
        assert not b.delayed, f"frees still delayed: {b.delayed}"
        assert len(b.free) == cache.num_blocks, "vLLM's blocks leaked"
        if step in DISABLING:
            assert b.connector.scheduler_core.disabled, "the scheduler side was not told"
            assert reqs[0].load_done_computed is None, "a disabled connector claimed a hit"
            assert b.connector.metrics.get("connector_disabled") == 1
            report = ready_server.wait_for(tid, 10)
            assert report is not None and report["status"] == "failed", report
            assert "disabled" in report["message"]
            modes = [m["_mode"] for m in b.worker_metrics()]
            assert modes[rank] == "disabled" and modes[1 - rank] != "disabled", modes
        else:
            # vLLM asks again from 0 computed tokens after the failed load;
            # claiming the hit again would fail the same way, for ever.
            assert reqs[0].load_done_computed == 0, reqs[0].load_done_computed
            assert b.connector.metrics.get("loads_failed_recomputed") == 1
    finally:
        b.close()


def test_disabled_worker_settles_what_vllm_hands_it() -> None:
    """The scheduler may have planned saves and loads before it learnt of
    the failure: each delayed free is reported done in the step vLLM
    reports the request finished, each load finished with every block
    failed."""
    w = DisabledWorker("boom", 1, Metrics())
    m1 = PegaConnectorMetadata(loads=[LoadSpec("r1", [3, 4], [b"a", b"b"])],
                               saves=[SaveSpec("r2", [5], [b"c"])])
    w.start_step(m1)
    w.start_step(m1)  # handle_preemptions + start_load_kv: once
    w.end_step(m1)
    assert w.get_finished(set()) == (None, {"r1"})
    assert w.load_errors() == {3, 4} and w.load_errors() == set()
    m2 = PegaConnectorMetadata(delayed_free={"r2"})
    w.start_step(m2)
    assert w.get_finished({"r2", "r9"}) == ({"r2"}, None)
    assert w.get_finished({"r2"}) == (None, None)
    h = w.handshake()
    assert h.disabled == "boom" and h.namespace == b"" and h.rank == 1
    assert w.metrics.get("blocks_load_failed") == 2 and w.metrics.get("saves_dropped") == 1
