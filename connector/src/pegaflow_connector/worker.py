"""Worker-side core: registration and the save/load pipeline of one rank.

Saves of a step are handed to a background thread in `end_step` (vLLM's
`wait_for_save`), so the forward pass never waits for the engine; the
engine copies from the KV memory itself. Correctness rests on three rules:

- only blocks whose tokens are all computed are saved (scheduler side), and
  on CUDA the copy starts only after the producing stream passed an event
  recorded at the end of the forward;
- a request whose blocks are being saved keeps them: the scheduler delays
  freeing (`request_finished` -> True) and this rank reports the request
  done only when its saves finished, succeeded or not;
- a preempted request's blocks may be reused by the very next forward, so
  `start_step` waits for that request's in-flight saves first.

Loads run on a second thread and are reported through `get_finished`;
blocks that did not load are reported through `load_errors` in the same
step as their request, for vLLM to recompute.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Iterable
from typing import Any

from .compat import LOGGER_NAME
from . import rendezvous
from ._proto import engine_pb2 as pb
from .client import CallCancelled, CallHandle, EngineClient, EngineError, EngineUnavailable
from .config import ConnectorConfig
from .layout import LayoutError, ModelLayout, detect, tensor_info
from .metadata import LoadSpec, PegaConnectorMetadata, PegaHandshake, SaveSpec
from .metrics import Metrics
from .ready import FailureReporter
from .registration import StagingBuffer, describe_memory

log = logging.getLogger(LOGGER_NAME)

# Whether the engine's Load can wait on the rank's CUDA event itself, as
# Save does (LoadRequest.wait_event, like SaveRequest.wait_event). Without
# it (stubs of an older API), or when the engine did not open the rank's
# event, loads after async-scheduled steps are ordered by a host sync on
# the load thread.
LOAD_WAIT_EVENT = "wait_event" in pb.LoadRequest.DESCRIPTOR.fields_by_name


def _unique_refs(ids: list[int], hashes: list[bytes]) -> tuple[list[int], list[bytes]]:
    """Drops repeated hashes and block ids (first wins): the engine refuses a
    call that names either twice, and one step may batch several requests'
    saves (identical prompts without prefix caching share hashes)."""
    seen_ids: set[int] = set()
    seen_hashes: set[bytes] = set()
    out_ids: list[int] = []
    out_hashes: list[bytes] = []
    for b, h in zip(ids, hashes):
        if b in seen_ids or h in seen_hashes:
            continue
        seen_ids.add(b)
        seen_hashes.add(h)
        out_ids.append(b)
        out_hashes.append(h)
    return out_ids, out_hashes


@dataclasses.dataclass
class _SaveJob:
    specs: list[SaveSpec]
    event: Any = None  # CUDA event the copies must wait for
    # The event is the rank's registered interprocess event: the engine can
    # wait for it on the GPU (if the engine that gets the Save opened it).
    ipc: bool = False
    seq: int = 0  # order of end_step calls (see WorkerCore._cancel_upto)


class WorkerCore:
    """One TP rank's connector state. Thread-safe where vLLM needs it."""

    def __init__(self, cfg: ConnectorConfig, client: EngineClient, *, rank: int, tp_size: int,
                 instance_id: str, namespace: pb.Namespace, metrics: Metrics | None = None,
                 layers: frozenset[str] | None = None):
        self.cfg = cfg
        # The stored KV cache group's layers (groups.py); None: all of them.
        self._layers = layers
        self.client = client
        self.metrics = metrics or client.metrics
        self.rank = rank
        self.tp_size = tp_size
        self.instance_id = instance_id
        self._ns_template = namespace
        self.layout: ModelLayout | None = None
        self.namespace: pb.Namespace | None = None
        self.namespace_id = ""
        self._reg_req: pb.RegisterRequest | None = None
        self._reg_gen = -1
        self._reg_lock = threading.Lock()
        self._bases: list[int] = []
        self._staging: StagingBuffer | None = None
        self._failure_reporter = FailureReporter(cfg.kv_ready_allow)
        self._keep: list[Any] = []
        self._saves_enabled = True
        self._lease_owner = True
        self._eng_instance = instance_id
        self._eng_rank = rank
        self.bytes_per_block = 0  # this rank's, from the engine's RegisterResponse
        self.mode = "unregistered"  # "shm", "staging" or "cuda" once registered
        # CUDA: the interprocess event re-recorded after each step's forward
        # and the client generation whose engine opened it (-1: none did).
        self._ipc_event: Any = None
        self._event_gen = -1

        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._pending: collections.Counter[str] = collections.Counter()
        self._delayed: set[str] = set()
        self._finished_waiting: set[str] = set()
        self._done_sending: set[str] = set()
        self._loaded: dict[str, set[int]] = {}
        self._loads_inflight = 0
        self._errors: set[int] = set()
        self._last_meta: PegaConnectorMetadata | None = None
        self._save_q: queue.Queue[_SaveJob | None] = queue.Queue()
        # Preempted requests whose saves were given up (the preemption wait
        # timed out): their specs in jobs up to this seq are dropped and their
        # Save RPCs in flight cancelled, so the engine seals none of those
        # hashes (the blocks may hold another request's KV by then).
        self._job_seq = 0
        self._cancel_upto: dict[str, int] = {}
        self._save_handles: dict[str, set[CallHandle]] = {}
        self._load_q: queue.Queue[tuple[LoadSpec, Any] | None] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._closed = False

    # ------------------------------------------------------------ register

    def register_kv_caches(self, caches: dict[str, Any], num_blocks: int | None = None,
                           block_size: int | None = None) -> None:
        """Detects the layout and registers this rank's memory (now if
        connected, and again after every reconnection). Raises LayoutError
        when the caches cannot be described; the adapter then disables the
        connector instead of failing vLLM."""
        if self._layers is not None:
            # A hybrid model: only the stored group's layers are registered
            # (their block ids are that group's, scheduler side).
            caches = {name: t for name, t in caches.items() if name in self._layers}
            if not caches:
                raise LayoutError("hybrid model: no KV cache group PegaFlow can store (see the "
                                  "scheduler's log)")
        infos = [(name, tensor_info(t)) for name, t in caches.items()]
        layout = detect(infos, num_blocks, block_size or self._ns_template.block_size)
        self.layout = layout
        self._keep = list(caches.values())
        ns = pb.Namespace()
        ns.CopyFrom(self._ns_template)
        ns.dtype = layout.layers[0].dtype
        ns.kv_layout = layout.label
        ns.num_layers = len(layout.layers)
        ns.num_kv_heads = layout.layers[0].num_kv_heads
        ns.head_size = layout.layers[0].head_size
        if layout.is_mla:
            # MLA's latent cache is identical on every TP rank: the namespace
            # holds one copy. Rank 0 saves it; every rank loads it, each as
            # rank 0 of its own engine instance.
            ns.tp_size = 1
            self._eng_rank = 0
            self._saves_enabled = self.rank == 0
            self._lease_owner = self.rank == 0
            if self.rank != 0:
                self._eng_instance = f"{self.instance_id}-r{self.rank}"
        self.namespace = ns

        req = pb.RegisterRequest(instance_id=self._eng_instance, rank=self._eng_rank,
                                 namespace=ns, num_blocks=layout.num_blocks)
        self._bases = [info.ptr for _, info in infos]
        reg = describe_memory(req, infos, layout, staging_blocks=self.cfg.staging_blocks,
                              staging_dir=self.cfg.staging_dir, rank=self.rank)
        self.mode, self._staging, self._ipc_event = reg.mode, reg.staging, reg.ipc_event
        self._reg_req = req
        # Last, so that a failure before leaves nothing running (abandon()
        # undoes these two).
        self._start_threads()
        self.client.add_on_connect(self._register)

    def abandon(self) -> None:
        """Undoes a registration that failed part-way (best effort, never
        raises): no more registrations, threads stopped, engine state and
        staging released. The adapter then runs a DisabledWorker."""
        self.client.remove_on_connect(self._register)
        self._reg_req = None
        self._closed = True
        for q in (self._save_q, self._load_q):
            q.put(None)
        try:
            if self.registered():
                self.client.unregister(self._eng_instance, self._eng_rank, 2.0)
        except Exception:  # noqa: BLE001 - best effort
            pass
        try:
            if self._staging is not None:
                self._staging.close()
        except Exception:  # noqa: BLE001 - best effort
            pass
        self._staging = None

    def _register(self, client: EngineClient) -> None:
        req = self._reg_req
        if req is None:
            return
        gen = client.generation
        try:
            resp = client.register(req, self.cfg.rpc_timeout_ms / 1000)
        except EngineUnavailable:
            return
        except EngineError as e:
            import grpc

            if e.code == grpc.StatusCode.FAILED_PRECONDITION:
                self.metrics.inc("namespace_rejected")
                log.error("pegaflow: ENGINE REJECTED REGISTRATION of rank %d: %s. This instance "
                          "shares a namespace with instances whose block hashes or layout differ "
                          "(check PYTHONHASHSEED, hash algorithm, block size); saves and loads "
                          "are disabled", self.rank, e.details)
            elif e.code == grpc.StatusCode.ALREADY_EXISTS:
                self.metrics.inc("instance_id_conflicts")
                log.error("pegaflow: ENGINE REFUSED REGISTRATION of rank %d: instance id %r is "
                          "already registered by another live vLLM process (%s). Give every "
                          "vLLM instance its own instance_id (DP ranks get -dp<rank> "
                          "appended automatically); saves and loads of this rank are disabled "
                          "until it registers", self.rank, self._eng_instance, e.details)
            else:
                self.metrics.inc("register_failures")
                log.error("pegaflow: registration of rank %d failed: %s", self.rank, e)
            return
        except Exception as e:  # noqa: BLE001 - unregistered: saves drop, loads fail
            self.metrics.inc("register_failures")
            log.exception("pegaflow: registration of rank %d failed unexpectedly (saves are "
                          "dropped and loads recomputed until the next reconnection): %s",
                          self.rank, e)
            return
        with self._reg_lock:
            self.bytes_per_block = int(resp.bytes_per_block)
            self._reg_gen = gen
            self._event_gen = gen if resp.cuda_event and self._ipc_event is not None else -1
            self.namespace_id = resp.namespace_id
        self.metrics.inc("registrations")
        log.info("pegaflow: rank %d registered (%s, %d blocks, %d bytes/block, namespace %s)",
                 self.rank, self.mode, req.num_blocks, resp.bytes_per_block, resp.namespace_id)
        if self.rank == 0:
            assert self.namespace is not None
            rendezvous.publish_namespace(self.instance_id, self.namespace)

    def registered(self) -> bool:
        return self._reg_gen == self.client.generation and self.client.connected

    def handshake(self) -> PegaHandshake | None:
        if self.namespace is None:
            return None
        return rendezvous.handshake(self.namespace, self.namespace_id, self.rank)

    # ------------------------------------------------------------ threads

    def _start_threads(self) -> None:
        if self._threads:
            return
        for target, name in ((self._save_loop, "pegaflow-save"), (self._load_loop, "pegaflow-load")):
            t = threading.Thread(target=target, name=f"{name}-r{self.rank}", daemon=True)
            t.start()
            self._threads.append(t)

    # ------------------------------------------------------------ per step

    def start_step(self, meta: PegaConnectorMetadata | None) -> None:
        """Before the forward pass: protect preempted blocks, start loads.
        Idempotent per metadata object (vLLM may call both
        handle_preemptions and start_load_kv)."""
        # Identity, not id(): a freed metadata's id can be reused by the
        # next step's, which would then be skipped.
        if meta is None or meta is self._last_meta:
            return
        self._last_meta = meta
        with self._lock:
            self._delayed |= meta.delayed_free
        if meta.preempted:
            self._wait_saves(meta.preempted, self.cfg.preemption_wait_ms / 1000)
        # Async scheduling: this step's loads may target blocks the previous
        # step's forward, still running on the GPU, writes (a block freed and
        # reused). The event recorded here orders the load after that work:
        # on the rank's interprocess event the engine's copy streams wait for
        # it on the GPU (LoadRequest.wait_event); else the load thread syncs
        # it on the host.
        event = (_record_cuda_event(self._ipc_event if LOAD_WAIT_EVENT else None)
                 if self.mode == "cuda" and meta.loads else None)
        for spec in meta.loads:
            with self._lock:
                self._loads_inflight += 1
            self._load_q.put((spec, event))

    def end_step(self, meta: PegaConnectorMetadata | None) -> None:
        """After the forward pass (vLLM's wait_for_save): queue this step's
        saves and return at once."""
        if meta is None or not meta.saves or not self._saves_enabled:
            return
        event = None
        if self.mode == "cuda":
            event = _record_cuda_event(self._ipc_event)
        with self._lock:
            for rid in {s.req_id for s in meta.saves}:
                self._pending[rid] += 1
            self._job_seq += 1
            seq = self._job_seq
        self._save_q.put(_SaveJob(list(meta.saves), event, event is not None
                                  and event is self._ipc_event, seq))

    def get_finished(self, finished_req_ids: Iterable[str]) -> tuple[set[str] | None, set[str] | None]:
        with self._lock:
            for rid in finished_req_ids:
                if rid in self._delayed:
                    self._delayed.discard(rid)
                    if self._pending.get(rid, 0) == 0:
                        self._done_sending.add(rid)
                    else:
                        self._finished_waiting.add(rid)
            sending, self._done_sending = self._done_sending, set()
            recving = set(self._loaded)
            for failed in self._loaded.values():
                self._errors |= failed
            self._loaded.clear()
        return (sending or None), (recving or None)

    def load_errors(self) -> set[int]:
        with self._lock:
            errors, self._errors = self._errors, set()
        return errors

    def wait_preempted(self, req_ids: Iterable[str]) -> bool:
        """Blocks until the in-flight saves of these requests are done
        (bounded by preemption_wait_ms)."""
        return self._wait_saves(req_ids, self.cfg.preemption_wait_ms / 1000)

    def _wait_saves(self, req_ids: Iterable[str], timeout_s: float) -> bool:
        ids = set(req_ids)
        deadline = time.monotonic() + timeout_s
        t0 = time.perf_counter()
        with self._cond:
            if any(self._pending.get(r, 0) for r in ids):
                self.metrics.inc("preemption_waits")
            while any(self._pending.get(r, 0) for r in ids):
                left = deadline - time.monotonic()
                if left <= 0:
                    self.metrics.inc("preemption_wait_timeouts")
                    self._cancel_saves_locked({r for r in ids if self._pending.get(r, 0)})
                    log.error("pegaflow: preempted requests %s still saving after %.1fs; their "
                              "saves are cancelled (the engine seals none of their blocks, "
                              "which may be overwritten now)", sorted(ids), timeout_s)
                    return False
                self._cond.wait(left)
        self.metrics.inc("preemption_wait_seconds", time.perf_counter() - t0)
        return True

    def _cancel_saves_locked(self, req_ids: set[str]) -> None:
        """Gives up these requests' saves: queued ones are dropped, those in
        flight cancelled (the engine fails their blocks instead of sealing).
        Another request's blocks in the same Save RPC fail with it (a later
        miss, never wrong KV). Called with self._lock held."""
        for rid in req_ids:
            self._cancel_upto[rid] = self._job_seq
            self.metrics.inc("preempted_saves_cancelled")
            for h in self._save_handles.get(rid, ()):
                h.cancel()

    def flush(self, timeout_s: float) -> bool:
        """Waits until every queued save and load finished."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while sum(self._pending.values()) or self._loads_inflight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    # ------------------------------------------------------------ saves

    def _save_loop(self) -> None:
        while True:
            job = self._save_q.get()
            if job is None:
                return
            try:
                self._run_save(job)
            except Exception as e:  # noqa: BLE001 - never kill the thread
                log.error("pegaflow: save failed unexpectedly: %s", e)
            finally:
                with self._cond:
                    for rid in {s.req_id for s in job.specs}:
                        self._pending[rid] -= 1
                        if self._pending[rid] <= 0:
                            del self._pending[rid]
                            self._cancel_upto.pop(rid, None)
                            if rid in self._finished_waiting:
                                self._finished_waiting.discard(rid)
                                self._done_sending.add(rid)
                    self._cond.notify_all()

    def _run_save(self, job: _SaveJob) -> None:
        # Ordering with this step's KV writes. Preferred: the engine's copy
        # streams wait for the recorded interprocess event on the GPU (no
        # host blocks). Fallback (no IPC event, or this engine did not open
        # it): block this save thread, never vLLM's loop, until the forward
        # finished; the copies then start up to one forward later.
        gpu_wait = job.ipc and self._event_gen == self.client.generation
        if job.event is not None and not gpu_wait:
            job.event.synchronize()
            self.metrics.inc("save_host_syncs")
        groups: dict[str, list[SaveSpec]] = {}
        with self._lock:
            cancelled = {r for r, upto in self._cancel_upto.items() if job.seq <= upto}
        for s in job.specs:
            if s.req_id in cancelled:
                self.metrics.inc("saves_cancelled_blocks", len(s.block_ids))
                continue
            groups.setdefault(s.transfer_id, []).append(s)
        for tid, specs in groups.items():
            ids, hashes = _unique_refs([b for s in specs for b in s.block_ids],
                                       [h for s in specs for h in s.hashes])
            last = any(s.transfer_last for s in specs)
            url = next((s.ready_url for s in specs if s.ready_url), "")
            token = next((s.ready_token for s in specs if s.ready_token), "")
            if not ids and not last:
                continue
            rids = {s.req_id for s in specs}
            handle = CallHandle()
            with self._lock:
                for rid in rids:
                    self._save_handles.setdefault(rid, set()).add(handle)
                if any(job.seq <= self._cancel_upto.get(rid, 0) for rid in rids):
                    handle.cancel()  # given up since the job started
            try:
                self._save_blocks(ids, hashes, tid, last, url, token, gpu_wait, handle)
            finally:
                with self._lock:
                    for rid in rids:
                        hs = self._save_handles.get(rid)
                        if hs is not None:
                            hs.discard(handle)
                            if not hs:
                                del self._save_handles[rid]

    def _report_failed(self, url: str, tid: str, token: str, message: str) -> None:
        # The engine cannot settle the transfer any more; tell the router so
        # D recomputes now instead of after the whole KV-ready timeout.
        if self._failure_reporter.report(url, tid, token, message):
            self.metrics.inc("transfers_reported_failed")

    def _save_blocks(self, ids: list[int], hashes: list[bytes], tid: str, last: bool, url: str,
                     token: str, wait_event: bool = False, handle: CallHandle | None = None) -> None:
        if not self.registered():
            self.metrics.inc("saves_dropped", max(len(ids), 1))
            self.client.warn_limited("pegaflow: engine unavailable, dropping saves (rank %d)",
                                     self.rank)
            self._report_failed(url, tid, token, "engine unavailable at P: saves dropped")
            return
        chunk = self._staging.slots // 2 if self._staging else max(len(ids), 1)
        starts = list(range(0, len(ids), chunk)) or [0]
        for i, lo in enumerate(starts):
            c_ids, c_hashes = ids[lo:lo + chunk], hashes[lo:lo + chunk]
            final = i == len(starts) - 1
            if self._staging is not None:
                for slot, bid in enumerate(c_ids):
                    self._staging.copy_in(self._bases, bid, slot)
                refs = [pb.BlockRef(block_id=slot, hash=h) for slot, h in enumerate(c_hashes)]
            else:
                refs = [pb.BlockRef(block_id=b, hash=h) for b, h in zip(c_ids, c_hashes)]
            req = pb.SaveRequest(instance_id=self._eng_instance, rank=self._eng_rank, blocks=refs,
                                 transfer_id=tid, transfer_last=last and final, ready_url=url,
                                 ready_token=token, wait_event=wait_event)
            t0 = time.perf_counter()
            try:
                resp = self.client.save(req, self.cfg.rpc_timeout_ms / 1000, handle)
            except CallCancelled:
                self.metrics.inc("saves_cancelled_blocks", len(ids) - lo)
                self._report_failed(url, tid, token, "P's save was cancelled (its request was "
                                    "preempted and the save did not finish in time)")
                return
            except EngineUnavailable as e:
                self.metrics.inc("saves_dropped", len(ids) - lo or 1)
                self.client.warn_limited("pegaflow: engine went away during a save, %d blocks "
                                         "dropped (rank %d): %s", len(ids) - lo, self.rank, e)
                self._report_failed(url, tid, token, f"engine went away during P's save: {e}")
                return
            except EngineError as e:
                self.metrics.inc("saves_dropped", len(c_ids) or 1)
                log.warning("pegaflow: save of %d blocks failed (rank %d): %s", len(c_ids),
                            self.rank, e)
                continue
            self.metrics.inc("save_seconds", time.perf_counter() - t0)
            self.metrics.inc("save_calls")
            self.metrics.inc("blocks_saved", resp.saved)
            self.metrics.inc("bytes_saved", resp.saved * self.bytes_per_block)
            self.metrics.inc("blocks_save_skipped", resp.skipped)
            if resp.failed:
                self.metrics.inc("blocks_save_failed", resp.failed)
                self.client.warn_limited("pegaflow: engine could not store %d blocks (pool full "
                                         "of pinned blocks?)", resp.failed)

    # ------------------------------------------------------------ loads

    def _load_loop(self) -> None:
        while True:
            item = self._load_q.get()
            if item is None:
                return
            spec, event = item
            failed: set[int] = set(spec.block_ids)
            try:
                gpu_wait = (event is not None and event is self._ipc_event
                            and self._event_gen == self.client.generation)
                if event is not None and not gpu_wait:
                    event.synchronize()  # this thread waits, never vLLM's loop
                    self.metrics.inc("load_host_syncs")
                failed = self._run_load(spec, wait_event=gpu_wait)
            except Exception as e:  # noqa: BLE001
                log.error("pegaflow: load failed unexpectedly: %s", e)
            with self._cond:
                self._loaded[spec.req_id] = failed
                self._loads_inflight -= 1
                self._cond.notify_all()

    def _run_load(self, spec: LoadSpec, wait_event: bool = False) -> set[int]:
        """Loads a request's blocks; returns the ids that did not load.
        wait_event: the engine's copies wait for the rank's interprocess
        event (recorded before the load was queued) on the GPU."""
        all_ids = set(spec.block_ids)
        if not self.registered():
            self.metrics.inc("loads_failed")
            self.metrics.inc("blocks_load_failed", len(all_ids))
            self.client.warn_limited("pegaflow: engine unavailable, %d blocks will be recomputed",
                                     len(all_ids))
            return all_ids
        lease = spec.lease_id if self._lease_owner else ""
        tid = spec.transfer_id if self._lease_owner else ""
        chunk = self._staging.slots // 2 if self._staging else max(len(spec.block_ids), 1)
        failed: set[int] = set()
        n = len(spec.block_ids)
        for lo in range(0, n, chunk):
            ids, hashes = spec.block_ids[lo:lo + chunk], spec.hashes[lo:lo + chunk]
            final = lo + chunk >= n
            if self._staging is not None:
                base = self._staging.slots // 2
                refs = [pb.BlockRef(block_id=base + i, hash=h) for i, h in enumerate(hashes)]
            else:
                refs = [pb.BlockRef(block_id=b, hash=h) for b, h in zip(ids, hashes)]
            req = pb.LoadRequest(instance_id=self._eng_instance, rank=self._eng_rank, blocks=refs,
                                 lease_id=lease if final else "", transfer_id=tid if final else "",
                                 wait_event=wait_event)
            t0 = time.perf_counter()
            try:
                resp = self.client.load(req, self.cfg.rpc_timeout_ms / 1000)
            except EngineError as e:
                self.metrics.inc("loads_failed")
                self.client.warn_limited("pegaflow: load failed (rank %d), recomputing: %s",
                                         self.rank, e)
                failed.update(spec.block_ids[lo:])
                break
            self.metrics.inc("load_seconds", time.perf_counter() - t0)
            self.metrics.inc("load_calls")
            ok = pb.BlockStatus.BLOCK_STATUS_OK
            for i, (bid, status) in enumerate(zip(ids, resp.status)):
                if status != ok:
                    failed.add(bid)
                elif self._staging is not None:
                    self._staging.copy_out(self._bases, self._staging.slots // 2 + i, bid)
            if len(resp.status) < len(ids):
                failed.update(ids[len(resp.status):])
        self.metrics.inc("blocks_loaded", n - len(failed))
        self.metrics.inc("bytes_loaded", (n - len(failed)) * self.bytes_per_block)
        if failed:
            self.metrics.inc("blocks_load_failed", len(failed))
        return failed

    # ------------------------------------------------------------ shutdown

    def shutdown(self, timeout_s: float = 5.0) -> None:
        if self._closed:
            return
        self._closed = True
        self.flush(timeout_s)
        self._save_q.put(None)
        self._load_q.put(None)
        for t in self._threads:
            t.join(timeout=1)
        if self._reg_req is not None and self.registered():
            try:
                self.client.unregister(self._eng_instance, self._eng_rank, 2.0)
            except EngineError:
                pass
        if self._staging is not None:
            self._staging.close()


def _record_cuda_event(ipc_event: Any = None) -> Any:
    """Records the step's end on the current stream: on the rank's
    interprocess event when it has one (re-recording is cheap and an engine
    wait covers the latest record, which is never earlier than this step's),
    else on a fresh event."""
    import torch

    ev = ipc_event if ipc_event is not None else torch.cuda.Event()
    ev.record(torch.cuda.current_stream())
    return ev
