"""vLLM-version shims (the compat package) and the namespace rendezvous, without an engine."""

from __future__ import annotations

import collections
from types import SimpleNamespace
from typing import Any

import pytest

from pegaflow_connector import compat, rendezvous
from pegaflow_connector._proto import engine_pb2 as pb
from pegaflow_connector.metadata import PegaHandshake

_OldBlockHash = collections.namedtuple("_OldBlockHash", ["hash_value", "token_ids", "extra_keys"])


@pytest.mark.parametrize("given,want", [
    (b"\x01" * 32, b"\x01" * 32),
    (bytearray(b"ab"), b"ab"),
    (7, (7).to_bytes(32, "big")),
    (-1, b"\xff" * 32),
    (_OldBlockHash(5, (1, 2), None), (5).to_bytes(32, "big")),
])
def test_hash_bytes_accepts_every_release_form(given: Any, want: bytes) -> None:
    assert compat.hash_bytes(given) == want


def test_hash_bytes_refuses_unknown_forms() -> None:
    with pytest.raises(TypeError):
        compat.hash_bytes("not a hash")


@pytest.mark.parametrize("given,want", [
    (None, []),
    ([1, 2], [1, 2]),
    (([1, 2],), [1, 2]),
    ([[3], [4]], [3]),
    (SimpleNamespace(get_block_ids=lambda: ([5, 6],)), [5, 6]),
])
def test_first_group(given: Any, want: list[int]) -> None:
    assert compat.first_group(given) == want


def test_resumed_req_ids_old_and_new_forms() -> None:
    new = SimpleNamespace(req_ids=["a", "b"], resumed_req_ids={"b"})
    old = SimpleNamespace(req_ids=["a", "b"], resumed_from_preemption=[True, False])
    assert compat.resumed_req_ids(new) == {"b"}
    assert compat.resumed_req_ids(old) == {"a"}
    assert compat.resumed_req_ids(SimpleNamespace(req_ids=["a"])) == set()


def test_request_fallbacks() -> None:
    bare = SimpleNamespace(prompt_token_ids=[1, 2, 3])
    assert compat.request_block_hashes(bare) == []
    assert compat.num_prompt_tokens(bare) == 3
    assert compat.num_publishable_block_hashes(bare) is None
    assert compat.kv_transfer_params(bare) == {}
    assert compat.preempted_req_ids(SimpleNamespace()) is None
    assert compat.kv_cache_num_blocks(None) is None
    assert compat.preemption_ids_arg({"r"}) == {"r"} and compat.preemption_ids_arg(object()) is None


def test_init_connector_base_without_kv_cache_config() -> None:
    calls: list[dict[str, Any]] = []

    def old_init(*, vllm_config: Any, role: Any) -> None:  # releases before kv_cache_config
        calls.append({"vllm_config": vllm_config, "role": role})

    compat.init_connector_base(old_init, "vc", "role", "kcc")
    assert calls == [{"vllm_config": "vc", "role": "role"}]


def test_rendezvous_file_round_trip(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rendezvous.tempfile, "gettempdir", lambda: str(tmp_path))
    poller = rendezvous.NamespacePoller("inst/1")
    assert poller.poll() is None  # nothing published yet
    ns = pb.Namespace(model="m", block_size=16, tp_size=2)
    rendezvous.publish_namespace("inst/1", ns)
    assert poller.poll() is None, "polled again within the interval"
    poller._checked = 0.0
    assert poller.poll() == ns


def test_namespace_from_handshakes_takes_the_lowest_rank() -> None:
    a, b = pb.Namespace(model="a"), pb.Namespace(model="b")
    metas = [rendezvous.handshake(b, "id", 1), object(), rendezvous.handshake(a, "id", 0)]
    assert rendezvous.namespace_from_handshakes(metas) == a
    assert rendezvous.namespace_from_handshakes([object()]) is None
    assert isinstance(metas[0], PegaHandshake)


@pytest.mark.parametrize("version,want", [
    ("0.11.1", (0, 11, 1)), ("0.33.0+cu128", (0, 33, 0)), ("0.12.0rc1", (0, 12, 0)),
    ("0.11.1.dev42+g1234", (0, 11, 1)), ("0.9", (0, 9, 0)), ("main", ()),
])
def test_release_tuple(version: str, want: tuple[int, ...]) -> None:
    assert compat.release_tuple(version) == want


def test_unsupported_vllm_reason() -> None:
    assert compat.unsupported_vllm_reason(None) is None  # no vLLM: stand-ins
    assert compat.unsupported_vllm_reason("0.11.1") is None
    assert compat.unsupported_vllm_reason("0.33.0") is None
    old = compat.unsupported_vllm_reason("0.11.0")
    assert old is not None and "older than 0.11.1" in old and "load" in old
    broken = compat.unsupported_vllm_reason("0.33.0", "ImportError: no torch")
    assert broken is not None and "cannot be imported" in broken and "no torch" in broken
    odd = compat.unsupported_vllm_reason("unknown")
    assert odd is not None and compat.VLLM_CHECK_ENV in odd


_FAKE_VLLM_START = r"""
import sys, types
from types import SimpleNamespace
from pegaflow_connector import PegaFlowConnector
from pegaflow_connector.compat import KVConnectorRole, UnsupportedVLLM
vc = SimpleNamespace(kv_transfer_config=SimpleNamespace(kv_role="kv_both",
                     kv_connector_extra_config={"socket_path": "/nonexistent/s"}))
try:
    PegaFlowConnector(vc, KVConnectorRole.SCHEDULER, None)
except UnsupportedVLLM as e:
    print("REFUSED", e)
else:
    print("STARTED")
"""


@pytest.mark.parametrize("version,env,want", [
    ("0.10.2", {}, "REFUSED pegaflow connector: vLLM 0.10.2 is older than 0.11.1"),
    ("0.33.0", {}, "REFUSED pegaflow connector: vLLM 0.33.0 is installed but its KV connector API"),
    ("0.10.2", {"PEGAFLOW_CONNECTOR_VLLM_CHECK": "0"}, "STARTED"),
])
def test_unsupported_vllm_fails_start_with_one_message(tmp_path: Any, version: str,
                                                       env: dict[str, str], want: str) -> None:
    """A vLLM outside the range (here a stand-in package that has only a
    version) stops start-up with the reason, instead of stand-in classes."""
    import os
    import subprocess
    import sys

    fake = tmp_path / "vllm"
    fake.mkdir()
    (fake / "__init__.py").write_text(f"__version__ = {version!r}\n")
    src = os.path.join(os.path.dirname(__file__), "..", "src")
    run_env = {**os.environ, **env, "PYTHONPATH": f"{tmp_path}{os.pathsep}{src}"}
    out = subprocess.run([sys.executable, "-c", _FAKE_VLLM_START], env=run_env,
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.startswith(want), out.stdout + out.stderr
