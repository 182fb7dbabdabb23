#!/usr/bin/env python3
"""PegaFlow GPU check: the CUDA data path end to end on one GPU.

Run through scripts/gpu-check (which builds the CUDA binary first). This
driver:

1. measures the peak pinned-memory bandwidth of cudaMemcpyAsync in this
   process (torch pinned tensor <-> device tensor, non_blocking copies on a
   side stream, 256 MiB, best of N; pinned to the GPU's NUMA node like the
   engine's pool), per direction;
2. starts `pegaflow serve` on a temp socket;
3. spawns a producer process that allocates FlashAttention-shaped KV
   caches `(2, num_blocks, block_size, heads, head)` per layer on the GPU,
   registers them with the engine through the connector's own code
   (WorkerCore: layout detection, CUDA IPC handles, the interprocess event),
   fills them with a seeded pattern and saves every block (a shuffled
   order, so block copies do not merge) through the connector's save path
   (end_step + flush);
4. spawns a consumer process with its own caches that loads the blocks into
   other block ids and verifies every byte (and that blocks it did not load
   stayed zero);
5. repeats 3-4 for runs of 16 KiB .. 2 MiB (one K or V run of one block in
   one layer: the unit one copy moves), then checks ordering: the producer
   rewrites its caches behind a GPU sleep and saves at once; the engine
   must copy the new bytes (it waits on the worker's event on the GPU, or
   the worker syncs on its save thread when the engine could not open it);
6. prints D2H (save) and H2D (load) GB/s per run size, engine-side (from
   the engine's own save/load duration metrics) and end-to-end (the RPCs as
   the connector sees them), next to the peak, with the ratio against the
   0.9 target for 256 KiB and larger.

Exit status: 0 all bytes verified; 1 a mismatch, failed copy or ordering
error; 2 setup failure; 3 (with --strict) below target.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import multiprocessing as mp
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from typing import Any

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CONNECTOR_SRC = os.path.join(REPO, "connector", "src")

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
RUN_SIZES = [16 * KIB, 64 * KIB, 256 * KIB, 1 * MIB, 2 * MIB]
TARGET = 0.9
TARGET_FROM = 256 * KIB
HEADS, HEAD_SIZE, ELEM = 8, 128, 2  # bfloat16: 2 KiB per token per K (or V)
TOKEN_BYTES = HEADS * HEAD_SIZE * ELEM
REPLY_TIMEOUT_S = 600.0


@dataclasses.dataclass(frozen=True)
class Plan:
    run: int  # bytes of one K (or V) run of one block in one layer
    block_size: int  # tokens per block
    layers: int
    blocks: int  # saved per repetition
    pad: int  # extra consumer blocks that must stay untouched

    @property
    def rep_bytes(self) -> int:
        return self.blocks * self.layers * 2 * self.run


def make_plans(total_bytes: int, layers: int, sizes: list[int]) -> list[Plan]:
    plans = []
    for run in sizes:
        if run % TOKEN_BYTES:
            raise ValueError(f"run size {run} is not a multiple of {TOKEN_BYTES} bytes per token")
        blocks = max(16, total_bytes // (layers * 2 * run))
        plans.append(Plan(run, run // TOKEN_BYTES, layers, blocks, max(1, blocks // 16)))
    return plans


def human(n: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if n >= size:
            v = n / size
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n:.0f} B"


def block_hashes(tag: str, n: int) -> list[bytes]:
    return [hashlib.sha256(f"{tag}/{i}".encode()).digest() for i in range(n)]


# ------------------------------------------------------------------ workers


def _pattern(torch: Any, shape: tuple[int, ...], seed: int, layer: int, device: Any) -> Any:
    """Seeded bytes: the consumer regenerates exactly what the producer
    wrote (Philox on the same GPU and torch)."""
    g = torch.Generator(device=device)
    g.manual_seed(seed * 1009 + layer)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=g, device=device)


def _caches(torch: Any, plan: Plan, blocks: int, device: Any) -> dict[str, Any]:
    shape = (2, blocks, plan.block_size, HEADS, HEAD_SIZE)
    # One allocation per layer, as vLLM does for FlashAttention.
    return {f"model.layers.{i}.self_attn.attn": torch.zeros(shape, dtype=torch.bfloat16, device=device)
            for i in range(plan.layers)}


def _u8(t: Any) -> Any:
    """The cache's bytes, (2, blocks, block_size, heads, head * ELEM)."""
    import torch

    return t.view(torch.uint8)


