"""ProbeConnector: a vLLM KV connector that records how vLLM drives it.

It claims nothing (no external tokens, no delayed frees), so the instance
behaves like plain vLLM; every call vLLM makes is appended as one JSON line
to `$PROBE_LOG` (default /tmp/probe-connector.jsonl) with the process id and
role, and the arguments summarised: tensor shape/dtype/stride/device/address,
block ids, block-hash types, metadata as the worker received it.

To see that the metadata built by the scheduler reaches the worker and which
axis of the KV tensor is the block axis, the scheduler sends each new
request's block ids (and prompt token ids), and the worker logs, after the
step's forward, a checksum of the K and V halves of each of those blocks in
every layer. With `$PROBE_DUMP_DIR` set it also saves those blocks' raw
per-layer tensors and the prompt ids (`<req>.pt`), which verify_kv_layout.py
compares with the K/V that Hugging Face transformers computes.

    PYTHONPATH=scripts/e2e-vllm vllm serve MODEL --kv-transfer-config \
      '{"kv_connector":"ProbeConnector","kv_role":"kv_both",
        "kv_connector_module_path":"probe_connector"}'
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

_LOCK = threading.Lock()
# Per-layer save_kv_layer / wait_for_layer_load calls are logged in full only
# for the first steps; after that they are counted.
_DETAILED_STEPS = 4


def _tensor(t: Any) -> Any:
    if not isinstance(t, torch.Tensor):
        return repr(type(t))
    d: dict[str, Any] = {
        "shape": list(t.shape),
        "dtype": str(t.dtype),
        "stride": list(t.stride()),
        "device": str(t.device),
        "contiguous": t.is_contiguous(),
        "data_ptr": t.data_ptr(),
        "storage_offset": t.storage_offset(),
        "nbytes": t.numel() * t.element_size(),
    }
    try:
        st = t.untyped_storage()
        d["storage_ptr"] = st.data_ptr()
        d["storage_nbytes"] = st.nbytes()
    except Exception as e:  # noqa: BLE001 - a probe reports, never fails
        d["storage_error"] = repr(e)
    return d


def _short(v: Any, limit: int = 300) -> str:
    s = repr(v)
    return s if len(s) <= limit else s[:limit] + f"...({len(s)} chars)"


@dataclass
class ProbeMetadata(KVConnectorMetadata):
    step: int = 0
    # request id -> block ids (first KV cache group) of newly scheduled requests
    new_blocks: dict[str, list[int]] = field(default_factory=dict)
    num_prompt_tokens: dict[str, int] = field(default_factory=dict)
    prompt_token_ids: dict[str, list[int]] = field(default_factory=dict)


def kv_views(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V regions of a CPU-backend layer tensor. The registered shape is
    [num_blocks, num_kv_heads, block_size, 2*head_size], but per (block, head)
    the memory holds block_size*head_size K values, then block_size*head_size
    V values (cpu_attn.py views it as [B, H, 2*block_size, head_size] and
    chunks dim 2). Inside the K region the "vec" ISA stores K transposed
    ([head_size, block_size]); V is [block_size, head_size] (verified by
    verify_kv_layout.py). The checksums only need the regions."""
    b, h, n, c2 = t.shape
    k, v = t.view(b, h, 2 * n, c2 // 2).chunk(2, dim=2)
    return k, v


class ProbeConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None):
        super().__init__(vllm_config, role, kv_cache_config)
        self._path = os.environ.get("PROBE_LOG", "/tmp/probe-connector.jsonl")
        self._step = 0
        self._layer_calls = 0
        self._kv: dict[str, torch.Tensor] = {}
        kvt = vllm_config.kv_transfer_config
        cc = vllm_config.cache_config
        self._log(
            "__init__",
            role=str(role),
            kv_role=kvt.kv_role,
            engine_id=kvt.engine_id,
            extra_config=kvt.kv_connector_extra_config,
            kv_load_failure_policy=getattr(kvt, "kv_load_failure_policy", None),
            block_size=cc.block_size,
            cache_dtype=str(cc.cache_dtype),
            prefix_caching_hash_algo=str(getattr(cc, "prefix_caching_hash_algo", None)),
            enable_prefix_caching=cc.enable_prefix_caching,
            model_dtype=str(vllm_config.model_config.dtype),
            device=str(getattr(vllm_config.device_config, "device", None)),
            tp=vllm_config.parallel_config.tensor_parallel_size,
            pythonhashseed=os.environ.get("PYTHONHASHSEED"),
            kv_cache_config=_short(kv_cache_config, 2000),
        )

    # ---------------------------------------------------------------- log
    def _log(self, method: str, **kw: Any) -> None:
        rec = {"t": round(time.time(), 4), "pid": os.getpid(), "role": self._role.name, "method": method}
        rec.update(kw)
        line = json.dumps(rec, default=_short)
        with _LOCK, open(self._path, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    # ------------------------------------------------------- worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._kv = dict(kv_caches)
        layers = {name: _tensor(t) for name, t in kv_caches.items()}
        ptrs = sorted((t.data_ptr(), name) for name, t in kv_caches.items())
        shared_storage = len({t.untyped_storage().data_ptr() for t in kv_caches.values()}) == 1
        self._log(
            "register_kv_caches",
            num_layers=len(kv_caches),
            layer_names=list(kv_caches),
            layers=layers,
            one_storage_for_all_layers=shared_storage,
            data_ptr_order=[n for _, n in ptrs],
        )

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        self._step += 1
        attn = getattr(forward_context, "attn_metadata", None)
        summary: Any
        if isinstance(attn, dict):
            summary = {k: type(v).__name__ for k, v in list(attn.items())[:4]}
        else:
            summary = type(attn).__name__
        self._log(
            "start_load_kv",
            step=self._step,
            meta_type=type(meta).__name__,
            meta_step=getattr(meta, "step", None),
            meta_new_blocks=getattr(meta, "new_blocks", None),
            forward_context_type=type(forward_context).__name__,
            attn_metadata=summary,
            kwargs=list(kwargs),
        )

    def wait_for_layer_load(self, layer_name: str) -> None:
        if self._step <= _DETAILED_STEPS:
            self._log("wait_for_layer_load", step=self._step, layer=layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        self._layer_calls += 1
        if self._step > _DETAILED_STEPS:
            return
        fields = {}
        for k in ("num_actual_tokens", "slot_mapping", "seq_lens", "query_start_loc", "block_table"):
            v = getattr(attn_metadata, k, None)
            if isinstance(v, torch.Tensor):
                fields[k] = {"t": _tensor(v), "head": v.flatten()[:40].tolist()}
            elif v is not None:
                fields[k] = _short(v)
        self._log(
            "save_kv_layer",
            step=self._step,
            layer=layer_name,
            kv_layer=_tensor(kv_layer),
            same_tensor_as_registered=(
                layer_name in self._kv and kv_layer.data_ptr() == self._kv[layer_name].data_ptr()
            ),
            attn_metadata_type=type(attn_metadata).__name__,
            attn_metadata=fields,
            kwargs=list(kwargs),
        )

    def wait_for_save(self) -> None:
        meta = self._connector_metadata
        sums: dict[str, Any] = {}
        if isinstance(meta, ProbeMetadata) and meta.new_blocks and self._kv:
            dump_dir = os.environ.get("PROBE_DUMP_DIR")
            for req, blocks in meta.new_blocks.items():
                per_layer = {}
                for name, t in self._kv.items():
                    k, v = kv_views(t)
                    per_layer[name] = [
                        [round(float(k[b].float().abs().sum()), 4), round(float(v[b].float().abs().sum()), 4)]
                        for b in blocks[:6]
                    ]
                sums[req] = per_layer
                if dump_dir:
                    os.makedirs(dump_dir, exist_ok=True)
                    torch.save(
                        {
                            "block_ids": blocks,
                            "prompt_token_ids": meta.prompt_token_ids.get(req, []),
                            "layers": {n: t[blocks].clone() for n, t in self._kv.items()},
                        },
                        os.path.join(dump_dir, f"{req}.pt"),
                    )
        self._log("wait_for_save", step=self._step, layer_calls_so_far=self._layer_calls, block_abs_sums_K_V=sums)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if finished_req_ids:
            self._log("get_finished", finished_req_ids=sorted(finished_req_ids))
        return None, None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return set()

    def handle_preemptions(self, kv_connector_metadata: Any) -> None:
        self._log("handle_preemptions", meta=_short(kv_connector_metadata))

    def shutdown(self) -> None:
        self._log("shutdown")

    # ---------------------------------------------------- scheduler side
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        hashes = list(getattr(request, "block_hashes", []) or [])
        first = hashes[0] if hashes else None
        self._log(
            "get_num_new_matched_tokens",
            request_id=request.request_id,
            num_computed_tokens=num_computed_tokens,
            num_prompt_tokens=request.num_prompt_tokens,
            prompt_token_ids_head=list(request.prompt_token_ids or [])[:24],
            num_tokens=request.num_tokens,
            block_hashes_container=type(request.block_hashes).__name__,
            num_block_hashes=len(hashes),
            block_hash_type=type(first).__name__ if first is not None else None,
            block_hash_len=len(first) if isinstance(first, (bytes, bytearray)) else None,
            block_hash_first_hex=bytes(first).hex() if isinstance(first, (bytes, bytearray)) else _short(first),
            block_hash_second_hex=(
                bytes(hashes[1]).hex() if len(hashes) > 1 and isinstance(hashes[1], (bytes, bytearray)) else None
            ),
            kv_transfer_params=request.kv_transfer_params,
            cache_salt=getattr(request, "cache_salt", None),
            lora=_short(getattr(request, "lora_request", None)),
            sampling=_short(request.sampling_params, 400),
        )
        return 0, False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        self._log(
            "update_state_after_alloc",
            request_id=request.request_id,
            num_external_tokens=num_external_tokens,
            blocks_type=type(blocks).__name__,
            block_ids=_short(blocks.get_block_ids()),
        )

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        self._step += 1
        meta = ProbeMetadata(step=self._step)
        for r in scheduler_output.scheduled_new_reqs:
            meta.new_blocks[r.req_id] = list(r.block_ids[0]) if r.block_ids else []
            meta.num_prompt_tokens[r.req_id] = len(r.prompt_token_ids or [])
            if os.environ.get("PROBE_DUMP_DIR"):
                meta.prompt_token_ids[r.req_id] = list(r.prompt_token_ids or [])
        cached = scheduler_output.scheduled_cached_reqs
        if scheduler_output.total_num_scheduled_tokens or scheduler_output.finished_req_ids:
            self._log(
                "build_connector_meta",
                step=self._step,
                new_reqs=[
                    {
                        "req_id": r.req_id,
                        "block_ids": _short(r.block_ids),
                        "num_computed_tokens": r.num_computed_tokens,
                        "num_prompt_tokens": len(r.prompt_token_ids or []),
                    }
                    for r in scheduler_output.scheduled_new_reqs
                ],
                cached_req_ids=list(cached.req_ids),
                cached_new_block_ids=_short(cached.new_block_ids),
                num_scheduled_tokens=dict(scheduler_output.num_scheduled_tokens),
                finished_req_ids=sorted(scheduler_output.finished_req_ids),
                num_common_prefix_blocks=_short(getattr(scheduler_output, "num_common_prefix_blocks", None)),
            )
        return meta

    def update_connector_output(self, connector_output: Any) -> None:
        fs = getattr(connector_output, "finished_sending", None)
        fr = getattr(connector_output, "finished_recving", None)
        if fs or fr:
            self._log("update_connector_output", finished_sending=_short(fs), finished_recving=_short(fr))

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._log(
            "request_finished",
            request_id=request.request_id,
            block_ids=_short(block_ids),
            num_block_hashes=len(request.block_hashes),
            num_tokens=request.num_tokens,
            status=str(request.status),
            kv_transfer_params=request.kv_transfer_params,
        )
        # Returned params reach a non-streaming client as `kv_transfer_params`.
        return False, {"probe_request_id": request.request_id}
