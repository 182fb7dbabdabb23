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

Who owns what: the save bookkeeping (which requests are saving, when a
delayed free is reported, which saves a preemption gave up) is
`SaveTracker` (save_tracker.py); the Save and Load RPCs themselves are
`BlockIO` (blockio.py); the layout is detected by layout.py and described
to the engine by registration.py. This module wires them to vLLM's calls
and owns the rank's registration and its two threads.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Iterable
from typing import Any

from . import rendezvous
from ._proto import engine_pb2 as pb
from .blockio import BlockIO, RankTarget, Transfer, unique_refs
from .client import CallHandle, EngineClient, EngineError, EngineUnavailable
from .compat import LOGGER_NAME, PER_REQUEST_LOAD_FAILURES
from .config import ConnectorConfig
from .groups import GroupPlan
from .layout import LayerHint, LayoutError, ModelLayout, detect, expand, tensor_info
from .metadata import LoadSpec, PegaConnectorMetadata, PegaHandshake, SaveSpec
from .metrics import Metrics
from .ready import FailureReporter
from .registration import StagingBuffer, describe_memory
from .save_tracker import SaveTracker

log = logging.getLogger(LOGGER_NAME)

# Whether the engine's Load can wait on the rank's CUDA event itself, as
# Save does (LoadRequest.wait_event, like SaveRequest.wait_event). Without
# it (stubs of an older API), or when the engine did not open the rank's
# event, loads after async-scheduled steps are ordered by a host sync on
# the load thread.
LOAD_WAIT_EVENT = "wait_event" in pb.LoadRequest.DESCRIPTOR.fields_by_name


@dataclasses.dataclass
class _SaveJob:
    specs: list[SaveSpec]
    event: Any = None  # CUDA event the copies must wait for
    # The event is the rank's registered interprocess event: the engine can
    # wait for it on the GPU (if the engine that gets the Save opened it).
    ipc: bool = False
    seq: int = 0  # SaveTracker.queue's (see SaveTracker.given_up)


