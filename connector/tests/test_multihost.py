"""P and D on different engines: P's connector names its engine's peer
address in its kv_transfer_params, D's connector passes it in its Query,
and D's engine fetches P's blocks over UCX before D loads them."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator

import pytest
from conftest import engine_binary
from harness import CacheSpec, Engine, Instance, ReadyServer
from test_pd import assert_loaded_blocks, decode_params, pd_params, prompt


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def two_engines() -> Iterator[tuple[Engine, Engine, str]]:
    dirs = [tempfile.mkdtemp(prefix="pfm-", dir="/tmp") for _ in range(2)]
    a_addr, b_addr = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    env_ucx = os.environ.get("UCX_TLS")
    os.environ.setdefault("UCX_TLS", "tcp")
    a = Engine(engine_binary(), dirs[0], extra_args=["--peer-addr", a_addr, "--peer-insecure"])
    b = Engine(engine_binary(), dirs[1], extra_args=["--peer-addr", b_addr, "--peer-insecure",
                                                     "--peer-allow", a_addr])
    try:
        try:
            a.start()
            b.start()
        except RuntimeError as e:
            if "UCX" in str(e) or "ucx" in str(e):
                pytest.skip(f"engine built without UCX: {e}")
            raise
        yield a, b, a_addr
    finally:
        a.stop()
        b.stop()
        if env_ucx is None:
            os.environ.pop("UCX_TLS", None)
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


def test_pd_across_engines(two_engines: tuple[Engine, Engine, str], ready_server: ReadyServer) -> None:
    a, b, a_addr = two_engines
    cache = CacheSpec("flash_attn")
    p = Instance(a, name="p", tp=1, cache=cache, kv_role="kv_producer")
    d = Instance(b, name="d", tp=1, cache=cache, kv_role="kv_consumer")
    try:
        p.handshake()
        d.handshake()
        tokens = prompt(16 * 9 + 5, 7)
        tid = uuid.uuid4().hex
        req_p = p.add_request("req-p", tokens, max_tokens=1, kv_transfer_params=pd_params(ready_server, tid))
        p.run()
        params = req_p.finished_params
        assert params is not None
        assert params["pegaflow_source_engine"] == a_addr, "P names its engine's peer address"
        report = ready_server.wait_for(tid, 10)
        assert report is not None and report["status"] == "ready", report

        d.free.rotate(5)
        req = d.add_request("req-d", tokens, max_tokens=2, kv_transfer_params=decode_params(params))
        d.run(until=lambda: req.load_done_computed is not None)
        assert req.load_done_computed == 9 * 16, "D's engine fetched every full prompt block from P's"
        assert_loaded_blocks(p, d, "req-p", "req-d", 9, tokens)
        assert b.stats().resident_blocks == 9, "the fetched blocks are sealed in D's own engine"
        assert not d.invalid
    finally:
        p.close()
        d.close()


def test_same_engine_names_no_source(engine: Engine, ready_server: ReadyServer) -> None:
    """Same-host P/D is unchanged: an engine without --peer-addr has no peer
    address, and P's params carry no pegaflow_source_engine."""
    p = Instance(engine, name="p", tp=1, cache=CacheSpec("flash_attn"), kv_role="kv_producer")
    try:
        p.handshake()
        req = p.add_request("r", prompt(16 * 3, 3), max_tokens=1,
                            kv_transfer_params=pd_params(ready_server, uuid.uuid4().hex))
        p.run()
        assert req.finished_params is not None
        assert "pegaflow_source_engine" not in req.finished_params
    finally:
        p.close()
