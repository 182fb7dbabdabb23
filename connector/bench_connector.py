#!/usr/bin/env python3
"""Connector benchmark against the real engine: scheduler cost and
save/load throughput as seen from Python.

    make bench-connector            # or: PEGAFLOW_BIN=bin/pegaflow python3 connector/bench_connector.py

Scheduler: microseconds of vLLM's scheduler thread per request spent in
`get_num_new_matched_tokens` (every call until it answers, plus
`on_new_request` where vLLM calls it) for a miss, a hit (with its lease), a
repeated call (memoised) and a request with nothing to ask (< 1 block), in
the synchronous mode (`async_query=false`, the RPC on the scheduler thread)
and the default asynchronous one, next to a bare Health RPC (the floor of
any engine round trip from Python).

Worker: a rank's KV caches in /dev/shm (FlashAttention layout, bf16-sized
elements), steps' saves handed to the background thread and waited for,
then loads into other blocks; GB/s next to a plain numpy copy of the same
bytes in this process (the ratio is what the engine path costs).

Hybrid (#22): a full + sliding-window + Mamba-state model (per group
--hybrid-layers layers; attention pages as the dense layers', a state of
conv + ssm tensors viewed into the same pages, vLLM's hybrid allocator),
save/load GB/s of every group's blocks, and the scheduler thread's cost of
one hit (get_num_new_matched_tokens + update_state_after_alloc +
build_connector_meta) next to the same for the dense model, same run.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from types import SimpleNamespace
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "src"))
sys.path.insert(0, os.path.join(HERE, "tests"))

from harness import Engine, block_hashes, none_hash  # noqa: E402

from pegaflow_connector._proto import engine_pb2 as pb  # noqa: E402
from pegaflow_connector.client import EngineClient  # noqa: E402
from pegaflow_connector.config import ConnectorConfig, hash_seed_fingerprint  # noqa: E402
from pegaflow_connector.metadata import LoadSpec, PegaConnectorMetadata, SaveSpec  # noqa: E402
from pegaflow_connector.scheduler import SchedulerCore  # noqa: E402
from pegaflow_connector.worker import WorkerCore  # noqa: E402


class Req:
    def __init__(self, rid: str, tokens: list[int], bs: int, seed: bytes):
        self.request_id = rid
        self.prompt_token_ids = tokens
        self.num_tokens = len(tokens)
        self.num_prompt_tokens = len(tokens)
        self.kv_transfer_params = None
        self.block_hashes = block_hashes(tokens, bs, seed)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--heads", type=int, default=8, help="KV heads per rank")
    ap.add_argument("--head-size", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--blocks", type=int, default=320, help="KV cache blocks of the rank")
    ap.add_argument("--prompt-tokens", type=int, default=4096)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--pool", default="2GiB")
    ap.add_argument("--hybrid-layers", type=int, default=12, help="layers per hybrid group")
    args = ap.parse_args()
    binary = os.environ.get("PEGAFLOW_BIN") or os.path.join(HERE, "..", "bin", "pegaflow")

    workdir = tempfile.mkdtemp(prefix="pfb-", dir="/tmp")
    engine = Engine(binary, workdir, pool=args.pool, extra_args=["--log-level", "warn"])
    engine.start()
    shm = f"/dev/shm/pegaflow-bench-{uuid.uuid4().hex[:8]}"
    bs, nb = args.block_size, args.blocks
    os.environ.setdefault("PYTHONHASHSEED", "0")
    seed = none_hash(os.environ["PYTHONHASHSEED"])
    try:
        shape = (2, nb, bs, args.heads, args.head_size)
        layer_elems = int(np.prod(shape))
        buf = np.memmap(shm, dtype=np.float16, mode="w+", shape=(layer_elems * args.layers,))
        buf[:] = np.random.default_rng(0).integers(0, 1 << 15, buf.size, dtype=np.int16).view(np.float16)
        caches = {f"layers.{i}": buf[i * layer_elems:(i + 1) * layer_elems].reshape(shape)
                  for i in range(args.layers)}
        block_bytes = layer_elems * 2 // nb * args.layers

        cfg = ConnectorConfig.load({"socket_path": engine.socket}, env={})
        ns = pb.Namespace(model="bench", block_size=bs, tp_size=1, hash_algo="sha256",
                          hash_seed_fingerprint=hash_seed_fingerprint("sha256"))
        wclient = EngineClient(engine.socket, "bench-worker")
        worker = WorkerCore(cfg, wclient, rank=0, tp_size=1, instance_id="bench", namespace=ns)
        worker.register_kv_caches(caches, nb, bs)
        wclient.start()
        sclient = EngineClient(engine.socket, "bench-scheduler")
        sched = SchedulerCore(cfg, sclient, block_size=bs, instance_id="bench",
                              load_enabled=True, save_enabled=True)
        sclient.start()
        deadline = time.monotonic() + 10
        while not worker.registered():
            assert time.monotonic() < deadline, "worker did not register"
            time.sleep(0.01)
        assert worker.namespace is not None
        sched.set_namespace(worker.namespace)
        while sched.namespace_id() is None:
            assert time.monotonic() < deadline, "scheduler has no namespace"
            time.sleep(0.01)

        rng = random.Random(1)

        def tokens(n: int) -> list[int]:
            return [rng.randrange(1, 100000) for _ in range(n)]

        # ---------------------------------------------------------- saves
        n_hash = min(args.prompt_tokens // bs, nb // 2)
        hit_prompt = tokens(n_hash * bs + 1)
        hit_hashes = block_hashes(hit_prompt, bs, seed)
        print(f"engine pool {args.pool}; block = {args.layers} layers x K/V x {bs} tok x "
              f"{args.heads} heads x {args.head_size} x 2 B = {block_bytes / 2**20:.2f} MiB per rank")
        print()
        print(f"{'save/load (Python, one rank)':34} {'blocks':>7} {'ms':>9} {'GB/s':>7} "
              f"{'memcpy GB/s':>12} {'ratio':>6}")

        def row(label: str, n: int, dt: float, mc: float) -> None:
            gbps = n * block_bytes / dt / 1e9
            print(f"{label:34} {n:>7} {dt * 1e3:>9.2f} {gbps:>7.2f} {mc:>12.2f} {gbps / mc:>6.2f}")

        def memcpy_gbps(n: int) -> float:
            """Best of 3 single-thread copies into pre-faulted memory."""
            src = np.ndarray((n * block_bytes // 2,), dtype=np.float16, buffer=buf)
            dst = np.ones_like(src)
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                np.copyto(dst, src)
                best = min(best, time.perf_counter() - t0)
            return n * block_bytes / best / 1e9

        step = 0

        def run_save(ids: list[int], hashes: list[bytes]) -> float:
            nonlocal step
            step += 1
            meta = PegaConnectorMetadata(saves=[SaveSpec(f"s{step}", ids, hashes)])
            t0 = time.perf_counter()
            worker.start_step(meta)
            worker.end_step(meta)
            assert worker.flush(60)
            return time.perf_counter() - t0

        def run_load(ids: list[int], hashes: list[bytes]) -> float:
            nonlocal step
            step += 1
            rid = f"l{step}"
            meta = PegaConnectorMetadata(loads=[LoadSpec(rid, ids, hashes)])
            t0 = time.perf_counter()
            worker.start_step(meta)
            while True:
                _, recv = worker.get_finished(set())
                if recv and rid in recv:
                    break
                time.sleep(0.0002)
            dt = time.perf_counter() - t0
            assert not worker.load_errors()
            return dt

        for n in (16, 64, n_hash):
            hashes = [uuid.uuid4().bytes * 2 for _ in range(n)]
            ids = list(range(n))
            dt = run_save(ids, hashes)
            mc = memcpy_gbps(n)
            row("save (wait_for_save -> sealed)", n, dt, mc)
            row("load (start_load_kv -> finished)", n, run_load(list(range(nb - n, nb)), hashes), mc)
        run_save(list(range(n_hash)), hit_hashes)

        # ---------------------------------------------------------- scheduler
        # Scheduler-thread time per request: every get_num_new_matched_tokens
        # call until it answers (async mode answers None while the query runs
        # on the pool; vLLM asks again next step, the gap is not counted),
        # plus on_new_request where vLLM has it (0.22+). "sync" is the
        # synchronous RPC on the scheduler thread (async_query=false, the
        # behaviour before issue 17 item 9), measured in the same run.
        print()
        print(f"{'get_num_new_matched_tokens':46} {'hashes':>7} {'us/req':>8} {'p50':>7} {'p99':>8} "
              f"{'calls':>6}")

        def bench(core: SchedulerCore, label: str, make: callable, n: int, repeat_same: bool = False,
                  announce: bool = False) -> None:
            per_req, calls = [], 0
            r = make(0)
            while core.get_num_new_matched_tokens(r, 0)[0] is None:
                time.sleep(0.0002)
            for i in range(args.calls):
                if not repeat_same:
                    r = make(i + 1)
                spent = 0.0
                if announce:
                    t0 = time.perf_counter()
                    core.on_new_request(r)
                    spent += time.perf_counter() - t0
                while True:
                    t0 = time.perf_counter()
                    got = core.get_num_new_matched_tokens(r, 0)
                    spent += time.perf_counter() - t0
                    calls += 1
                    if got[0] is not None:
                        break
                    time.sleep(0.0002)  # the next scheduler step
                per_req.append(spent)
                if not repeat_same:
                    core.request_finished(r, [])
            print(f"{label:46} {n:>7} {statistics.mean(per_req) * 1e6:>8.1f} "
                  f"{pct(per_req, 0.5) * 1e6:>7.1f} {pct(per_req, 0.99) * 1e6:>8.1f} "
                  f"{calls / args.calls:>6.2f}   -> {got}")

        miss_prompts = [tokens(n_hash * bs + 1) for _ in range(args.calls + 1)]
        sync_cfg = ConnectorConfig.load({"socket_path": engine.socket, "async_query": False}, env={})
        ssync = SchedulerCore(sync_cfg, sclient, block_size=bs, instance_id="bench",
                              load_enabled=True, save_enabled=True)
        ssync.set_namespace(worker.namespace)
        while ssync.namespace_id() is None:
            assert time.monotonic() < deadline + 10, "scheduler has no namespace"
            time.sleep(0.01)
        modes = (("sync", ssync, False), ("async", sched, False), ("async+on_new_req", sched, True))
        for mode, core, announce in modes:
            tag = f"[{mode}] "
            bench(core, tag + "miss", lambda i, mode=mode: Req(f"m{mode}{i}", miss_prompts[i], bs, seed), n_hash,
                  announce=announce)
            bench(core, tag + "hit + lease", lambda i, mode=mode: Req(f"h{mode}{i}", hit_prompt, bs, seed), n_hash,
                  announce=announce)
            bench(core, tag + "repeated call (memoised)", lambda i, mode=mode: Req(f"rep{mode}", hit_prompt, bs, seed),
                  n_hash, repeat_same=True)
            bench(core, tag + "nothing to ask (< 1 block)",
                  lambda i, mode=mode: Req(f"s{mode}{i}", tokens(bs - 1), bs, seed), 0, announce=announce)
        ssync.shutdown()
        hybrid_bench(engine, args, seed, (sched, hit_prompt, n_hash), memcpy_gbps)
        times = []
        for _ in range(args.calls):
            t0 = time.perf_counter()
            sclient.health()
            times.append(time.perf_counter() - t0)
        print(f"{'(floor: bare Health RPC)':46} {0:>7} {statistics.mean(times) * 1e6:>8.1f} "
              f"{pct(times, 0.5) * 1e6:>7.1f} {pct(times, 0.99) * 1e6:>8.1f}")
        print(f"\n(one block hash hashed here: {len(hit_hashes)} hashes built in "
              f"{_hash_cost(hit_prompt, bs, seed) * 1e6:.0f} us by vLLM's own hasher, for scale)")
        worker.shutdown()
        sched.shutdown()
        wclient.close()
        sclient.close()
        return 0
    finally:
        engine.stop()
        try:
            os.unlink(shm)
        except FileNotFoundError:
            pass


def _alloc_cost(core: SchedulerCore, r: Req, blocks: tuple[list[int], ...]) -> tuple[float, int]:
    """Scheduler-thread seconds of one hit: every get_num_new_matched_tokens
    call until it answers, update_state_after_alloc, build_connector_meta."""
    spent, got = 0.0, None
    while got is None:
        t0 = time.perf_counter()
        got = core.get_num_new_matched_tokens(r, 0)[0]
        spent += time.perf_counter() - t0
        if got is None:
            time.sleep(0.0002)
    so = SimpleNamespace(scheduled_new_reqs=[], scheduled_cached_reqs=None, num_scheduled_tokens={},
                         finished_req_ids=set(), preempted_req_ids=set())
    t0 = time.perf_counter()
    core.update_state_after_alloc(r, SimpleNamespace(get_block_ids=lambda: blocks), got)
    meta = core.build_connector_meta(so)
    spent += time.perf_counter() - t0
    core.request_finished(r, [])
    for load in meta.loads:  # never run here: give the lease back
        core._pool.release(lease_id=load.lease_id)
    return spent, got


def hybrid_bench(engine: Engine, args: argparse.Namespace, seed: bytes,
                 dense: tuple[SchedulerCore, list[int], int], memcpy_gbps: Any) -> None:
    """Save/load GB/s and the scheduler's hit cost of a hybrid model."""
    from hybrid_harness import HybridCache

    from pegaflow_connector.groups import plan_groups

    bs = args.block_size
    cache = HybridCache(kinds=("full", "sliding_window", "state"), num_layers=args.hybrid_layers,
                        num_blocks=args.blocks, block_size=bs, num_kv_heads=args.heads,
                        head_size=args.head_size, window=128)
    shm = f"/dev/shm/pegaflow-bench-h-{uuid.uuid4().hex[:8]}"
    caches = cache.allocate(1, shm)
    try:
        plan = plan_groups(cache.vllm_kv_cache_config(), bs)
        cfg = ConnectorConfig.load({"socket_path": engine.socket}, env={})
        ns = pb.Namespace(model="bench-hybrid", block_size=bs, tp_size=1, hash_algo="sha256",
                          hash_seed_fingerprint=hash_seed_fingerprint("sha256"), groups=plan.protos())
        wclient = EngineClient(engine.socket, "bench-hworker")
        worker = WorkerCore(cfg, wclient, rank=0, tp_size=1, instance_id="bench-h", namespace=ns,
                            plan=plan)
        worker.register_kv_caches(caches, args.blocks, bs)
        wclient.start()
        deadline = time.monotonic() + 10
        while not worker.registered():
            assert time.monotonic() < deadline, "hybrid worker did not register"
            time.sleep(0.01)
        raw = np.ndarray((args.blocks * cache.page_bytes(1) * cache.num_layers,), np.uint8,
                         buffer=np.memmap(shm, dtype=np.uint8, mode="r+"))
        raw[:] = np.random.default_rng(1).integers(0, 255, raw.size, dtype=np.uint8)
        layout = worker.layout
        assert layout is not None
        per_group = {g: sum(lay.block_bytes for lay in layout.layers if lay.group == g)
                     for g in range(3)}
        print(f"\nhybrid: full + SWA(W=128) + state, {args.hybrid_layers} layers each; bytes per "
              f"block: " + ", ".join(f"{k} {per_group[g] / 2**20:.2f} MiB"
                                     for g, k in enumerate(cache.kinds)))
        print(f"{'hybrid save/load (one rank)':34} {'blocks':>7} {'ms':>9} {'GB/s':>7} "
              f"{'memcpy GB/s':>12} {'ratio':>6}")
        step = 0
        n_max = (args.blocks - 1) // 6
        dense_block = args.layers * 2 * bs * args.heads * args.head_size * 2
        for n in (16, n_max):
            hashes = [uuid.uuid4().bytes * 2 for _ in range(n)]
            groups = [g for g in range(3) for _ in range(n)]
            total = n * sum(per_group.values())
            mc = memcpy_gbps(max(total // dense_block, 1)) if total >= dense_block else float("nan")
            for label, base in (("save", 1), ("load", 1 + 3 * n)):
                step += 1
                ids = list(range(base, base + 3 * n))
                hs = hashes * 3
                t0 = time.perf_counter()
                if label == "save":
                    meta = PegaConnectorMetadata(saves=[SaveSpec(f"hs{step}", ids, hs, groups=groups)])
                    worker.start_step(meta)
                    worker.end_step(meta)
                    assert worker.flush(60)
                else:
                    rid = f"hl{step}"
                    worker.start_step(PegaConnectorMetadata(
                        loads=[LoadSpec(rid, ids, hs, groups=groups)]))
                    while rid not in (worker.get_transfer_results(set())[1] or set()):
                        time.sleep(0.0002)
                dt = time.perf_counter() - t0
                gbps = total / dt / 1e9
                print(f"{label + ' (3 groups)':34} {n:>7} {dt * 1e3:>9.2f} {gbps:>7.2f} "
                      f"{mc:>12.2f} {gbps / mc:>6.2f}")

        # The hit prompt saved in every group, then the scheduler's cost.
        dcore, dense_prompt, n_hash = dense
        n = min(n_hash, n_max)
        prompt = dense_prompt[:n * bs + 1]
        hashes = [bytes(h) for h in block_hashes(prompt, bs, seed)]
        meta = PegaConnectorMetadata(saves=[SaveSpec("hit", list(range(1, 3 * n + 1)), hashes * 3,
                                                     groups=[g for g in range(3) for _ in range(n)])])
        worker.start_step(meta)
        worker.end_step(meta)
        assert worker.flush(60)
        sclient = EngineClient(engine.socket, "bench-hsched")
        hcore = SchedulerCore(cfg, sclient, block_size=bs, instance_id="bench-h", load_enabled=True,
                              save_enabled=True, plan=plan)
        sclient.start()
        assert worker.namespace is not None
        hcore.set_namespace(worker.namespace)
        while hcore.namespace_id() is None:
            assert time.monotonic() < deadline + 10, "hybrid scheduler has no namespace"
            time.sleep(0.01)
        ids = list(range(1, n + 1))
        w = -(-(cache.window - 1) // bs)
        hblocks = (ids, [0] * (n - w) + ids[n - w:], [0] * (n - 1) + ids[-1:])
        print(f"\n{'scheduler, one hit (async)':46} {'blocks':>7} {'us/req':>8} {'p50':>7} {'p99':>8}")
        for label, core, blocks in (("dense: query + alloc + meta", dcore, (ids,)),
                                    ("hybrid 3 groups: query + alloc + meta", hcore, hblocks)):
            per = []
            for i in range(args.calls):
                spent, got = _alloc_cost(core, Req(f"{label[:5]}{i}", prompt, bs, seed), blocks)
                assert got == n * bs, (label, got)
                per.append(spent)
            print(f"{label:46} {n:>7} {statistics.mean(per) * 1e6:>8.1f} {pct(per, 0.5) * 1e6:>7.1f} "
                  f"{pct(per, 0.99) * 1e6:>8.1f}")
        hcore.shutdown()
        worker.shutdown()
        sclient.close()
        wclient.close()
    finally:
        try:
            os.unlink(shm)
        except FileNotFoundError:
            pass


def _hash_cost(tokens: list[int], bs: int, seed: bytes) -> float:
    t0 = time.perf_counter()
    block_hashes(tokens, bs, seed)
    return time.perf_counter() - t0


if __name__ == "__main__":
    sys.exit(main())