class _Rank:
    """One registered WorkerCore with its caches."""

    def __init__(self, sock: str, name: str, plan: Plan, blocks: int, device: Any):
        import torch

        from pegaflow_connector._proto import engine_pb2 as pb
        from pegaflow_connector.client import EngineClient
        from pegaflow_connector.config import ConnectorConfig
        from pegaflow_connector.worker import WorkerCore

        self.torch = torch
        self.caches = _caches(torch, plan, blocks, device)
        self.client = EngineClient(sock, f"gpu-check {name} pid={os.getpid()}")
        self.client.start()
        if not self.client.wait_connected(30):
            raise RuntimeError("engine did not accept a session within 30 s")
        ns = pb.Namespace(model=f"gpu-check-{plan.run}", tp_size=1, block_size=plan.block_size,
                          hash_algo="sha256")
        cfg = ConnectorConfig(socket_path=sock, rpc_timeout_ms=int(REPLY_TIMEOUT_S * 1000))
        self.core = WorkerCore(cfg, self.client, rank=0, tp_size=1, instance_id=f"gpu-check-{name}-{plan.run}",
                               namespace=ns)
        try:
            self.core.register_kv_caches(self.caches, blocks, plan.block_size)
            if not self.core.registered():
                raise RuntimeError(f"registration failed (mode {self.core.mode}); see the engine log")
            if self.core.mode != "cuda":
                raise RuntimeError(f"registered in mode {self.core.mode!r}, want 'cuda'")
        except BaseException:
            self.close()
            raise

    @property
    def gpu_wait(self) -> bool:
        return self.core._event_gen == self.client.generation

    def close(self) -> None:
        self.core.shutdown(30)  # unregisters before the memory goes
        self.client.close()
        self.core._keep = []  # the core's references to the caches
        self.caches.clear()
        self.torch.cuda.synchronize()
        self.torch.cuda.empty_cache()


def _save(rank: _Rank, ids: list[int], hashes: list[bytes]) -> float:
    from pegaflow_connector.metadata import PegaConnectorMetadata, SaveSpec

    m = rank.core.metrics
    before = (m.get("blocks_saved"), m.get("blocks_save_skipped"), m.get("blocks_save_failed"),
              m.get("saves_dropped"))
    t0 = time.perf_counter()
    rank.core.end_step(PegaConnectorMetadata(saves=[SaveSpec("gpu-check", ids, hashes)]))
    if not rank.core.flush(REPLY_TIMEOUT_S):
        raise RuntimeError("save did not finish")
    dt = time.perf_counter() - t0
    saved, skipped, failed, dropped = (a - b for a, b in zip(
        (m.get("blocks_saved"), m.get("blocks_save_skipped"), m.get("blocks_save_failed"),
         m.get("saves_dropped")), before, strict=False))
    if saved != len(ids) or failed or dropped:
        raise RuntimeError(f"save of {len(ids)} blocks: {saved} saved, {skipped} skipped, {failed} failed, "
                           f"{dropped} dropped")
    return dt


def producer_main(conn: Any, sock: str, device_index: int) -> None:
    """Commands: ("save", plan, tag, seed, reps) and ("order", plan, tag)."""
    import torch

    torch.cuda.set_device(device_index)
    dev = torch.device("cuda", device_index)
    while True:
        msg = conn.recv()
        if msg is None:
            return
        try:
            if msg[0] == "save":
                _, plan, tag, seed, reps = msg
                rank = _Rank(sock, "producer", plan, plan.blocks, dev)
                try:
                    for layer, t in enumerate(rank.caches.values()):
                        _u8(t).copy_(_pattern(torch, tuple(_u8(t).shape), seed, layer, dev))
                    torch.cuda.synchronize()
                    ids = list(range(plan.blocks))
                    random.Random(seed).shuffle(ids)
                    times = [_save(rank, ids, block_hashes(f"{tag}/rep{r}", plan.blocks)) for r in range(reps)]
                    conn.send(("ok", {"times": times, "ids": ids, "gpu_wait": rank.gpu_wait}))
                finally:
                    rank.close()
            elif msg[0] == "order":
                _, plan, tag = msg
                rank = _Rank(sock, "producer-order", plan, plan.blocks, dev)
                try:
                    for layer, t in enumerate(rank.caches.values()):
                        _u8(t).copy_(_pattern(torch, tuple(_u8(t).shape), 1, layer, dev))
                    new = [_pattern(torch, tuple(_u8(t).shape), 2, layer, dev)
                           for layer, t in enumerate(rank.caches.values())]
                    torch.cuda.synchronize()
                    # The rewrite sits behind ~0.5 s of GPU sleep on the
                    # compute stream; the save is sent at once. Copying
                    # without waiting would store the old bytes.
                    if not hasattr(torch.cuda, "_sleep"):
                        conn.send(("skip", "torch.cuda._sleep is not available"))
                        continue
                    clock_khz = getattr(torch.cuda.get_device_properties(dev), "clock_rate", 0) or 2_000_000
                    torch.cuda._sleep(int(clock_khz * 1000 * 0.5))
                    for t, b in zip(rank.caches.values(), new, strict=False):
                        _u8(t).copy_(b)
                    ids = list(range(plan.blocks))
                    t0 = time.perf_counter()
                    _save(rank, ids, block_hashes(tag, plan.blocks))
                    conn.send(("ok", {"ids": ids, "gpu_wait": rank.gpu_wait,
                                      "seconds": time.perf_counter() - t0}))
                finally:
                    rank.close()
            else:
                conn.send(("error", f"unknown command {msg[0]!r}"))
        except Exception as e:  # noqa: BLE001 - reported to the driver
            conn.send(("error", f"{e}\n{traceback.format_exc()}"))


