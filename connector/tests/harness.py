"""A stand-in for vLLM that drives PegaKVConnector the way vLLM does.

vLLM cannot be installed here, so this module reproduces the parts of it the
connector sees, with vLLM's field names and call order (vLLM v1 engine core,
`vllm/v1/core/sched/scheduler.py` and the worker's KV connector mixin):

scheduler process (the test process)
  - `get_num_new_matched_tokens` for each waiting request (None = skip it
    this step), block allocation, `update_state_after_alloc` (async loads
    put the request in WAITING_FOR_REMOTE_KVS), then `build_connector_meta`
    with a SchedulerOutput (new/cached requests, block ids, scheduled
    tokens, finished and preempted ids);
  - after the step: worker outputs aggregated over TP ranks (a request is
    done sending/receiving once every rank reported it), invalid block ids
    unioned, `update_connector_output`, failed loads recomputed from the
    first bad block, `request_finished` when a request stops, and its
    blocks freed only after all ranks reported it when that returned True.

worker processes (one per TP rank, spawned)
  - KV caches of vLLM's real shapes as numpy arrays, in /dev/shm files (or
    private memory for the staging path); `register_kv_caches` once;
  - per step, the metadata arrives pickled: `handle_preemptions`,
    `bind_connector_metadata`, `start_load_kv`, the forward pass (writes a
    deterministic KV pattern for the scheduled tokens), per layer
    `wait_for_layer_load` + `save_kv_layer`, `wait_for_save`,
    `get_finished(finished_req_ids)`, `get_block_ids_with_load_errors`,
    `clear_connector_metadata`.

Every wait has a deadline: a hang is a test failure, not a stuck suite.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import http.server
import json
import math
import multiprocessing as mp
import os
import pickle
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from types import SimpleNamespace
from typing import Any

import numpy as np

STEP_TIMEOUT_S = 60.0
# KV cache files of this test process's workers (conftest removes leftovers).
SHM_PREFIX = f"/dev/shm/pegaflow-test-{os.getpid()}"

# ------------------------------------------------------------------ engine


class Engine:
    """The real `pegaflow serve` process on a UNIX socket."""

    def __init__(self, binary: str, workdir: str, pool: str = "256MiB", extra_args: Iterable[str] = ()):
        self.binary = binary
        self.workdir = workdir
        self.socket = os.path.join(workdir, "engine.sock")
        self.pool = pool
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = os.path.join(workdir, "engine.log")
        self.starts = 0

    def start(self, timeout_s: float = 20.0) -> None:
        assert self.proc is None or self.proc.poll() is not None
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [self.binary, "serve", "--socket", self.socket, "--pool-size", self.pool,
             "--http-addr", "127.0.0.1:0", "--log-level", "debug", *self.extra_args],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.starts += 1
        self.wait_ready(timeout_s)

    def wait_ready(self, timeout_s: float) -> None:
        import grpc

        from pegaflow_connector._proto import engine_pb2 as pb
        from pegaflow_connector._proto import engine_pb2_grpc as pbg

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"engine exited with {self.proc.returncode}: {self.tail()}")
            if os.path.exists(self.socket):
                with grpc.insecure_channel("unix:" + self.socket) as ch:
                    try:
                        if pbg.EngineStub(ch).Health(pb.HealthRequest(), timeout=1).status == "ok":
                            return
                    except grpc.RpcError:
                        pass
            time.sleep(0.05)
        raise TimeoutError(f"engine not ready after {timeout_s}s: {self.tail()}")

    def kill(self) -> None:
        """SIGKILL: the engine dies mid-whatever, as in a crash."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def pause(self) -> None:
        """SIGSTOP: every RPC in flight stalls (a slow or hung engine)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self) -> None:
        self.kill()
        self.start()

    def tail(self, n: int = 4000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def stats(self) -> Any:
        import grpc

        from pegaflow_connector._proto import engine_pb2 as pb
        from pegaflow_connector._proto import engine_pb2_grpc as pbg

        with grpc.insecure_channel("unix:" + self.socket) as ch:
            return pbg.EngineStub(ch).Stats(pb.StatsRequest(), timeout=5)


class ReadyServer:
    """The router's /kv_ready endpoint: records what the engine POSTs."""

    def __init__(self) -> None:
        self.reports: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with outer.cond:
                    outer.reports.append({**json.loads(body), "_t": time.monotonic(),
                                          "_path": self.path})
                    outer.cond.notify_all()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"ok": true}')

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/kv_ready"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def wait_for(self, transfer_id: str, timeout_s: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while True:
                for r in self.reports:
                    if r.get("transfer_id") == transfer_id:
                        return r
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# ------------------------------------------------------------------ vLLM's hashing


def _sha256(obj: Any) -> bytes:
    # vllm.utils.hashing.sha256: SHA-256 of the pickled input.
    return hashlib.sha256(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).digest()


def none_hash(seed: str | None) -> bytes:
    """vLLM's init_none_hash for sha256 (0.32+): without PYTHONHASHSEED
    the fixed DEFAULT_NONE_HASH_SEED (random only for xxhash)."""
    return _sha256("vllm-none-hash" if seed is None else seed)


