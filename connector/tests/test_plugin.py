"""The vLLM plugin entry point (issue 17, item 8)."""

from __future__ import annotations

import importlib
import os
import sys
import types
from collections.abc import Callable, Iterator

import pytest
import tomllib

import pegaflow_connector
from pegaflow_connector import plugin

ROOT = os.path.join(os.path.dirname(__file__), "..")


class _Factory:
    """vLLM's KVConnectorFactory.register_connector, as in 0.33."""

    _registry: dict[str, Callable[[], type]] = {}

    @classmethod
    def register_connector(cls, name: str, module_path: str, class_name: str) -> None:
        if name in cls._registry:
            raise ValueError(f"Connector '{name}' is already registered.")
        cls._registry[name] = lambda: getattr(importlib.import_module(module_path), class_name)


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[_Factory]]:
    _Factory._registry = {"PegaKVConnector": lambda: object}  # the Rust project's
    names = ["vllm", "vllm.distributed", "vllm.distributed.kv_transfer",
             "vllm.distributed.kv_transfer.kv_connector",
             "vllm.distributed.kv_transfer.kv_connector.factory"]
    for n in names:
        monkeypatch.setitem(sys.modules, n, types.ModuleType(n))
    sys.modules[names[-1]].KVConnectorFactory = _Factory  # type: ignore[attr-defined]
    yield _Factory


def test_register_adds_pegaflow_connector_once(fake_vllm: type[_Factory]) -> None:
    plugin.register()
    plugin.register()  # vLLM loads plugins in every process, maybe twice
    cls = fake_vllm._registry["PegaFlowConnector"]()
    assert cls is pegaflow_connector.PegaFlowConnector
    assert fake_vllm._registry["PegaKVConnector"]() is object  # not ours to replace
    # The old name still loads by module path.
    assert pegaflow_connector.PegaKVConnector is pegaflow_connector.PegaFlowConnector


def test_register_without_vllm_is_a_no_op() -> None:
    plugin.register()


def test_entry_point_is_declared() -> None:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        eps = tomllib.load(f)["project"]["entry-points"]["vllm.general_plugins"]
    assert eps == {"pegaflow_connector": "pegaflow_connector.plugin:register"}
