"""Data and context parallelism (issue 17, item 3)."""

from __future__ import annotations

import logging
import random
from types import SimpleNamespace

import grpc
import pytest
from harness import CacheSpec, Engine, Instance, expected_block, vllm_config

from pegaflow_connector import PegaKVConnector
from pegaflow_connector._proto import engine_pb2 as pb
from pegaflow_connector.client import EngineError
from pegaflow_connector.compat import KVConnectorRole, data_parallel_rank
from pegaflow_connector.config import ConnectorConfig
from pegaflow_connector.instance import instance_id_for
from pegaflow_connector.metrics import Metrics
from pegaflow_connector.worker import WorkerCore


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 50000) for _ in range(n)]


def test_dp_ranks_sharing_an_instance_id_keep_their_own_memory(engine: Engine) -> None:
    """Before: both DP ranks registered as "fleet"; the second replaced the
    first, whose saves then copied the other rank's memory into the store."""
    cache = CacheSpec("flash_attn", num_layers=2)
    a = Instance(engine, name="a", tp=1, cache=cache, extra={"instance_id": "fleet"}, dp=(0, 2))
    b = Instance(engine, name="b", tp=1, cache=cache, extra={"instance_id": "fleet"}, dp=(1, 2))
    c = Instance(engine, name="c", tp=1, cache=cache)
    try:
        for inst in (a, b, c):
            inst.handshake()
        assert a.connector.instance_id == "fleet-dp0"
        assert b.connector.instance_id == "fleet-dp1"
        tokens = prompt(100, 3)
        a.add_request("r", tokens, max_tokens=1)
        a.run()
        assert a.flush()
        r = c.add_request("r", tokens, max_tokens=1)
        c.run()
        assert r.load_done_computed == 96
        got = c.read_blocks(0, c.last_blocks["r"][:6])
        for i in range(6):
            want = expected_block(cache, 1, 0, tokens, i)
            for layer in range(cache.num_layers):
                assert (got[i][layer] == want[layer]).all(), (i, layer)
    finally:
        for inst in (a, b, c):
            inst.close()


@pytest.mark.parametrize("configured,engine_id,dp,want", [
    ("fleet", "e1", None, "fleet"),
    ("fleet", "e1_dp3", 3, "fleet-dp3"),
    ("", "e1_dp3", 3, "vllm-e1_dp3"),  # vLLM's engine_id carries the rank already
    ("", "e1", 2, "vllm-e1-dp2"),
])
def test_instance_id_for(configured: str, engine_id: str, dp: int | None, want: str) -> None:
    assert instance_id_for(configured, engine_id, dp) == want


@pytest.mark.parametrize("pc,engine_id,want", [
    (SimpleNamespace(), None, None),
    (SimpleNamespace(data_parallel_size=4, data_parallel_rank=2), None, 2),
    # dense model, independent DP ranks (vLLM 0.33): rank reset, index kept
    (SimpleNamespace(data_parallel_size=1, data_parallel_rank=0, data_parallel_index=3), None, 3),
    (SimpleNamespace(data_parallel_size=1, data_parallel_rank=0, data_parallel_index=0), "x_dp0", 0),
])
def test_data_parallel_rank(pc: object, engine_id: str | None, want: int | None) -> None:
    assert data_parallel_rank(pc, engine_id) == want


@pytest.mark.parametrize("role", [KVConnectorRole.SCHEDULER, KVConnectorRole.WORKER])
@pytest.mark.parametrize("key", ["decode_context_parallel_size", "prefill_context_parallel_size"])
def test_context_parallel_is_refused_at_start(workdir: str, role: object, key: str,
                                              caplog: pytest.LogCaptureFixture) -> None:
    vc = vllm_config(model="m", block_size=16, tp=1, kv_role="kv_both", engine_id="e",
                     extra={"socket_path": f"{workdir}/none.sock"}, parallel={key: 2})
    with caplog.at_level(logging.ERROR, logger="vllm.pegaflow_connector"):
        c = PegaKVConnector(vc, role, SimpleNamespace(num_blocks=8))
    try:
        assert "context parallelism is not supported" in c.disabled
        assert "CONNECTOR DISABLED" in caplog.text and key in caplog.text
        assert c.get_num_new_matched_tokens(SimpleNamespace(request_id="r"), 0) == (0, False)
    finally:
        c.shutdown()


def test_duplicate_live_instance_id_is_reported_clearly(caplog: pytest.LogCaptureFixture) -> None:
    """What the engine answers when another live session holds the id."""
    class Client:
        generation = 1
        metrics = Metrics()

        def register(self, req: pb.RegisterRequest, timeout_s: float) -> None:
            raise EngineError(grpc.StatusCode.ALREADY_EXISTS, "held by session s-1", "Register")

    cl = Client()
    w = WorkerCore(ConnectorConfig.load({}, env={}), cl, rank=1, tp_size=2,  # type: ignore[arg-type]
                   instance_id="fleet", namespace=pb.Namespace())
    w._reg_req = pb.RegisterRequest(instance_id="fleet", rank=1)
    with caplog.at_level(logging.ERROR, logger="vllm.pegaflow_connector"):
        w._register(cl)  # type: ignore[arg-type]
    assert cl.metrics.get("instance_id_conflicts") == 1
    assert "already registered by another live vLLM process" in caplog.text
    assert "'fleet'" in caplog.text and w._reg_gen == -1
