"""vLLM 0.33 hooks: each implemented or deliberately defaulted (issue 17 item 5)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from harness import CacheSpec, Engine, Instance, Request, ask
from test_cuda_event import FakeClient, FakeEvent, make_core
from test_scheduler import pair, prompt  # noqa: F401 - the fixture

from pegaflow_connector import worker as worker_mod
from pegaflow_connector._proto import engine_pb2 as pb
from pegaflow_connector.compat import CacheHitSource
from pegaflow_connector.metadata import LoadSpec, PegaConnectorMetadata
from pegaflow_connector.vllm_connector import PegaFlowConnector


def test_reset_cache_never_serves_old_kv(pair: Any, engine: Engine) -> None:
    a, b = pair
    tokens = prompt(100, 1)
    a.add_request("old", tokens)
    a.run()
    assert a.flush()
    assert ask(b.connector, Request("probe", tokens, 1, b.bs, b.seed_hash)) == (96, True)
    assert b.connector.reset_cache() is False  # the shared cache was not emptied ...
    # ... but this instance serves none of it any more, and saves nothing.
    req = b.add_request("after", tokens, max_tokens=2)
    b.run()
    assert req.load_done_computed is None and len(req.output_token_ids) == 2
    assert sum(m.get("blocks_saved", 0) for m in b.worker_metrics()) == 0
    assert b.connector.metrics.get("cache_resets_refused") == 1


def test_pending_block_frees_while_saves_run(pair: Any, engine: Engine) -> None:
    a, _ = pair
    req = a.add_request("r", prompt(150, 2), max_tokens=1)
    ask(a.connector, req)
    assert not a.connector.has_pending_block_frees()
    engine.pause()  # the save of the step gets stuck
    try:
        a.step()
        assert req.is_finished() and "r" in a.delayed
        assert a.connector.has_pending_block_frees(), "vLLM would preempt instead of waiting"
    finally:
        engine.resume()
    a.run()
    assert ("freed", "r") in a.events and not a.connector.has_pending_block_frees()


@pytest.mark.parametrize("role,want", [("kv_both", False), ("kv_consumer", False),
                                       ("kv_producer", True)])
def test_requires_kv_delivery_only_for_a_producer(engine: Engine, role: str, want: bool) -> None:
    inst = Instance(engine, name="x", tp=1, cache=CacheSpec("flash_attn", num_layers=1),
                    kv_role=role)
    try:
        assert inst.connector.requires_kv_delivery is want
    finally:
        inst.close()


def test_sleep_mode_refused_and_hits_counted_as_host() -> None:
    assert PegaFlowConnector.supports_sleep_mode(None) is False
    assert PegaFlowConnector._cache_hit_source == CacheHitSource.HOST
    conn = PegaFlowConnector.__new__(PegaFlowConnector)
    assert conn.get_external_cache_hit_sources(None, 48) == {CacheHitSource.HOST: 48}
    assert conn.get_external_cache_hit_sources(None, 0) == {}
    assert CacheHitSource.HOST.value == "host"


class LoadingClient(FakeClient):
    def __init__(self, cuda_event: bool) -> None:
        super().__init__(cuda_event)
        self.loads: list[pb.LoadRequest] = []

    def load(self, req: pb.LoadRequest, timeout_s: float) -> pb.LoadResponse:
        self.loads.append(req)
        return pb.LoadResponse(status=[pb.BlockStatus.BLOCK_STATUS_OK] * len(req.blocks))

    def unregister(self, instance_id: str, rank: int, timeout_s: float) -> None:
        return


@pytest.mark.parametrize("engine_opened_event", [True, False])
def test_cuda_load_waits_for_the_previous_steps_gpu_work(monkeypatch: pytest.MonkeyPatch,
                                                         engine_opened_event: bool) -> None:
    """Async scheduling: a load must not start before the GPU work queued
    so far (the previous step's forward may write a reused block). start_step
    records the rank's interprocess event; when the engine opened it, the
    Load asks the engine's copies to wait for it on the GPU (wait_event) and
    no thread blocks; else the load thread syncs it (counted), never vLLM's."""
    assert worker_mod.LOAD_WAIT_EVENT, "the API has LoadRequest.wait_event"
    recorded: list[Any] = []

    def record(ipc_event: Any = None) -> Any:
        recorded.append(ipc_event if ipc_event is not None else FakeEvent())
        return recorded[-1]

    monkeypatch.setattr(worker_mod, "_record_cuda_event", record)
    client = LoadingClient(cuda_event=engine_opened_event)
    ipc = FakeEvent()
    core = make_core(client, ipc)
    core._bases = []
    core._start_threads()
    try:
        meta = PegaConnectorMetadata(loads=[LoadSpec("r", [1, 2], [b"a" * 16, b"b" * 16])])
        core.start_step(meta)
        deadline = time.monotonic() + 5
        while not core.get_finished(set())[1]:
            assert time.monotonic() < deadline, "load never finished"
            time.sleep(0.01)
        assert recorded == [ipc], "the rank's interprocess event is what is recorded"
        assert [r.wait_event for r in client.loads] == [engine_opened_event]
        syncs = 0 if engine_opened_event else 1
        assert ipc.syncs == syncs
        assert client.metrics.get("load_host_syncs") == syncs
        core.start_step(PegaConnectorMetadata())  # no loads: nothing recorded
        assert len(recorded) == 1
    finally:
        core.shutdown()
