"""scripts/vllm-compat: the signature checker itself, and (where the wheel
cache build/vllm-compat is filled by `make vllm-compat`) every release."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import subprocess
import sys
from types import ModuleType

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
SCRIPT = os.path.join(ROOT, "scripts", "vllm-compat")


def _load() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("vllm_compat", SCRIPT)
    spec = importlib.util.spec_from_loader("vllm_compat", loader)
    assert spec is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["vllm_compat"] = mod  # dataclasses look their module up
    loader.exec_module(mod)
    return mod


vc = _load()

BASE = '''
from abc import ABC, abstractmethod
class SupportsHMA(ABC):
    @abstractmethod
    def request_finished_all_groups(self, request, block_ids): ...
class KVConnectorBase_V1(ABC):
    @property
    def requires_kv_delivery(self) -> bool: ...
    @classmethod
    def supports_sleep_mode(cls, kv_transfer_config) -> bool: ...
    @abstractmethod
    def start_load_kv(self, forward_context, **kwargs): ...
    def request_finished(self, request, block_ids): ...
    def handle_preemptions(self, kv_connector_metadata): ...
'''


def _check(ours_src: str) -> object:
    files = {"base.py": BASE, "scheduler.py": "if ext_tokens is None: pass",
             "request.py": "self.block_hashes = []\ndef get_block_ids_with_load_errors"}
    files["base.py"] += "\n    def get_block_ids_with_load_errors(self): ...\n"
    ours, bases = vc.our_methods(ours_src)
    return vc.check("9.9.9", files, ours, bases, (0, 11, 1))


def test_a_conforming_class_passes() -> None:
    row = _check('''
class PegaFlowConnector(KVConnectorBase_V1):
    @property
    def requires_kv_delivery(self): ...
    @classmethod
    def supports_sleep_mode(cls, kv_transfer_config): ...
    def start_load_kv(self, forward_context=None, **kwargs): ...
    def request_finished(self, request, block_ids=None): ...
''')
    assert row.ok and row.abstract == "ok" and row.hooks.startswith("ok"), row


def test_each_mismatch_is_named() -> None:
    row = _check('''
class Mixin:
    def request_finished_all_groups(self, request, block_ids): ...
class PegaFlowConnector(Mixin, KVConnectorBase_V1, SupportsHMA):
    def requires_kv_delivery(self): ...
    def supports_sleep_mode(self, kv_transfer_config): ...
    def request_finished(self, req, block_ids, extra): ...
    def handle_preemptions(self): ...
''')
    assert not row.ok
    assert row.abstract == "missing start_load_kv"  # the mixin's HMA method counts
    assert "requires_kv_delivery: is a method, vLLM's is a property" in row.hooks
    assert "supports_sleep_mode: is a method, vLLM's is a classmethod" in row.hooks
    assert "request_finished: parameter #1 is req, vLLM's is request" in row.hooks
    assert "request_finished: requires 3 arguments, vLLM passes as few as 2" in row.hooks
    assert "handle_preemptions: takes no parameter #1 (kv_connector_metadata)" in row.hooks


@pytest.mark.skipif(not all(os.path.exists(os.path.join(vc.CACHE, r, "base.py")) for r in vc.RELEASES),
                    reason="no wheel cache (make vllm-compat fills build/vllm-compat)")
def test_every_supported_release_from_the_cache() -> None:
    out = subprocess.run([sys.executable, SCRIPT, "--offline"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