def consumer_main(conn: Any, sock: str, device_index: int) -> None:
    """Command: ("load", plan, tag, seed, src_ids) -> loads blocks tag/i
    (saved from producer block src_ids[i], seeded pattern `seed`) into a
    shuffled set of its own block ids and checks every byte."""
    import torch

    from pegaflow_connector.metadata import LoadSpec

    torch.cuda.set_device(device_index)
    dev = torch.device("cuda", device_index)
    while True:
        msg = conn.recv()
        if msg is None:
            return
        try:
            _, plan, tag, seed, src_ids = msg
            total = plan.blocks + plan.pad
            rank = _Rank(sock, "consumer", plan, total, dev)
            try:
                dst = list(range(total))
                random.Random(seed + 1).shuffle(dst)
                dst, untouched = dst[:plan.blocks], dst[plan.blocks:]
                t0 = time.perf_counter()
                failed = rank.core._run_load(LoadSpec("gpu-check", dst, block_hashes(tag, plan.blocks)))
                seconds = time.perf_counter() - t0
                torch.cuda.synchronize()
                bad_layers = []
                src_t = torch.tensor(src_ids, device=dev)
                dst_t = torch.tensor(dst, device=dev)
                rest_t = torch.tensor(untouched, device=dev)
                for layer, t in enumerate(rank.caches.values()):
                    u8 = _u8(t)
                    exp = _pattern(torch, (2, plan.blocks, *u8.shape[2:]), seed, layer, dev)
                    # The producer's caches had plan.blocks blocks: same shape.
                    ok = torch.equal(u8.index_select(1, dst_t), exp.index_select(1, src_t))
                    ok = ok and int(u8.index_select(1, rest_t).count_nonzero()) == 0
                    if not ok:
                        bad_layers.append(layer)
                conn.send(("ok", {"seconds": seconds, "failed": len(failed), "bad_layers": bad_layers,
                                  "gpu_wait": rank.gpu_wait}))
            finally:
                rank.close()
        except Exception as e:  # noqa: BLE001
            conn.send(("error", f"{e}\n{traceback.format_exc()}"))


# ------------------------------------------------------------------ driver


class Worker:
    def __init__(self, ctx: Any, target: Any, sock: str, device: int, name: str):
        self.conn, child = ctx.Pipe()
        self.name = name
        self.proc = ctx.Process(target=target, args=(child, sock, device), name=name, daemon=True)
        self.proc.start()

    def call(self, *msg: Any) -> Any:
        self.conn.send(msg)
        if not self.conn.poll(REPLY_TIMEOUT_S):
            raise RuntimeError(f"{self.name}: no answer within {REPLY_TIMEOUT_S:.0f} s")
        status, payload = self.conn.recv()
        if status == "error":
            raise RuntimeError(f"{self.name}: {payload}")
        return status, payload

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[str, float]:
    out: dict[str, float] = {}
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            parts = line.split()
            if len(parts) == 2 and not line.startswith("#"):
                try:
                    out[parts[0]] = float(parts[1])
                except ValueError:
                    pass
    return out


