"""GPU-side save ordering (interprocess CUDA event), the parts a CPU host can
check: which Saves ask the engine to wait, when the save thread syncs on
the host instead, and the engine's answers over the real gRPC API."""

from __future__ import annotations

import os
from typing import Any

import grpc
import numpy as np
import pytest
from harness import Engine

from pegaflow_connector._proto import engine_pb2 as pb
from pegaflow_connector.client import EngineClient, EngineError
from pegaflow_connector.config import ConnectorConfig
from pegaflow_connector.layout import LayoutError
from pegaflow_connector.metadata import SaveSpec
from pegaflow_connector.metrics import Metrics
from pegaflow_connector.registration import ipc_mem_handle
from pegaflow_connector.worker import WorkerCore, _SaveJob


class FakeEvent:
    def __init__(self) -> None:
        self.syncs = 0

    def synchronize(self) -> None:
        self.syncs += 1


class FakeClient:
    """Just what the save path touches."""

    def __init__(self, cuda_event: bool) -> None:
        self.metrics = Metrics()
        self.generation = 1
        self.connected = True
        self.saves: list[pb.SaveRequest] = []
        self.cuda_event = cuda_event

    def save(self, req: pb.SaveRequest, timeout_s: float, handle: object = None) -> pb.SaveResponse:
        self.saves.append(req)
        return pb.SaveResponse(saved=len(req.blocks))

    def register(self, req: pb.RegisterRequest, timeout_s: float) -> pb.RegisterResponse:
        return pb.RegisterResponse(namespace_id="ns", bytes_per_block=1, cuda_event=self.cuda_event)


def make_core(client: FakeClient, ipc_event: Any) -> WorkerCore:
    core = WorkerCore(ConnectorConfig(socket_path="/nonexistent"), client,  # type: ignore[arg-type]
                      rank=1, tp_size=2, instance_id="i", namespace=pb.Namespace())
    core._reg_req = pb.RegisterRequest(instance_id="i", rank=1)
    core._ipc_event = ipc_event
    core.mode = "cuda"
    core._register(client)  # type: ignore[arg-type]
    return core


def job(event: Any, ipc: bool) -> _SaveJob:
    return _SaveJob([SaveSpec("r", [3, 4], [b"a" * 16, b"b" * 16])], event, ipc)


def test_engine_waits_on_the_gpu_when_it_opened_the_event() -> None:
    ev = FakeEvent()
    client = FakeClient(cuda_event=True)
    core = make_core(client, ev)
    core._run_save(job(ev, ipc=True))
    assert ev.syncs == 0, "no host sync when the engine waits on the GPU"
    assert [r.wait_event for r in client.saves] == [True]
    assert client.metrics.get("save_host_syncs") == 0


def test_host_sync_when_the_engine_did_not_open_it() -> None:
    ev = FakeEvent()
    client = FakeClient(cuda_event=False)  # CPU engine, refused handle, old engine
    core = make_core(client, ev)
    core._run_save(job(ev, ipc=True))
    assert ev.syncs == 1
    assert [r.wait_event for r in client.saves] == [False]
    assert client.metrics.get("save_host_syncs") == 1


def test_host_sync_after_a_reconnect_until_re_registered() -> None:
    ev = FakeEvent()
    client = FakeClient(cuda_event=True)
    core = make_core(client, ev)
    client.generation = 2  # new engine session; its registration is pending
    core._reg_gen = 2  # (registered, but cuda_event not yet known for gen 2)
    core._run_save(job(ev, ipc=True))
    assert ev.syncs == 1 and [r.wait_event for r in client.saves] == [False]


def test_no_ipc_event_means_host_sync() -> None:
    ev = FakeEvent()
    client = FakeClient(cuda_event=True)
    core = make_core(client, None)  # torch without IPC events
    assert core._event_gen == -1
    core._run_save(job(ev, ipc=False))
    assert ev.syncs == 1 and [r.wait_event for r in client.saves] == [False]


def test_engine_answers_over_grpc(engine: Engine, tmp_path: Any) -> None:
    """The real engine: an event it cannot open (shm regions; the CPU build)
    gives cuda_event=false, and wait_event without it is refused."""
    client = EngineClient(engine.socket, "test-cuda-event")
    client.start()
    try:
        assert client.wait_connected(10)
        path = os.path.join("/dev/shm", f"pegaflow-test-ev-{os.getpid()}")
        np.zeros(4096, dtype=np.uint8).tofile(path)
        try:
            ns = pb.Namespace(model="m", dtype="uint8", kv_layout="flashinfer", block_size=1, tp_size=1,
                              num_layers=1, num_kv_heads=1, head_size=64, hash_algo="sha256")
            req = pb.RegisterRequest(
                session_id=client.session_id, instance_id="ev", rank=0, namespace=ns, num_blocks=64,
                regions=[pb.MemoryRegion(shm_path=path, size=4096)],
                layers=[pb.LayerLayout(name="l0", region_index=0,
                                       segments=[pb.Segment(offset=0, stride=64, length=64)])],
                cuda_ipc_event=bytes(64))
            resp = client.register(req, 5)
            assert not resp.cuda_event
            save = pb.SaveRequest(instance_id="ev", rank=0, blocks=[pb.BlockRef(block_id=1, hash=b"h" * 16)],
                                  wait_event=True)
            with pytest.raises(EngineError) as err:
                client.save(save, 5)
            assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
            save.wait_event = False
            assert client.save(save, 5).saved == 1
        finally:
            os.unlink(path)
    finally:
        client.close()


def test_torch_ipc_handle_forms() -> None:
    raw = bytes(range(64))
    assert ipc_mem_handle(raw) == raw  # older torch: the bare cudaIpcMemHandle_t
    assert ipc_mem_handle(b"\x01c" + raw) == raw  # newer torch: version, type, handle
    with pytest.raises(LayoutError, match="expandable"):
        ipc_mem_handle(b"\x01e" + bytes(40))
    with pytest.raises(LayoutError, match="unrecognized"):
        ipc_mem_handle(bytes(10))