class WorkerCore:
    """One TP rank's connector state. Thread-safe where vLLM needs it."""

    def __init__(self, cfg: ConnectorConfig, client: EngineClient, *, rank: int, tp_size: int,
                 instance_id: str, namespace: pb.Namespace, metrics: Metrics | None = None,
                 plan: GroupPlan | None = None):
        self.cfg = cfg
        # The stored KV cache groups (groups.py); one group: every layer.
        self._plan = plan = plan or GroupPlan()
        # vLLM 0.32 refuses block-id load errors for several groups (ids are
        # per group): a failed load is then reported per request.
        self._per_request = plan.hybrid and PER_REQUEST_LOAD_FAILURES
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

        self._saves = SaveTracker(self.metrics)
        self._io = BlockIO(client, self.metrics, cfg.rpc_timeout_ms / 1000, self._report_failed)
        # Loads: the lock guards these three (the load thread writes them).
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._loaded: dict[str, set[int]] = {}
        self._loads_inflight = 0
        self._errors: set[int] = set()
        self._failed_reqs: set[str] = set()
        self._last_meta: PegaConnectorMetadata | None = None
        self._save_q: queue.Queue[_SaveJob | None] = queue.Queue()
        self._load_q: queue.Queue[tuple[LoadSpec, Any] | None] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._closed = False

    # ------------------------------------------------------------ register

    def register_kv_caches(self, caches: dict[str, Any], num_blocks: int | None = None,
                           block_size: int | None = None,
                           backends: dict[str, tuple[str, int | None]] | None = None) -> None:
        """Detects the layout and registers this rank's memory (now if
        connected, and again after every reconnection). Raises LayoutError
        when the caches cannot be described; the adapter then disables the
        connector instead of failing vLLM. `backends`: each layer's
        attention backend and block axis, from vLLM (compat)."""
        plan = self._plan
        if plan.hybrid:
            # Only the stored groups' layers are registered (their block
            # ids are per group, scheduler side).
            stored = plan.layers or frozenset()
            caches = {name: t for name, t in caches.items() if name in stored}
            if not caches:
                raise LayoutError("hybrid model: no KV cache group PegaFlow can store (see the "
                                  "scheduler's log)")
        hints: dict[str, LayerHint] = {}
        for name in caches:
            backend, axis = (backends or {}).get(name, ("", None))
            if plan.hybrid or backend:
                g = plan.group_of(name)
                hints[name] = LayerHint(plan.kind_of(g), backend, axis, g)
        entries = [e for name, t in caches.items() for e in expand(name, t)]
        infos = [(name, tensor_info(t)) for name, t in entries]
        layout = detect(infos, num_blocks, block_size or self._ns_template.block_size, hints)
        self.layout = layout
        self._keep = list(caches.values())
        ns = pb.Namespace()
        ns.CopyFrom(self._ns_template)
        ns.dtype = layout.dtype
        ns.kv_layout = layout.label
        ns.num_layers = len(layout.layers)
        ns.num_kv_heads = layout.layers[0].num_kv_heads
        ns.head_size = layout.layers[0].head_size
        if layout.is_mla:
            # MLA's latent cache (and DeepSeek-V3.2's indexer cache beside it)
            # is identical on every TP rank: the namespace holds one copy,
            # only when every stored layer is MLA. Rank 0 saves it; every rank loads it, each as
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
        self._saves.delay_free(meta.delayed_free)
        # Fenced requests (their saves read blocks vLLM freed early and
        # hands out again now) are waited for like preempted ones.
        waits = meta.preempted | getattr(meta, "fence", set())
        if waits:
            self._saves.wait(waits, self.cfg.preemption_wait_ms / 1000)
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
        seq = self._saves.queue(s.req_id for s in meta.saves)
        self._save_q.put(_SaveJob(list(meta.saves), event, event is not None
                                  and event is self._ipc_event, seq))

    def get_finished(self, finished_req_ids: Iterable[str]) -> tuple[set[str] | None, set[str] | None]:
        sending = self._saves.finished(finished_req_ids)
        with self._lock:
            recving = set(self._loaded)
            for rid, failed in self._loaded.items():
                if not failed:
                    continue
                if self._per_request:
                    self._failed_reqs.add(rid)
                else:
                    self._errors |= failed
            self._loaded.clear()
        return (sending or None), (recving or None)

    def get_transfer_results(self, finished_req_ids: Iterable[str]
                             ) -> tuple[set[str], set[str], set[str]]:
        """(finished sending, finished receiving, failed receiving): a
        hybrid model's failed loads by request (vLLM recomputes the whole
        request); each failed request is also in finished receiving."""
        sending, recving = self.get_finished(finished_req_ids)
        with self._lock:
            failed, self._failed_reqs = self._failed_reqs, set()
        return set(sending or ()), set(recving or ()), failed

    def load_errors(self) -> set[int]:
        with self._lock:
            errors, self._errors = self._errors, set()
        return errors

    def wait_preempted(self, req_ids: Iterable[str]) -> bool:
        """Blocks until the in-flight saves of these requests are done
        (bounded by preemption_wait_ms)."""
        return self._saves.wait(req_ids, self.cfg.preemption_wait_ms / 1000)

    def flush(self, timeout_s: float) -> bool:
        """Waits until every queued save and load finished."""
        deadline = time.monotonic() + timeout_s
        if not self._saves.wait_idle(deadline):
            return False
        with self._cond:
            return self._cond.wait_for(lambda: not self._loads_inflight,
                                       max(deadline - time.monotonic(), 0))

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
                self._saves.job_done(s.req_id for s in job.specs)

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
        # Requests a timed-out preemption wait gave up: none of their blocks
        # is sealed (they may hold another request's KV by now).
        cancelled = self._saves.given_up(job.seq)
        for s in job.specs:
            if s.req_id in cancelled:
                self.metrics.inc("saves_cancelled_blocks", len(s.block_ids))
                continue
            groups.setdefault(s.transfer_id, []).append(s)
        for tid, specs in groups.items():
            ids, hashes, grps = unique_refs([b for s in specs for b in s.block_ids],
                                            [h for s in specs for h in s.hashes],
                                            [s.group(i) for s in specs
                                             for i in range(len(s.block_ids))])
            last = any(s.transfer_last for s in specs)
            url = next((s.ready_url for s in specs if s.ready_url), "")
            token = next((s.ready_token for s in specs if s.ready_token), "")
            if not ids and not last:
                continue
            handle = CallHandle()
            with self._saves.track(handle, (s.req_id for s in specs), job.seq):
                self._save_blocks(ids, hashes, Transfer(tid, last, url, token), gpu_wait, handle,
                                  grps)

    def _report_failed(self, url: str, tid: str, token: str, message: str) -> None:
        # The engine cannot settle the transfer any more; tell the router so
        # D recomputes now instead of after the whole KV-ready timeout.
        if self._failure_reporter.report(url, tid, token, message):
            self.metrics.inc("transfers_reported_failed")

    def _target(self) -> RankTarget:
        return RankTarget(self._eng_instance, self._eng_rank, self.rank, self._staging,
                          self._bases, self.bytes_per_block)

    def _save_blocks(self, ids: list[int], hashes: list[bytes], tr: Transfer,
                     wait_event: bool = False, handle: CallHandle | None = None,
                     groups: list[int] | None = None) -> None:
        if not self.registered():
            self.metrics.inc("saves_dropped", max(len(ids), 1))
            self.client.warn_limited("pegaflow: engine unavailable, dropping saves (rank %d)",
                                     self.rank)
            self._report_failed(tr.ready_url, tr.transfer_id, tr.ready_token,
                                "engine unavailable at P: saves dropped")
            return
        self._io.save(self._target(), ids, hashes, tr, wait_event, handle, groups)

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
        return self._io.load(self._target(), spec, self._lease_owner, wait_event)

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