def engine_rate(before: dict[str, float], after: dict[str, float], what: str) -> float:
    """GB/s of the engine's own save or load durations between scrapes."""
    secs = after.get(f"pegaflow_engine_{what}_duration_seconds_sum", 0) - \
        before.get(f"pegaflow_engine_{what}_duration_seconds_sum", 0)
    nbytes = after.get(f"pegaflow_engine_{what}_bytes_sum", 0) - before.get(f"pegaflow_engine_{what}_bytes_sum", 0)
    return nbytes / secs / 1e9 if secs > 0 else 0.0


def numa_bind(device: int) -> str:
    """Best effort: run this process on the GPU's NUMA node (where the
    engine puts its pool), so the peak is measured like the engine copies."""
    import torch

    p = torch.cuda.get_device_properties(device)
    bus = None
    if all(hasattr(p, a) for a in ("pci_domain_id", "pci_bus_id", "pci_device_id")):
        bus = f"{p.pci_domain_id:04x}:{p.pci_bus_id:02x}:{p.pci_device_id:02x}.0"
    elif shutil.which("nvidia-smi"):
        uuid = str(getattr(p, "uuid", ""))
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=uuid,pci.bus_id", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout
            for line in out.splitlines():
                u, b = (x.strip() for x in line.split(","))
                if uuid and u.removeprefix("GPU-") == uuid.removeprefix("GPU-"):
                    bus = b.lower()[-12:]  # "00000000:1B:00.0" -> "0000:1b:00.0"
        except (OSError, ValueError, subprocess.SubprocessError):
            pass
    if bus is None:
        return "unknown (no PCI id)"
    try:
        with open(f"/sys/bus/pci/devices/{bus}/numa_node") as f:
            node = int(f.read())
        if node < 0:
            return "none (single node)"
        with open(f"/sys/devices/system/node/node{node}/cpulist") as f:
            cpus = parse_cpulist(f.read())
        os.sched_setaffinity(0, cpus & os.sched_getaffinity(0) or cpus)
        return str(node)
    except (OSError, ValueError) as e:
        return f"unknown ({e})"


def parse_cpulist(s: str) -> set[int]:
    cpus: set[int] = set()
    for part in s.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def measure_peak(device: int, nbytes: int = 256 * MIB, iters: int = 8) -> tuple[float, float]:
    """cudaMemcpyAsync peak, pinned host <-> device (torch issues one
    cudaMemcpyAsync per copy_ with non_blocking=True), best of iters."""
    import torch

    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    host.fill_(1)
    stream = torch.cuda.Stream(device=device)
    best = {}
    for name, dst, src in (("d2h", host, dev), ("h2d", dev, host)):
        rates = []
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)  # warm up
            for _ in range(iters):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(stream)
                dst.copy_(src, non_blocking=True)
                end.record(stream)
                end.synchronize()
                rates.append(nbytes / (start.elapsed_time(end) / 1e3) / 1e9)
        best[name] = max(rates)
    del host, dev
    torch.cuda.empty_cache()
    return best["d2h"], best["h2d"]


@dataclasses.dataclass
class Row:
    plan: Plan
    save_engine: float
    save_rpc: float
    load_engine: float
    load_rpc: float
    ok: bool


def table(rows: list[Row], peak_d2h: float, peak_h2d: float) -> tuple[str, bool]:
    head = (f"{'run':>8} {'blocks':>7} {'layers':>6} {'per save':>9} | {'save D2H GB/s':>14} {'e2e':>6} "
            f"{'ratio':>6} | {'load H2D GB/s':>14} {'e2e':>6} {'ratio':>6} | {'target':>7} bytes")
    lines = [head, "-" * len(head)]
    below = False
    for r in rows:
        rs = r.save_engine / peak_d2h if peak_d2h else 0.0
        rl = r.load_engine / peak_h2d if peak_h2d else 0.0
        if r.plan.run >= TARGET_FROM:
            meets = rs >= TARGET and rl >= TARGET
            below |= not meets
            target = "ok" if meets else "BELOW"
        else:
            target = "-"
        lines.append(f"{human(r.plan.run):>8} {r.plan.blocks:>7} {r.plan.layers:>6} {human(r.plan.rep_bytes):>9} | "
                     f"{r.save_engine:>14.1f} {r.save_rpc:>6.1f} {rs:>6.2f} | {r.load_engine:>14.1f} "
                     f"{r.load_rpc:>6.1f} {rl:>6.2f} | {target:>7} {'ok' if r.ok else 'MISMATCH'}")
    lines.append(f"{'peak':>8} {'':>7} {'':>6} {human(256 * MIB):>9} | {peak_d2h:>14.1f} {'':>6} {1:>6.2f} | "
                 f"{peak_h2d:>14.1f} {'':>6} {1:>6.2f} |  cudaMemcpyAsync, pinned")
    return "\n".join(lines), below