def block_hashes(tokens: list[int], block_size: int, seed_hash: bytes, start: int = 0,
                 parent: bytes | None = None, extra: Any = None) -> list[bytes]:
    """hash_block_tokens chained over full blocks from block `start`."""
    out = []
    parent = seed_hash if parent is None else parent
    for i in range(start, len(tokens) // block_size):
        parent = _sha256((parent, tuple(tokens[i * block_size:(i + 1) * block_size]), extra))
        out.append(parent)
    return out


# ------------------------------------------------------------------ KV pattern


def token_keys(tokens: list[int]) -> np.ndarray:
    """A 32-bit key per position that depends on the whole prefix, like KV."""
    keys = np.empty(len(tokens), dtype=np.uint64)
    h = 1469598103934665603
    for i, t in enumerate(tokens):
        h = ((h ^ (t + 0x9E3779B9)) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
        keys[i] = h >> 32
    return keys


def kv_values(keys: np.ndarray, layer: int, rank: int, kv: int, elems: int) -> np.ndarray:
    """(n_tokens, elems) uint16 pattern for one layer/rank/K-or-V."""
    base = (keys * np.uint64(2654435761) + np.uint64(layer * 1000003 + rank * 7919 + kv * 31)) \
        & np.uint64(0xFFFF)
    vals = (base[:, None] + np.arange(elems, dtype=np.uint64)[None, :]) & np.uint64(0xFFFF)
    return vals.astype(np.uint16)


# ------------------------------------------------------------------ KV caches


@dataclasses.dataclass
class CacheSpec:
    layout: str  # "flash_attn", "flash_attn_hnd", "flashinfer", "mla"
    num_layers: int = 4
    num_blocks: int = 64
    block_size: int = 16
    num_kv_heads: int = 4  # total; each rank holds num_kv_heads / tp
    head_size: int = 32
    in_shm: bool = True  # False: private memory (a real vLLM CPU worker)
    # Hybrid models (vLLM's KV cache groups): the kind of each group, each
    # with num_layers layers and its own block table; () is one group.
    groups: tuple[str, ...] = ()

    def heads_per_rank(self, tp: int) -> int:
        return 1 if self.layout == "mla" else self.num_kv_heads // tp


@dataclasses.dataclass(frozen=True)
class FullAttentionSpec:
    """vLLM's KVCacheSpec classes, as far as the connector reads them."""

    block_size: int


@dataclasses.dataclass(frozen=True)
class SlidingWindowSpec:
    block_size: int
    sliding_window: int = 32


@dataclasses.dataclass(frozen=True)
class MambaSpec:
    block_size: int


_GROUP_SPECS = {"full_attention": FullAttentionSpec, "sliding_window": SlidingWindowSpec,
                "mamba": MambaSpec}


def layer_name(i: int) -> str:
    return f"model.layers.{i}.self_attn.attn"


def group_layers(spec: CacheSpec, g: int) -> list[str]:
    return [layer_name(g * spec.num_layers + i) for i in range(spec.num_layers)]


def kv_cache_config(spec: CacheSpec) -> SimpleNamespace:
    """vLLM's KVCacheConfig: the block count, and the groups of a hybrid model."""
    if hasattr(spec, "vllm_kv_cache_config"):  # hybrid_harness.HybridCache
        return spec.vllm_kv_cache_config()
    if not spec.groups:
        return SimpleNamespace(num_blocks=spec.num_blocks)
    return SimpleNamespace(num_blocks=spec.num_blocks, kv_cache_groups=[
        SimpleNamespace(layer_names=group_layers(spec, g),
                        kv_cache_spec=_GROUP_SPECS[kind](spec.block_size))
        for g, kind in enumerate(spec.groups)])


def group_block_id(spec: CacheSpec, g: int, b: int) -> int:
    """Group g's block for the request's block held as `b` in group 0: each
    group has its own block table (a fixed bijection here), so a connector
    that mixes up groups reads the wrong block."""
    return b if g == 0 else (spec.num_blocks - 1 - b + g - 1) % spec.num_blocks


def per_group(spec: CacheSpec, ids: list[int]) -> tuple[list[int], ...]:
    """Block ids as vLLM passes them: one list per KV cache group."""
    return tuple([group_block_id(spec, g, b) for b in ids] for g in range(max(len(spec.groups), 1)))


def allocate_caches(spec: CacheSpec, tp: int, path: str | None) -> dict[str, np.ndarray]:
    """Per-layer views of vLLM's logical shapes; one allocation per rank (as
    vLLM allocates one raw buffer and views layers into it)."""
    if hasattr(spec, "allocate"):  # hybrid_harness.HybridCache
        return spec.allocate(tp, path)
    h, d, nb, bs = spec.heads_per_rank(tp), spec.head_size, spec.num_blocks, spec.block_size
    if spec.layout == "mla":
        phys, perm = (nb, bs, d), (0, 1, 2)
    elif spec.layout == "flash_attn":
        phys, perm = (2, nb, bs, h, d), (0, 1, 2, 3, 4)
    elif spec.layout == "flash_attn_hnd":
        phys, perm = (2, nb, h, bs, d), (0, 1, 3, 2, 4)
    elif spec.layout == "flashinfer":
        phys, perm = (nb, 2, bs, h, d), (0, 1, 2, 3, 4)
    else:
        raise ValueError(spec.layout)
    layer_elems = math.prod(phys)
    n_layers = spec.num_layers * max(len(spec.groups), 1)
    total = layer_elems * n_layers
    if path is not None:
        buf = np.memmap(path, dtype=np.float16, mode="w+", shape=(total,))
    else:
        buf = np.zeros(total, dtype=np.float16)
    caches = {}
    for i in range(n_layers):
        flat = buf[i * layer_elems:(i + 1) * layer_elems]
        caches[layer_name(i)] = flat.reshape(phys).transpose(perm)
    return caches


def write_tokens(spec: CacheSpec, caches: dict[str, np.ndarray], rank: int, tokens: list[int],
                 block_ids: list[int] | tuple[list[int], ...], start: int, end: int) -> None:
    """The 'forward pass': KV of positions [start, end) into their slots
    (block_ids: one list per group for a hybrid model)."""
    if end <= start:
        return
    keys = token_keys(tokens[:end])[start:end]
    pos = np.arange(start, end)
    groups = block_ids if isinstance(block_ids, tuple) else (block_ids,)
    offs = pos % spec.block_size
    for li, cache in enumerate(caches.values()):
        blks = np.asarray(groups[li // spec.num_layers])[pos // spec.block_size]
        u = cache.view(np.uint16)
        if spec.layout == "mla":
            u[blks, offs] = kv_values(keys, li, 0, 0, spec.head_size)
            continue
        h = cache.shape[3]  # (2, nb, bs, h, d) and (nb, 2, bs, h, d) alike
        for kv in (0, 1):
            vals = kv_values(keys, li, rank, kv, h * spec.head_size).reshape(-1, h, spec.head_size)
            if spec.layout == "flashinfer":
                u[blks, kv, offs] = vals
            else:
                u[kv, blks, offs] = vals


def read_block(spec: CacheSpec, caches: dict[str, np.ndarray], block_id: int,
               layers: list[str] | None = None) -> list[np.ndarray]:
    out = []
    for name, cache in caches.items():
        if layers is not None and name not in layers:
            continue
        u = cache.view(np.uint16)
        if spec.layout == "mla" or spec.layout == "flashinfer":
            out.append(np.array(u[block_id]))
        else:
            out.append(np.array(u[:, block_id]))
    return out


def expected_block(spec: CacheSpec, tp: int, rank: int, tokens: list[int], index: int) -> list[np.ndarray]:
    """What read_block must return for the request's block `index`."""
    bs = spec.block_size
    keys = token_keys(tokens[:(index + 1) * bs])[index * bs:(index + 1) * bs]
    h = spec.heads_per_rank(tp)
    out = []
    for li in range(spec.num_layers):
        if spec.layout == "mla":
            out.append(kv_values(keys, li, 0, 0, spec.head_size))
            continue
        k = kv_values(keys, li, rank, 0, h * spec.head_size).reshape(bs, h, spec.head_size)
        v = kv_values(keys, li, rank, 1, h * spec.head_size).reshape(bs, h, spec.head_size)
        out.append(np.stack([k, v]))
    return out


# ------------------------------------------------------------------ vLLM objects


class RequestStatus:
    WAITING = "WAITING"
    WAITING_FOR_REMOTE_KVS = "WAITING_FOR_REMOTE_KVS"
    RUNNING = "RUNNING"
    PREEMPTED = "PREEMPTED"
    FINISHED_STOPPED = "FINISHED_STOPPED"
    FINISHED_LENGTH_CAPPED = "FINISHED_LENGTH_CAPPED"
    FINISHED_ABORTED = "FINISHED_ABORTED"


class Request:
    """The attributes of vllm.v1.request.Request the connector reads."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], max_tokens: int,
                 block_size: int, seed_hash: bytes, kv_transfer_params: dict[str, Any] | None = None):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.max_tokens = max_tokens
        self.kv_transfer_params = kv_transfer_params
        self.num_computed_tokens = 0
        self.status = RequestStatus.WAITING
        self.num_preemptions = 0
        self._bs = block_size
        self._seed = seed_hash
        self.block_hashes: list[bytes] = block_hashes(self.prompt_token_ids, block_size, seed_hash)
        self.finished_params: dict[str, Any] | None = None
        self.load_done_computed: int | None = None

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def append_output_token(self, tok: int) -> None:
        self.output_token_ids.append(tok)
        # vLLM's request block hasher runs on every appended token.
        toks = self.all_token_ids
        parent = self.block_hashes[-1] if self.block_hashes else None
        self.block_hashes.extend(block_hashes(toks, self._bs, self._seed, len(self.block_hashes),
                                              parent))

    def is_finished(self) -> bool:
        return self.status.startswith("FINISHED")


class KVCacheBlocks:
    def __init__(self, ids: list[int], spec: CacheSpec | None = None):
        self._ids = ids
        self._spec = spec

    def get_block_ids(self) -> tuple[list[int], ...]:
        if self._spec is not None:
            return per_group(self._spec, self._ids)
        return (list(self._ids),)


@dataclasses.dataclass
class NewRequestData:
    req_id: str
    prompt_token_ids: list[int] | None
    block_ids: tuple[list[int], ...]
    num_computed_tokens: int
    mm_features: list[Any] = dataclasses.field(default_factory=list)
    sampling_params: Any = None
    pooling_params: Any = None
    lora_request: Any = None


@dataclasses.dataclass
class CachedRequestData:
    req_ids: list[str]
    resumed_req_ids: set[str]
    new_token_ids: list[list[int]]
    all_token_ids: dict[str, list[int]]
    new_block_ids: list[tuple[list[int], ...] | None]
    num_computed_tokens: list[int]
    num_output_tokens: list[int]


@dataclasses.dataclass
class SchedulerOutput:
    scheduled_new_reqs: list[NewRequestData]
    scheduled_cached_reqs: CachedRequestData
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    finished_req_ids: set[str]
    preempted_req_ids: set[str] | None
    kv_connector_metadata: Any = None
    # vLLM 0.32's KVConnectorBlockState (align-mode boundary state offers).
    kv_connector_block_state: Any = None


@dataclasses.dataclass
class KVConnectorOutput:
    finished_sending: set[str] | None = None
    finished_recving: set[str] | None = None
    invalid_block_ids: set[int] = dataclasses.field(default_factory=set)
    failed_recving: set[str] = dataclasses.field(default_factory=set)


def vllm_config(*, model: str, block_size: int, tp: int, kv_role: str, engine_id: str,
                extra: dict[str, Any], dp: tuple[int, int] | None = None,
                parallel: dict[str, Any] | None = None) -> SimpleNamespace:
    """The VllmConfig attributes the connector reads."""
    ktc = SimpleNamespace(kv_connector="PegaKVConnector", kv_role=kv_role, engine_id=engine_id,
                          kv_connector_module_path="pegaflow_connector",
                          kv_connector_extra_config=dict(extra), is_kv_producer=kv_role != "kv_consumer",
                          kv_load_failure_policy="recompute")
    return SimpleNamespace(
        kv_transfer_config=ktc,
        model_config=SimpleNamespace(model=model, revision=None, dtype="float16", use_mla=False),
        cache_config=SimpleNamespace(block_size=block_size, prefix_caching_hash_algo="sha256",
                                     cache_dtype="auto", enable_prefix_caching=True),
        parallel_config=SimpleNamespace(
            tensor_parallel_size=tp, pipeline_parallel_size=1,
            data_parallel_size=dp[1] if dp else 1, data_parallel_rank=dp[0] if dp else 0,
            **(parallel or {})))


# ------------------------------------------------------------------ workers


@dataclasses.dataclass
class WorkerSpec:
    rank: int
    tp: int
    cache: CacheSpec
    model: str
    kv_role: str
    engine_id: str
    extra: dict[str, Any]
    shm_prefix: str
    env: dict[str, str]
    preempt_ids: bool = False  # handle_preemptions(set of ids), as some vLLM releases
    fail_at: str = ""  # a REGISTRATION_STEPS entry: that step raises in this worker
    dp: tuple[int, int] | None = None  # (data-parallel rank, size)


# Every step of a worker's start-up and registration, in order; a test makes
# one of them raise (see _inject_failure).
REGISTRATION_STEPS = ("setup", "tensor_info", "detect", "describe_memory", "start_threads",
                      "add_on_connect", "register_rpc")


def _inject_failure(step: str) -> None:
    """Makes one registration step raise, the way it can fail for real:
    a bad config or unreachable library at start-up, an unsupported tensor,
    a layout the connector refuses, shared memory it cannot map, no thread
    to start, a broken engine client, an unexpected registration reply."""
    from pegaflow_connector import client, layout, vllm_connector, worker

    def boom(exc: BaseException) -> Callable[..., Any]:
        def f(*_a: Any, **_k: Any) -> Any:
            raise exc
        return f

    if step == "setup":
        vllm_connector.EngineClient = boom(RuntimeError("injected: no engine client"))
    elif step == "tensor_info":
        worker.tensor_info = boom(TypeError("injected: unsupported tensor"))
    elif step == "detect":
        worker.detect = boom(layout.LayoutError("injected: unsupported layout"))
    elif step == "describe_memory":
        worker.describe_memory = boom(OSError(28, "injected: No space left on device"))
    elif step == "start_threads":
        worker.WorkerCore._start_threads = boom(RuntimeError("injected: can't start new thread"))
    elif step == "add_on_connect":
        client.EngineClient.add_on_connect = boom(RuntimeError("injected: client closed"))
    elif step == "register_rpc":
        client.EngineClient.register = boom(ValueError("injected: bad RegisterResponse"))
    elif step.startswith("drop_load_group:"):
        # Not a start-up failure: every load silently skips one KV cache
        # group's blocks and reports success (a hit claimed without, say,
        # the Mamba state). hybrid_harness's forward must catch it.
        group, run_load = int(step.split(":")[1]), worker.WorkerCore._run_load

        def drop(self: Any, spec: Any, wait_event: bool = False) -> set[int]:
            keep = [i for i in range(len(spec.block_ids)) if spec.group(i) != group]
            return run_load(self, dataclasses.replace(
                spec, block_ids=[spec.block_ids[i] for i in keep],
                hashes=[spec.hashes[i] for i in keep], groups=[spec.groups[i] for i in keep]),
                wait_event) & set(spec.block_ids)

        worker.WorkerCore._run_load = drop
    else:
        raise ValueError(f"unknown registration step {step!r}")


def _worker_main(conn: Any, spec: WorkerSpec) -> None:
    os.environ.update(spec.env)
    import logging

    logging.basicConfig(level=logging.WARNING,
                        format=f"[worker r{spec.rank} %(asctime)s %(levelname)s] %(message)s")
    if spec.fail_at:
        _inject_failure(spec.fail_at)
    from pegaflow_connector import PegaKVConnector
    from pegaflow_connector.compat import KVConnectorRole

    path = f"{spec.shm_prefix}-r{spec.rank}" if spec.cache.in_shm else None
    caches = allocate_caches(spec.cache, spec.tp, path)
    extra = dict(spec.extra, tp_rank=spec.rank)
    vc = vllm_config(model=spec.model, block_size=spec.cache.block_size, tp=spec.tp,
                     kv_role=spec.kv_role, engine_id=spec.engine_id, extra=extra, dp=spec.dp)
    conn_ = PegaKVConnector(vc, KVConnectorRole.WORKER, kv_cache_config(spec.cache))
    conn_.register_kv_caches(caches)
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            break
        op = msg[0]
        try:
            if op == "step":
                _, finished_ids, meta_bytes, fwd, preempted_ids = msg
                meta = pickle.loads(meta_bytes)
                # vLLM passes the metadata; some releases pass the ids.
                conn_.handle_preemptions(set(preempted_ids) if spec.preempt_ids else meta)
                conn_.bind_connector_metadata(meta)
                conn_.start_load_kv(None)
                hybrid = hasattr(spec.cache, "forward")  # hybrid_harness.HybridCache
                read_errors: list[str] = []
                for _rid, block_ids, start, end, tokens in fwd:
                    if hybrid:
                        read_errors += [f"{_rid}: {e}" for e in spec.cache.forward(  # type: ignore[attr-defined]
                            caches, spec.rank, tokens, block_ids, start, end)]
                    else:
                        write_tokens(spec.cache, caches, spec.rank, tokens, block_ids, start, end)
                for name, cache in caches.items():
                    conn_.wait_for_layer_load(name)
                    conn_.save_kv_layer(name, cache, None)
                conn_.wait_for_save()
                if hybrid:
                    # vLLM 0.32: transfer results, failed loads per request.
                    res = conn_.get_transfer_results(set(finished_ids))
                    conn_.clear_connector_metadata()
                    conn.send(("ok", (res.finished_sending, res.finished_recving,
                                      res.failed_recving, read_errors)))
                    continue
                fs, fr = conn_.get_finished(set(finished_ids))
                errs = conn_.get_block_ids_with_load_errors()
                conn_.clear_connector_metadata()
                conn.send(("ok", (fs, fr, errs)))
            elif op == "handshake":
                conn.send(("ok", conn_.get_handshake_metadata()))
            elif op == "registered":
                w = conn_.worker_core
                conn.send(("ok", bool(w is not None and w.registered())))
            elif op == "gave_up":
                # Disabled, or a registration attempt failed.
                conn.send(("ok", bool(conn_.disabled or conn_.metrics.get("register_failures"))))
            elif op == "read":
                conn.send(("ok", [read_block(spec.cache, caches, b) for b in msg[1]]))
            elif op == "read_group" and hasattr(spec.cache, "read_group"):
                conn.send(("ok", spec.cache.read_group(caches, msg[1], msg[2])))
            elif op == "read_group":
                layers = group_layers(spec.cache, msg[1])
                conn.send(("ok", [read_block(spec.cache, caches, b, layers) for b in msg[2]]))
            elif op == "load_direct":
                # A load handed straight to the worker core (block ids,
                # hashes); answers the ids that failed.
                from pegaflow_connector.metadata import LoadSpec, PegaConnectorMetadata

                w = conn_.worker_core
                assert w is not None
                w.start_step(PegaConnectorMetadata(loads=[LoadSpec("direct", msg[1], msg[2])]))
                w.flush(20)
                _, _ = w.get_finished(set())
                conn.send(("ok", w.load_errors()))
            elif op == "metrics":
                w = conn_.worker_core
                conn.send(("ok", {**conn_.metrics.snapshot(), "_mode": w.mode if w else "disabled"}))
            elif op == "stats":
                conn.send(("ok", conn_.get_kv_connector_stats()))
            elif op == "flush":
                w = conn_.worker_core
                conn.send(("ok", w.flush(msg[1]) if w else True))
            elif op == "shutdown":
                conn_.shutdown()
                conn.send(("ok", None))
                break
            else:
                conn.send(("err", f"unknown op {op}"))
        except Exception as e:  # noqa: BLE001 - report, keep serving
            import traceback

            conn.send(("err", f"{e}\n{traceback.format_exc()}"))
    if path is not None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


class WorkerProc:
    def __init__(self, spec: WorkerSpec):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, spec), daemon=True)
        self.proc.start()
        child.close()
        self.rank = spec.rank

    def send(self, msg: Any) -> None:
        self.conn.send(msg)

    def recv(self, timeout_s: float = STEP_TIMEOUT_S) -> Any:
        if not self.conn.poll(timeout_s):
            raise TimeoutError(f"worker rank {self.rank} did not answer in {timeout_s}s (hang)")
        status, value = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"worker rank {self.rank}: {value}")
        return value

    def call(self, *msg: Any, timeout_s: float = STEP_TIMEOUT_S) -> Any:
        self.send(msg)
        return self.recv(timeout_s)

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.call("shutdown", timeout_s=20)
            except Exception:  # noqa: BLE001
                pass
            self.proc.join(5)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(5)


# ------------------------------------------------------------------ instance


@dataclasses.dataclass
class Step:
    so: SchedulerOutput
    meta: Any
    fwd: list[tuple[str, list[int], int, int, list[int]]]
    sampled: list[str]


class Instance:
    """One vLLM instance: scheduler-side connector here, TP workers spawned."""

    def __init__(self, engine: Engine, *, name: str, tp: int, cache: CacheSpec,
                 kv_role: str = "kv_both", token_budget: int = 256, model: str = "test-model",
                 extra: dict[str, Any] | None = None, seed: str | None = "0",
                 worker_env: dict[str, str] | None = None, engine_id: str | None = None,
                 preempt_ids: bool = False, fail_at: dict[int, str] | None = None,
                 dp: tuple[int, int] | None = None, announce: bool = True):
        from pegaflow_connector import PegaKVConnector
        from pegaflow_connector.compat import KVConnectorRole

        self.name = name
        self.announce = announce  # call on_new_request (vLLM 0.22+) or not (older)
        self.tp = tp
        self.cache = cache
        self.bs = cache.block_size
        self.budget = token_budget
        self.engine = engine
        self.seed_hash = none_hash(seed)
        self.engine_id = engine_id or f"{name}-{uuid.uuid4().hex[:8]}"
        self.extra = {"socket_path": engine.socket, "reconnect_max_ms": 200,
                      "rpc_timeout_ms": 10000, **(extra or {})}
        env = {"PYTHONHASHSEED": seed} if seed is not None else {}
        self._prev_seed = os.environ.get("PYTHONHASHSEED")
        # Workers first: spawning forks this process, and a fork while this
        # instance's scheduler client creates its gRPC channel on its own
        # thread once crashed grpcio's core (a segfault in the parent).
        shm = f"{SHM_PREFIX}-{name}-{uuid.uuid4().hex[:8]}"
        self.workers = [WorkerProc(WorkerSpec(r, tp, cache, model, kv_role, self.engine_id,
                                              self.extra, shm, {**env, **(worker_env or {})},
                                              preempt_ids, (fail_at or {}).get(r, ""), dp))
                        for r in range(tp)]
        saved = dict(os.environ)
        try:
            if seed is None:
                os.environ.pop("PYTHONHASHSEED", None)
            else:
                os.environ["PYTHONHASHSEED"] = seed
            vc = vllm_config(model=model, block_size=self.bs, tp=tp, kv_role=kv_role,
                             engine_id=self.engine_id, extra=self.extra, dp=dp)
            self.connector = PegaKVConnector(vc, KVConnectorRole.SCHEDULER, kv_cache_config(cache))
        except BaseException:
            for w in self.workers:
                w.close()
            raise
        finally:
            os.environ.clear()
            os.environ.update(saved)
        # Scheduler state (vLLM's Scheduler, reduced to what the connector sees).
        self.free: collections.deque[int] = collections.deque(range(cache.num_blocks))
        self.blocks: dict[str, list[int]] = {}
        self.requests: dict[str, Request] = {}
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.finished_req_ids: set[str] = set()
        self.delayed: set[str] = set()
        self.finished: dict[str, Request] = {}
        self.sending_counts: collections.Counter[str] = collections.Counter()
        self.recving_counts: collections.Counter[str] = collections.Counter()
        self.finished_recving: set[str] = set()
        self.invalid: set[int] = set()
        self.events: list[tuple[str, str]] = []  # (event, req_id) in order
        self.freed_at: dict[str, float] = {}
        self.last_blocks: dict[str, list[int]] = {}  # block ids a request had when freed
        self.steps = 0

    # -------------------------------------------------------------- setup

    def handshake(self, timeout_s: float = 20.0, expect_disabled: bool = False) -> None:
        """vLLM's post-registration handshake, then wait until every rank and
        the scheduler are connected and registered (`expect_disabled`: until
        every rank registered or gave up, and without waiting for the
        scheduler's namespace)."""
        deadline = time.monotonic() + timeout_s
        while True:
            if all(w.call("registered") or (expect_disabled and w.call("gave_up"))
                   for w in self.workers):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: workers not registered")
            time.sleep(0.05)
        metas = {w.rank: w.call("handshake") for w in self.workers}
        self.connector.set_xfer_handshake_metadata(metas)
        if not expect_disabled:
            self.wait_scheduler_ready(max(deadline - time.monotonic(), 1))

    def wait_scheduler_ready(self, timeout_s: float) -> None:
        core = self.connector.scheduler_core
        deadline = time.monotonic() + timeout_s
        while core.namespace_id() is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: scheduler has no namespace")
            time.sleep(0.02)

    def wait_registered(self, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not all(w.call("registered") for w in self.workers):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: workers did not re-register")
            time.sleep(0.05)
        self.wait_scheduler_ready(max(deadline - time.monotonic(), 1))

    def close(self) -> None:
        for w in self.workers:
            w.close()
        self.connector.shutdown()

    # -------------------------------------------------------------- requests

    def add_request(self, rid: str, prompt: list[int], max_tokens: int = 1,
                    kv_transfer_params: dict[str, Any] | None = None) -> Request:
        req = Request(rid, prompt, max_tokens, self.bs, self.seed_hash, kv_transfer_params)
        self.requests[rid] = req
        self.waiting.append(req)
        if self.announce:
            self.connector.on_new_request(req)  # vLLM 0.22+: Scheduler.add_request
        return req

    def _alloc(self, rid: str, n_tokens: int) -> list[int] | None:
        have = self.blocks.setdefault(rid, [])
        need = math.ceil(n_tokens / self.bs) - len(have)
        if need <= 0:
            return []
        if need > len(self.free):
            return None
        new = [self.free.popleft() for _ in range(need)]
        have.extend(new)
        return new

    def _free_blocks(self, rid: str) -> None:
        ids = self.blocks.pop(rid, [])
        self.last_blocks[rid] = list(ids)
        for b in ids:
            self.free.append(b)
        self.freed_at[rid] = time.monotonic()
        self.events.append(("freed", rid))

    def preempt(self, req: Request, to_back: bool = False) -> None:
        """vLLM's _preempt_request: blocks back to the pool, recompute later
        (vLLM requeues at the front; `to_back` lets a test hand the blocks
        to another request first)."""
        self.running.remove(req)
        self._free_blocks(req.request_id)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        if to_back:
            self.waiting.append(req)
        else:
            self.waiting.appendleft(req)
        self._preempted_now.add(req.request_id)

    def abort(self, rid: str) -> None:
        req = self.requests[rid]
        loading = req.status == RequestStatus.WAITING_FOR_REMOTE_KVS
        if req in self.running:
            self.running.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
        req.status = RequestStatus.FINISHED_ABORTED
        self._finish(req, keep_blocks=loading)

    def _groups(self, ids: list[int]) -> tuple[list[int], ...]:
        return per_group(self.cache, ids)

    def _finish(self, req: Request, keep_blocks: bool = False) -> None:
        # vLLM 0.33 calls a SupportsHMA connector with every group's blocks.
        delay, params = self.connector.request_finished_all_groups(
            req, self._groups(self.blocks.get(req.request_id, [])))
        req.finished_params = params
        self.events.append(("finished", req.request_id))
        self.finished[req.request_id] = req
        self.finished_req_ids.add(req.request_id)
        if delay:
            self.delayed.add(req.request_id)
        elif not keep_blocks:
            # (vLLM keeps an aborted loading request's blocks until its
            # load is reported finished.)
            self._free_blocks(req.request_id)

    # -------------------------------------------------------------- one step

    def schedule(self, preempt: Iterable[str] = (), preempt_to_back: bool = False) -> Step:
        self._preempted_now: set[str] = set()
        for rid in preempt:
            self.preempt(self.requests[rid], preempt_to_back)
        budget = self.budget
        new_reqs: list[NewRequestData] = []
        cached = CachedRequestData([], set(), [], {}, [], [], [])
        num_sched: dict[str, int] = {}
        for req in list(self.running):
            if budget <= 0:
                break
            if req not in self.running:  # preempted for an earlier one
                continue
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if n <= 0:
                continue
            new = self._alloc(req.request_id, req.num_computed_tokens + n)
            while new is None:
                victim = self.running[-1]
                if victim is req:
                    break
                self.preempt(victim)
                new = self._alloc(req.request_id, req.num_computed_tokens + n)
            if new is None:
                continue
            self._cached_entry(cached, req, self._groups(new), req.num_computed_tokens)
            num_sched[req.request_id] = n
            budget -= n
        for req in list(self.waiting):
            if budget <= 0:
                break
            rid = req.request_id
            hit = self._external_hit(req)
            if hit is None:
                continue
            ext, load_async = hit
            resumed = req.num_preemptions > 0
            computed = req.num_computed_tokens + ext
            if load_async:
                assert ext > 0 and ext % self.bs == 0, ext
                if self._alloc(rid, computed) is None:
                    break
                self.connector.update_state_after_alloc(req, KVCacheBlocks(self.blocks[rid], self.cache),
                                                        ext)
                req.status = RequestStatus.WAITING_FOR_REMOTE_KVS
                self.events.append(("loading", rid))
                continue
            n = min(req.num_tokens - computed, budget)
            if self._alloc(rid, computed + n) is None:
                break
            self.connector.update_state_after_alloc(req, KVCacheBlocks(self.blocks[rid], self.cache),
                                                    ext)
            self.waiting.remove(req)
            self.running.append(req)
            req.status = RequestStatus.RUNNING
            if resumed:
                cached.resumed_req_ids.add(rid)
                self._cached_entry(cached, req, self._groups(list(self.blocks[rid])), computed)
                cached.all_token_ids[rid] = req.all_token_ids
            else:
                new_reqs.append(NewRequestData(rid, req.prompt_token_ids,
                                               self._groups(list(self.blocks[rid])), computed))
            req.num_computed_tokens = computed
            num_sched[rid] = n
            budget -= n
        so = SchedulerOutput(new_reqs, cached, num_sched, sum(num_sched.values()),
                             self.finished_req_ids, set(self._preempted_now))
        return self._dispatch(so, lambda ids: self._groups(ids) if self.cache.groups else ids)

    def _dispatch(self, so: SchedulerOutput, table: Callable[[Any], Any]) -> Step:
        """The connector's metadata for `so`, then vLLM's
        _update_after_schedule: each scheduled request's forward (its block
        table as `table` makes it) and its computed tokens advanced."""
        self.finished_req_ids = set()
        meta = self.connector.build_connector_meta(so)
        so.kv_connector_metadata = meta
        fwd, sampled = [], []
        for rid, n in so.num_scheduled_tokens.items():
            req = self.requests[rid]
            start = req.num_computed_tokens
            fwd.append((rid, table(list(self.blocks[rid])), start, start + n,
                        req.all_token_ids[:start + n]))
            req.num_computed_tokens += n
            if req.num_computed_tokens >= req.num_tokens:
                sampled.append(rid)
        self.steps += 1
        return Step(so, meta, fwd, sampled)

    @staticmethod
    def _cached_entry(cached: CachedRequestData, req: Request, new_ids: Any, computed: int) -> None:
        """A running (or resumed) request in SchedulerOutput.scheduled_cached_reqs."""
        cached.req_ids.append(req.request_id)
        cached.new_block_ids.append(new_ids)
        cached.num_computed_tokens.append(computed)
        cached.num_output_tokens.append(len(req.output_token_ids))
        cached.new_token_ids.append([])

    def _external_hit(self, req: Request) -> tuple[int, bool] | None:
        """A waiting request's finished load taken in, then (nothing
        computed yet) the connector asked; None: skip it this step (its
        load runs, or the connector needs more time)."""
        if req.status == RequestStatus.WAITING_FOR_REMOTE_KVS:
            if req.request_id not in self.finished_recving:
                return None
            self._update_waiting_for_remote_kv(req)
            req.status = RequestStatus.WAITING
        if req.num_computed_tokens == 0:
            got, load_async = self.connector.get_num_new_matched_tokens(req, 0)
            return None if got is None else (got, load_async)
        return 0, False

    def _update_waiting_for_remote_kv(self, req: Request) -> None:
        """vLLM: after a finished async load, blocks that failed to load are
        recomputed from the first bad one (kv_load_failure_policy=recompute)."""
        ids = self.blocks.get(req.request_id, [])
        bad = [i for i, b in enumerate(ids) if b in self.invalid]
        n = (bad[0] if bad else len(ids)) * self.bs
        n = min(n, req.num_tokens)
        if n == req.num_tokens:
            n -= 1
        req.num_computed_tokens = n
        req.load_done_computed = n
        self.finished_recving.discard(req.request_id)
        self.events.append(("loaded", req.request_id))

    def execute(self, step: Step, ranks: Iterable[int] | None = None) -> list[Any]:
        targets = [w for w in self.workers if ranks is None or w.rank in set(ranks)]
        blob = pickle.dumps(step.meta)
        for w in targets:
            w.send(("step", sorted(step.so.finished_req_ids), blob, step.fwd,
                    sorted(step.so.preempted_req_ids or ())))
        return [w.recv() for w in targets]

    def update(self, step: Step, outputs: list[Any]) -> KVConnectorOutput:
        """vLLM's update_from_output, KV connector parts + sampling."""
        done_send, done_recv, invalid = set(), set(), set()
        for fs, fr, errs in outputs:
            for rid in fs or ():
                self.sending_counts[rid] += 1
                if self.sending_counts[rid] == self.tp:
                    done_send.add(rid)
            for rid in fr or ():
                self.recving_counts[rid] += 1
                if self.recving_counts[rid] == self.tp:
                    done_recv.add(rid)
            invalid |= set(errs or ())
        out = KVConnectorOutput(done_send or None, done_recv or None, invalid,
                                self._failed_recving(done_recv))
        self.invalid |= invalid
        for rid in step.sampled:
            req = self.requests[rid]
            if req.is_finished():
                continue
            toks = req.all_token_ids
            req.append_output_token(int(token_keys(toks)[-1] % 50000))
            if len(req.output_token_ids) >= req.max_tokens:
                self.running.remove(req)
                req.status = RequestStatus.FINISHED_LENGTH_CAPPED
                self._finish(req)
        self.connector.update_connector_output(out)
        for rid in done_recv:
            self.recving_counts.pop(rid, None)
            req = self.requests[rid]
            if req.status == RequestStatus.WAITING_FOR_REMOTE_KVS:
                self.finished_recving.add(rid)
            else:
                assert req.is_finished(), (rid, req.status)
                self._free_blocks(rid)
        for rid in done_send:
            self.sending_counts.pop(rid, None)
            assert rid in self.delayed, f"{rid} reported sent but its free was not delayed"
            self.delayed.discard(rid)
            self._free_blocks(rid)
        return out

    def _failed_recving(self, done_recv: set[str]) -> set[str]:
        """The finished loads reported failed by request (vLLM sends them
        with finished_recving); a one-group model reports blocks instead."""
        return set()

    def step(self, preempt: Iterable[str] = ()) -> KVConnectorOutput:
        s = self.schedule(preempt)
        return self.update(s, self.execute(s))

    def busy(self) -> bool:
        return bool(self.waiting or self.running or self.delayed or self.finished_req_ids)

    def run(self, until: Callable[[], bool] | None = None, max_steps: int = 500,
            timeout_s: float = STEP_TIMEOUT_S, idle_sleep_s: float = 0.005) -> int:
        """Steps until `until()` (default: nothing left to do)."""
        until = until or (lambda: not self.busy())
        deadline = time.monotonic() + timeout_s
        n = 0
        while not until():
            if n >= max_steps or time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: not done after {n} steps: waiting="
                                   f"{[(r.request_id, r.status) for r in self.waiting]} running="
                                   f"{[r.request_id for r in self.running]} delayed={self.delayed}")
            out = self.step()
            n += 1
            if not self.running and not out.finished_sending and not out.finished_recving:
                time.sleep(idle_sleep_s)
        return n

    # -------------------------------------------------------------- inspection

    def read_blocks(self, rank: int, block_ids: list[int]) -> list[list[np.ndarray]]:
        return self.workers[rank].call("read", block_ids)

    def worker_metrics(self) -> list[dict[str, Any]]:
        return [w.call("metrics") for w in self.workers]

    def flush(self, timeout_s: float = 30.0) -> bool:
        return all(w.call("flush", timeout_s, timeout_s=timeout_s + 5) for w in self.workers)


def ask(connector: Any, req: Any, num_computed: int = 0,
        timeout_s: float = 10.0) -> tuple[int | None, bool]:
    """get_num_new_matched_tokens asked again until it answers (vLLM asks
    once per step while the connector answers None)."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = connector.get_num_new_matched_tokens(req, num_computed)
        if got[0] is not None:
            return got
        assert time.monotonic() < deadline, "connector never answered"
        time.sleep(0.001)


def save_then_load(saver: Instance, loader: Instance, tokens: list[int], rid: str = "r") -> Request:
    """`saver` computes and saves the prompt, then `loader` serves it; the
    loader's request (its load_done_computed says what it loaded)."""
    saver.add_request(rid, tokens)
    saver.run()
    assert saver.flush()
    r = loader.add_request(rid, tokens)
    loader.run()
    return r


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