def start_engine(binary: str, workdir: str, pool: int, port: int, threads: int, env: dict[str, str]) \
        -> tuple[subprocess.Popen[bytes], str, str]:
    sock = os.path.join(workdir, "engine.sock")
    log_path = os.path.join(workdir, "engine.log")
    log = open(log_path, "wb")
    proc = subprocess.Popen([binary, "serve", "--socket", sock, "--pool-size", str(pool),
                             "--http-addr", f"127.0.0.1:{port}", "--copy-threads", str(threads),
                             "--log-level", "info"], stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 120  # pinning a large pool takes a while
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200 and os.path.exists(sock):
                    return proc, sock, log_path
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"engine did not become healthy (exit {proc.poll()}); log:\n{tail(log_path)}")


def tail(path: str, n: int = 40) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return "(no log)"


def dry_run(args: argparse.Namespace, plans: list[Plan]) -> int:
    print("gpu-check dry run: nothing started, no GPU touched")
    print(f"  engine binary: {args.binary} (exists: {os.access(args.binary, os.X_OK)})")
    print(f"  pool: {human(args.pool)}; copy streams per direction: {args.copy_threads}; reps per size: {args.reps}")
    for p in plans:
        print(f"  run {human(p.run):>7}: block_size {p.block_size} tokens x {HEADS} heads x {HEAD_SIZE} (bf16), "
              f"{p.layers} layers, {p.blocks} blocks/save ({human(p.rep_bytes)}), consumer +{p.pad} untouched")
    # Exercise the report with made-up numbers, so its format is checked too.
    rows = [Row(p, 40.0, 30.0, 42.0, 33.0, True) for p in plans]
    text, _ = table(rows, 50.0, 50.0)
    print("example report (made-up numbers):")
    print(text)
    sys.path.insert(0, CONNECTOR_SRC)
    from pegaflow_connector._proto import engine_pb2 as pb  # noqa: F401 - checks grpc/protobuf are usable
    from pegaflow_connector.worker import WorkerCore  # noqa: F401

    print("connector modules import: ok")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default=os.path.join(REPO, "bin", "pegaflow"), help="CUDA build of pegaflow")
    ap.add_argument("--device", type=int, default=0, help="torch device index (after CUDA_VISIBLE_DEVICES)")
    ap.add_argument("--bytes-per-size", type=lambda s: int(float(s) * MIB), default=1 * GIB,
                    metavar="MIB", help="KV bytes saved per repetition and run size, in MiB (default 1024)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3, help="saves per run size (distinct hashes)")
    ap.add_argument("--copy-threads", type=int, default=2, help="engine --copy-threads (streams)")
    ap.add_argument("--sizes", default=",".join(str(s // KIB) for s in RUN_SIZES), help="run sizes in KiB")
    ap.add_argument("--no-batch-copy", action="store_true",
                    help="engine with PEGAFLOW_NATIVE_BATCH_COPY=0: one cudaMemcpyAsync per op (to compare)")
    ap.add_argument("--strict", action="store_true", help="exit 3 when below the 0.9 target")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (engine log)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan; start nothing")
    args = ap.parse_args(argv)
    sizes = [int(s) * KIB for s in args.sizes.split(",") if s]
    plans = make_plans(args.bytes_per_size, args.layers, sizes)
    # Room for this size's repetitions next to the previous size's, so
    # eviction never has to touch the repetition about to be loaded; 2 MiB
    # multiple for the allocator.
    args.pool = -(-max(2 * GIB, int(args.bytes_per_size * (2 * args.reps + 1))) // (2 * MIB)) * 2 * MIB
    if args.dry_run:
        return dry_run(args, plans)

    sys.path.insert(0, CONNECTOR_SRC)
    # Children inherit this; expandable segments would hand out memory that
    # cudaIpcGetMemHandle cannot export.
    os.environ.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    os.environ["PYTHONPATH"] = CONNECTOR_SRC + os.pathsep + os.environ.get("PYTHONPATH", "")
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: torch sees no CUDA device", file=sys.stderr)
        return 2
    if not os.access(args.binary, os.X_OK):
        print(f"gpu-check: {args.binary} not found (scripts/gpu-check builds it)", file=sys.stderr)
        return 2
    backend = subprocess.run([args.binary, "version"], capture_output=True, text=True).stdout.strip()
    props = torch.cuda.get_device_properties(args.device)
    node = numa_bind(args.device)
    print(f"GPU {args.device}: {props.name}, uuid {getattr(props, 'uuid', '?')}, NUMA node {node}; "
          f"torch {torch.__version__} (CUDA {torch.version.cuda}); engine: {backend or args.binary}")
    peak_d2h, peak_h2d = measure_peak(args.device)
    print(f"peak cudaMemcpyAsync pinned (256 MiB, best of 8): D2H {peak_d2h:.1f} GB/s, H2D {peak_h2d:.1f} GB/s")

    workdir = tempfile.mkdtemp(prefix="pf-gpu-", dir="/tmp")  # short: UNIX socket path limit
    port = free_port()
    env = dict(os.environ)
    if args.no_batch_copy:
        env["PEGAFLOW_NATIVE_BATCH_COPY"] = "0"
    proc = None
    workers: list[Worker] = []
    status = 0
    try:
        proc, sock, log_path = start_engine(args.binary, workdir, args.pool, port, args.copy_threads, env)
        print(f"engine: pid {proc.pid}, socket {sock}, pool {human(args.pool)}, {args.copy_threads} streams "
              f"per direction, {'per-op copies' if args.no_batch_copy else 'batched copies'}, log {log_path}")
        ctx = mp.get_context("spawn")
        prod = Worker(ctx, producer_main, sock, args.device, "producer")
        cons = Worker(ctx, consumer_main, sock, args.device, "consumer")
        workers = [prod, cons]
        rows: list[Row] = []
        gpu_wait = None
        for i, plan in enumerate(plans):
            seed = 100 + i
            tag = f"run{plan.run}"
            m0 = scrape(port)
            _, res = prod.call("save", plan, tag, seed, args.reps)
            m1 = scrape(port)
            gpu_wait = res["gpu_wait"]
            _, got = cons.call("load", plan, f"{tag}/rep{args.reps - 1}", seed, res["ids"])
            m2 = scrape(port)
            ok = not got["failed"] and not got["bad_layers"]
            if not ok:
                status = 1
                print(f"MISMATCH at run {human(plan.run)}: {got['failed']} blocks failed to load, "
                      f"layers with wrong bytes: {got['bad_layers']}", file=sys.stderr)
            rows.append(Row(plan, engine_rate(m0, m1, "save"), plan.rep_bytes * args.reps / sum(res["times"]) / 1e9,
                            engine_rate(m1, m2, "load"), plan.rep_bytes / got["seconds"] / 1e9, ok))
            print(f"  {human(plan.run)}: saved {args.reps} x {plan.blocks} blocks, loaded and verified "
                  f"{'ok' if ok else 'MISMATCH'}", flush=True)
        order_plan = next((p for p in plans if p.run == TARGET_FROM), plans[0])
        st, res = prod.call("order", order_plan, "order")
        if st == "skip":
            order = f"skipped ({res})"
        else:
            _, got = cons.call("load", order_plan, "order", 2, res["ids"])
            good = not got["failed"] and not got["bad_layers"]
            if not good:
                status = 1
            how = "GPU-side wait on the worker's IPC event" if res["gpu_wait"] else "host sync on the save thread"
            order = f"{'ok' if good else 'FAILED (stale bytes copied)'} ({how})"
        text, below = table(rows, peak_d2h, peak_h2d)
        print()
        print(text)
        print()
        mode = ("GPU-side: the engine's copy streams wait on the worker's interprocess event" if gpu_wait
                else "host sync fallback: the engine did not open the worker's event (see engine log)")
        print(f"save ordering: {mode}")
        print(f"ordering check (rewrite behind a GPU sleep, save at once): {order}")
        print("GB/s = 1e9 bytes/s. Engine columns: bytes over the engine's own Save/Load durations "
              "(pegaflow_engine_*_duration_seconds); e2e: the connector's calls, Python and gRPC included.")
        print(f"target: engine save and load >= {TARGET} x peak for runs >= {human(TARGET_FROM)}: "
              f"{'met' if not below else 'NOT met'}")
        print(f"bytes: {'all verified' if status == 0 else 'MISMATCH'}")
        if below and args.strict and status == 0:
            status = 3
    except Exception as e:  # noqa: BLE001
        print(f"gpu-check: {e}", file=sys.stderr)
        if proc is not None:
            print(f"engine log tail:\n{tail(os.path.join(workdir, 'engine.log'))}", file=sys.stderr)
        status = status or 2
    finally:
        for w in workers:
            w.stop()
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if args.keep or status:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
