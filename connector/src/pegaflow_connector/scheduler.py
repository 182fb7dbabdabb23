"""Scheduler-side core: what to load, what to save, when blocks may be freed.

vLLM-agnostic: it reads only plain attributes of vLLM's Request and
SchedulerOutput objects (listed in the README) and never imports vLLM;
attributes that differ between vLLM releases are read through compat.py.
Every method is called on vLLM's scheduler thread and must be cheap and
never raise; engine trouble degrades to "no hit" / "nothing saved".
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from .compat import LOGGER_NAME
from ._proto import engine_pb2 as pb
from .client import EngineClient, EngineError, EngineUnavailable
from .compat import (
    group_block_ids,
    hash_bytes,
    kv_transfer_params,
    num_prompt_tokens,
    num_publishable_block_hashes,
    preempted_req_ids,
    request_block_hashes,
    resumed_req_ids,
)
from .config import ConnectorConfig
from .metadata import LoadSpec, PegaConnectorMetadata, SaveSpec
from .metrics import Metrics
from .ready import FailureReporter
from .rendezvous import NamespacePoller, disabled_reason

log = logging.getLogger(LOGGER_NAME)

# kv_transfer_params keys (docs/design.md).
K_DO_REMOTE_DECODE = "do_remote_decode"
K_DO_REMOTE_PREFILL = "do_remote_prefill"
K_TRANSFER_ID = "pegaflow_transfer_id"
K_READY_URL = "pegaflow_ready_url"
K_READY_TOKEN = "pegaflow_ready_token"
K_NUM_BLOCKS = "pegaflow_num_blocks"
K_NAMESPACE = "pegaflow_namespace_id"
# P's engine's peer address (its --peer-advertise): D's engine fetches the
# transfer from there when P and D do not share an engine (docs/multi-host.md).
K_SOURCE_ENGINE = "pegaflow_source_engine"


@dataclasses.dataclass
class _Req:
    req_id: str
    request: Any
    # P side (do_remote_decode): saves are tagged with this transfer.
    transfer_id: str = ""
    ready_url: str = ""
    ready_token: str = ""
    prompt_blocks: int = 0
    transfer_last_sent: bool = False
    # D side (do_remote_prefill): the prefill's transfer to wait for.
    remote_transfer: str = ""
    remote_blocks: int | None = None
    remote_namespace: str = ""
    remote_source: str = ""  # P's engine when it is not ours (host:port)
    transfer_waited: bool = False
    transfer_loaded: bool = False
    # Query memo: the answer for (start block, usable blocks, session).
    memo_key: tuple[int, int, int] | None = None
    memo_hit: int = 0  # absolute number of blocks hit from block 0
    memo_lease: str = ""
    memo_time: float = 0.0
    pending: Future | None = None
    pending_key: tuple[int, int, int] | None = None
    pending_prefetch: bool = False  # started by on_new_request, from block 0
    last_num_computed: int = 0
    # Load handed to workers (at most one per request).
    load: LoadSpec | None = None
    loading: bool = False
    # Saves.
    block_ids: list[int] = dataclasses.field(default_factory=list)
    next_save: int = 0
    seen: bool = False
    saved_any: bool = False


class SchedulerCore:
    """State machine behind the scheduler-side connector methods."""

    def __init__(self, cfg: ConnectorConfig, client: EngineClient, *, block_size: int,
                 instance_id: str, load_enabled: bool, save_enabled: bool,
                 metrics: Metrics | None = None, group: int = 0, hits_usable: bool = True):
        self.cfg = cfg
        # The KV cache group whose blocks are saved and loaded, and whether
        # vLLM can use a hit on it alone (groups.py); with False every
        # request is answered 0 matched tokens.
        self.group = group
        self.hits_usable = hits_usable
        self.client = client
        self.bs = block_size
        self.instance_id = instance_id
        self.load_enabled = load_enabled
        self.save_enabled = save_enabled
        self.metrics = metrics or client.metrics
        self._reqs: dict[str, _Req] = {}
        self._to_load: list[_Req] = []
        self._delayed: set[str] = set()
        self._sending: set[str] = set()  # delayed frees not reported done yet
        # Abandoned transfers to fail once the request's saves are done (a
        # Release that overtook an in-flight tagged save would be undone by it).
        self._release_after_send: dict[str, str] = {}
        self._lock = threading.Lock()  # namespace state (set from other threads)
        self._ns: pb.Namespace | None = None
        self._ns_id: str | None = None
        self._ns_gen = -1
        self._ns_poller = NamespacePoller(instance_id)
        self._ns_rejected = False
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="pegaflow-sched")
        self._has_preempted_field: bool | None = None
        self.disabled = ""
        self._failure_reporter = FailureReporter(cfg.kv_ready_allow)
        # vLLM builds the scheduler after the workers registered: a rank
        # that failed has left its marker already (older vLLM: no handshake).
        if (reason := disabled_reason(instance_id)) is not None:
            self.disable(reason)
        client.add_on_connect(self._on_connect)

    def disable(self, reason: str) -> None:
        """A worker rank could not start: stop planning saves and loads
        (answer 0 matched tokens) for good; the workers' fallbacks settle
        whatever was already handed out. Idempotent."""
        if self.disabled:
            return
        self.disabled = reason
        self.metrics.inc("connector_disabled")
        log.error("pegaflow: CONNECTOR DISABLED for instance %s: a worker could not start (%s). "
                  "vLLM keeps serving without PegaFlow (no cache hits, nothing saved); fix the "
                  "cause in that worker's log and restart the instance.", self.instance_id, reason)

    def reset_cache(self) -> bool:
        """vLLM's reset_prefix_cache(reset_connector=True), typically after a
        weight update. One instance can neither empty the shared namespace
        (other instances use it) nor tell old KV from new (the namespace key
        holds the model name and revision, not the weights): serving it would
        hand out KV of the old weights, saving would mix new KV into it. So
        this instance stops loading and saving for good and answers False
        (the PegaFlow cache was not reset); a restart with a new
        `model_revision` or `namespace_extra` (e.g. `weights=<version>`)
        uses a fresh namespace."""
        if not self.disabled:
            self.disabled = "reset_cache: the KV cache was reset (weights updated?)"
            self.metrics.inc("cache_resets_refused")
            log.error("pegaflow: reset_cache requested: PegaFlow cannot invalidate a shared "
                      "namespace, so instance %s stops loading and saving (no stale KV is "
                      "served). Restart it with a new model_revision or namespace_extra (e.g. "
                      "weights=<version>) to use PegaFlow again.", self.instance_id)
        return False

    def has_pending_block_frees(self) -> bool:
        """Whether blocks of finished requests come back once their saves
        end (vLLM then waits for them instead of preempting)."""
        return bool(self._sending)

    # ------------------------------------------------------------ namespace

    def set_namespace(self, ns: pb.Namespace) -> None:
        """The namespace the workers registered in (from the handshake)."""
        with self._lock:
            if self._ns is not None and self._ns.SerializeToString(deterministic=True) == \
                    ns.SerializeToString(deterministic=True):
                return
            self._ns, self._ns_id, self._ns_gen = ns, None, -1
        if self.client.connected:
            self._pool.submit(self._open_namespace)

    def _on_connect(self, _client: EngineClient) -> None:
        self._open_namespace()

    def _open_namespace(self) -> None:
        with self._lock:
            ns = self._ns
        if ns is None:
            return
        gen = self.client.generation
        try:
            ns_id = self.client.open_namespace(ns, self.cfg.rpc_timeout_ms / 1000)
        except EngineUnavailable:
            return
        except EngineError as e:
            self._report_namespace_error(e)
            return
        with self._lock:
            if self._ns is ns:
                self._ns_id, self._ns_gen, self._ns_rejected = ns_id, gen, False
        log.info("pegaflow: scheduler uses namespace %s", ns_id)

    def _report_namespace_error(self, e: EngineError) -> None:
        import grpc

        if e.code == grpc.StatusCode.FAILED_PRECONDITION:
            self.metrics.inc("namespace_rejected")
            self._ns_rejected = True
            log.error("pegaflow: ENGINE REJECTED THIS INSTANCE'S NAMESPACE: %s. Block hashes "
                      "of this instance cannot match the others sharing the namespace (check "
                      "PYTHONHASHSEED, the hash algorithm and the block size on every P and D). "
                      "Cache lookups are disabled until this is fixed.", e.details)
        else:
            log.error("pegaflow: open namespace failed: %s", e)

    def namespace_id(self) -> str | None:
        """The namespace to query, or None while unknown (queries skipped)."""
        ns_id, gen = self._ns_id, self._ns_gen
        if ns_id is not None and gen == self.client.generation and self.client.connected:
            return ns_id
        if self._ns is None:
            # No handshake (older vLLM): rank 0's rendezvous file.
            ns = self._ns_poller.poll()
            if self._ns_poller.disabled:
                self.disable(self._ns_poller.disabled)
            if ns is not None:
                self.set_namespace(ns)
        return None

    # ------------------------------------------------------------ requests

    def _state(self, request: Any) -> _Req:
        rid = request.request_id
        st = self._reqs.get(rid)
        if st is None:
            st = _Req(rid, request)
            params = kv_transfer_params(request)
            tid = str(params.get(K_TRANSFER_ID) or "")
            if tid and params.get(K_DO_REMOTE_PREFILL):
                # Decode leg. The router may also echo do_remote_decode from
                # the prefill leg; do_remote_prefill decides.
                st.remote_transfer = tid
                n = params.get(K_NUM_BLOCKS)
                st.remote_blocks = int(n) if isinstance(n, (int, str)) and str(n).isdigit() else None
                st.remote_namespace = str(params.get(K_NAMESPACE) or "")
                src = params.get(K_SOURCE_ENGINE)
                st.remote_source = src if isinstance(src, str) else ""
            elif tid and params.get(K_DO_REMOTE_DECODE):
                if self.save_enabled:
                    st.transfer_id = tid
                    st.ready_url = str(params.get(K_READY_URL) or "")
                    st.ready_token = str(params.get(K_READY_TOKEN) or "")
                else:
                    self.client.warn_limited("pegaflow: prefill request %s arrived at a kv_consumer "
                                             "instance: nothing will be saved for the decode leg",
                                             rid)
            st.prompt_blocks = num_prompt_tokens(request) // self.bs
            self._reqs[rid] = st
        else:
            st.request = request
        return st

    def on_new_request(self, request: Any) -> None:
        """vLLM (0.22+) announces a request when it arrives: its query starts
        now, on the pool, so that the first get_num_new_matched_tokens
        usually finds the answer ready. Asked from block 0 (the local prefix
        hit is not known yet); a later ask whose local prefix ends within the
        hit takes it (see _accepts)."""
        if not self.cfg.async_query or not self.load_enabled or self.disabled \
                or not self.hits_usable:
            return
        st = self._state(request)
        if st.pending is not None or st.memo_key is not None:
            return
        hashes = request_block_hashes(request)
        usable = min(len(hashes), max(request.num_tokens - 1, 0) // self.bs)
        ns_id = self.namespace_id() if usable > 0 else None
        if ns_id is not None:
            self._submit_query(st, ns_id, hashes, (0, usable, self.client.generation))
            st.pending_prefetch = True

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        """Never waits for the engine (async_query, the default): a question
        not answered yet starts its query on the pool and answers None, which
        vLLM takes as "ask again next step"; the result is memoised with its
        lease. async_query=false answers from a synchronous RPC (up to
        query_timeout_ms, or query_wait_ms for a P/D wait) on this thread."""
        st = self._state(request)
        st.last_num_computed = num_computed_tokens
        if st.pending is not None and not st.pending.done():
            return None, False  # the cheapest answer: vLLM polls while the query runs
        if not self.load_enabled or self.disabled or not self.hits_usable:
            return 0, False
        hashes = request_block_hashes(request)
        # vLLM recomputes the last token itself: never claim it.
        usable = min(len(hashes), max(request.num_tokens - 1, 0) // self.bs)
        start = num_computed_tokens // self.bs
        if usable <= start:
            self._forget_query(st)
            return 0, False
        ns_id = self.namespace_id()
        if ns_id is None:
            self.metrics.inc("queries_skipped")
            return 0, False
        key = (start, usable, self.client.generation)

        if st.pending is not None:  # done (checked above)
            fut, pkey, prefetch = st.pending, st.pending_key, st.pending_prefetch
            st.pending, st.pending_prefetch = None, False
            result = _future_result(fut)
            if pkey is not None and _accepts(pkey, key, result, prefetch):
                self._take_result(st, key, result, pkey[0])
            elif result is not None and result[1]:
                self._release(lease_id=result[1])
        if st.memo_key != key or time.monotonic() - st.memo_time > self.cfg.lease_ttl_ms / 2000:
            self._drop_lease(st)
            if self.cfg.async_query:
                self._submit_query(st, ns_id, hashes, key)
                return None, False
            wait_ms = self._wait_ms(st)
            self._take_result(st, key, self._query(ns_id, hashes, start, usable,
                                                   st.remote_transfer if wait_ms else "", wait_ms,
                                                   st.remote_source if wait_ms else ""))
        tokens = st.memo_hit * self.bs - num_computed_tokens
        if tokens <= 0:
            # The answer stays memoised (asked again: 0 at once); the lease
            # of a hit the local prefix already covers is not needed.
            if st.memo_lease:
                self._release(lease_id=st.memo_lease)
                st.memo_lease = ""
            return 0, False
        return tokens, True

    def _wait_ms(self, st: _Req) -> int:
        """How long the engine may hold this query: a decode leg's first
        query waits for its prefill's transfer, every other query not at all."""
        if st.remote_transfer and not st.transfer_waited:
            return self.cfg.query_wait_ms
        return 0

    def _submit_query(self, st: _Req, ns_id: str, hashes: list[Any], key: tuple[int, int, int]) -> None:
        start, usable, _ = key
        wait_ms = self._wait_ms(st)
        st.pending = self._pool.submit(self._query, ns_id, hashes, start, usable,
                                       st.remote_transfer if wait_ms else "", wait_ms,
                                       st.remote_source if wait_ms else "")
        st.pending_key, st.pending_prefetch = key, False

    def _forget_query(self, st: _Req) -> None:
        """Nothing to load after all (the local prefix covers what could
        be): a query still running gives its lease back when it ends."""
        if st.pending is not None:
            st.pending.add_done_callback(self._release_result)
            st.pending = None
        self._drop_lease(st)

    def _query(self, ns_id: str, hashes: list[Any], start: int, usable: int, transfer_id: str,
               wait_ms: int, source_engine: str = "") -> tuple[int, str, int] | None:
        """One Query RPC; (hit blocks, lease, inflight) or None on failure.
        source_engine: P's engine, from which ours fetches what it lacks."""
        hs = [hash_bytes(h) for h in hashes[start:usable]]
        req = pb.QueryRequest(namespace_id=ns_id, wait_ms=wait_ms, lease=True,
                              lease_ttl_ms=self.cfg.lease_ttl_ms, transfer_id=transfer_id,
                              source_engine=source_engine)
        _fill_hashes(req, hs)
        timeout = (wait_ms + self.cfg.query_timeout_ms) / 1000
        t0 = time.perf_counter()
        try:
            resp = self.client.query(req, timeout)
        except EngineUnavailable:
            self.metrics.inc("queries_failed")
            return None
        except EngineError as e:
            self.metrics.inc("queries_failed")
            self.client.warn_limited("pegaflow: query failed: %s", e)
            return None
        finally:
            self.metrics.inc("query_seconds", time.perf_counter() - t0)
        self.metrics.inc("queries")
        self.metrics.inc("query_blocks", len(hs))
        self.metrics.inc("query_hit_blocks", resp.num_hit)
        return resp.num_hit, resp.lease_id, resp.num_inflight

    def _take_result(self, st: _Req, key: tuple[int, int, int], result: tuple[int, str, int] | None,
                     asked_from: int | None = None) -> None:
        """Memoises a query's answer for `key`; `asked_from` is the block the
        query started at when it differs from key's (a prefetch from 0)."""
        start, usable, _ = key
        base = start if asked_from is None else asked_from
        hit, lease = (0, "") if result is None else (result[0], result[1])
        if st.remote_transfer and not st.transfer_waited:
            st.transfer_waited = True
            self._check_transfer(st, hit, usable - base)
        st.memo_key, st.memo_hit, st.memo_lease = key, base + hit, lease
        st.memo_time = time.monotonic()

    def _check_transfer(self, st: _Req, hit: int, asked: int) -> None:
        """Loud diagnostics for the ways a P/D pair silently misses."""
        ns_id = self._ns_id or ""
        if st.remote_namespace and ns_id and st.remote_namespace != ns_id:
            self.metrics.inc("pd_namespace_mismatch")
            log.error("pegaflow: transfer %s: prefill stored its KV in namespace %s, this decode "
                      "instance uses %s (model name, dtype, block size, TP size or layout "
                      "differ); every P/D request will recompute", st.remote_transfer,
                      st.remote_namespace, ns_id)
        elif st.remote_blocks is not None and st.remote_blocks != st.prompt_blocks:
            self.metrics.inc("pd_block_count_mismatch")
            log.error("pegaflow: transfer %s: prefill saved %d full blocks, this prompt has %d "
                      "(different block size or tokenization on P and D)",
                      st.remote_transfer, st.remote_blocks, st.prompt_blocks)
        elif st.remote_blocks and hit == 0 and asked > 0:
            self.metrics.inc("pd_transfer_miss")
            log.warning("pegaflow: transfer %s: prefill reported %d blocks, none found (transfer "
                        "failed or timed out, or P and D disagree on PYTHONHASHSEED / hash "
                        "algorithm); recomputing", st.remote_transfer, st.remote_blocks)
        elif hit:
            self.metrics.inc("pd_transfer_hits")

    def _drop_lease(self, st: _Req) -> None:
        if st.memo_lease:
            self._release(lease_id=st.memo_lease)
            st.memo_lease = ""
        st.memo_key = None

    def _release(self, lease_id: str = "", transfer_id: str = "") -> None:
        if not self.client.connected:
            return

        def run() -> None:
            try:
                self.client.release(lease_id=lease_id, transfer_id=transfer_id)
            except EngineError:
                pass  # expired or engine gone: nothing is pinned any more

        self._pool.submit(run)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        st = self._state(request)
        if num_external_tokens <= 0:
            # Called again after an async load with 0: keep the load.
            if st.load is None and not st.loading:
                self._drop_lease(st)
            return
        ids = group_block_ids(blocks, self.group)
        start = st.last_num_computed // self.bs
        end = (st.last_num_computed + num_external_tokens) // self.bs
        hashes = request_block_hashes(request)
        if end > len(ids) or end > len(hashes) or end <= start:
            log.error("pegaflow: request %s: cannot map %d external tokens onto %d blocks",
                      st.req_id, num_external_tokens, len(ids))
            return
        st.load = LoadSpec(st.req_id, ids[start:end], [hash_bytes(h) for h in hashes[start:end]],
                           lease_id=st.memo_lease, transfer_id=st.remote_transfer)
        self.metrics.inc("external_hit_tokens", num_external_tokens)
        st.memo_lease = ""  # the load's, released by the engine once every rank loaded
        st.memo_key = None
        st.transfer_loaded = bool(st.remote_transfer)
        self._to_load.append(st)

    # ------------------------------------------------------------ per step

    def build_connector_meta(self, so: Any) -> PegaConnectorMetadata:
        meta = PegaConnectorMetadata()
        for queued in self._to_load:
            if queued.load is not None:
                meta.loads.append(queued.load)
                queued.load, queued.loading = None, True
        self._to_load = []
        scheduled: set[str] = set()
        st: _Req | None
        for new in getattr(so, "scheduled_new_reqs", None) or ():
            st = self._reqs.get(new.req_id)
            if st is None:
                continue
            scheduled.add(new.req_id)
            st.block_ids = group_block_ids(new.block_ids, self.group)
            if not st.seen:
                st.seen = True
                # P/D saves start at block 0 so that every prompt block,
                # local prefix hits included, is tagged and pinned.
                st.next_save = 0 if st.transfer_id else new.num_computed_tokens // self.bs
            self._plan_saves(meta, st, new.num_computed_tokens, so)
        cached = getattr(so, "scheduled_cached_reqs", None)
        if cached is not None:
            resumed = resumed_req_ids(cached)
            for i, rid in enumerate(cached.req_ids):
                st = self._reqs.get(rid)
                if st is None:
                    continue
                scheduled.add(rid)
                new_ids = cached.new_block_ids[i] if i < len(cached.new_block_ids) else None
                if rid in resumed:
                    st.block_ids = group_block_ids(new_ids, self.group)
                elif new_ids is not None:
                    st.block_ids.extend(group_block_ids(new_ids, self.group))
                self._plan_saves(meta, st, cached.num_computed_tokens[i], so)
        preempted = preempted_req_ids(so)
        if preempted is None:
            # Older vLLM does not list preemptions: treat every tracked
            # request missing from this step as possibly preempted (its
            # saves are waited for; harmless if it was merely not scheduled).
            finished = set(getattr(so, "finished_req_ids", None) or ())
            preempted = {rid for rid, st in self._reqs.items()
                         if st.saved_any and rid not in scheduled and rid not in finished}
        for rid in preempted:
            st = self._reqs.get(rid)
            if st is not None:
                st.block_ids = []
                # Its recomputed blocks are saved again on resume: a save
                # cut off by a timed-out preemption wait sealed nothing (the
                # engine skips blocks it already holds).
                if not st.transfer_id:
                    st.next_save = 0
                if st.saved_any:
                    meta.preempted.add(rid)
        meta.delayed_free, self._delayed = self._delayed, set()
        return meta

    def _plan_saves(self, meta: PegaConnectorMetadata, st: _Req, num_computed: int, so: Any) -> None:
        if not self.save_enabled or self.disabled:
            return
        req = st.request
        n_sched = so.num_scheduled_tokens.get(st.req_id, 0)
        total = min(num_computed + n_sched, req.num_tokens)
        hashes = request_block_hashes(req)
        limit = min(total // self.bs, len(hashes), len(st.block_ids))
        publishable = num_publishable_block_hashes(req)
        if publishable is not None:
            limit = min(limit, publishable)
        if not self.cfg.save_decode_blocks:
            limit = min(limit, st.prompt_blocks)
        lo = st.next_save
        if st.transfer_id and not st.transfer_last_sent:
            f = st.prompt_blocks
            tag_hi = min(limit, f)
            last = limit >= f
            if tag_hi > lo or last:
                meta.saves.append(SaveSpec(
                    st.req_id, st.block_ids[lo:tag_hi] if tag_hi > lo else [],
                    [hash_bytes(h) for h in hashes[lo:tag_hi]] if tag_hi > lo else [],
                    transfer_id=st.transfer_id, transfer_last=last,
                    ready_url=st.ready_url, ready_token=st.ready_token))
                st.saved_any = True
                st.transfer_last_sent = last
            lo = max(lo, tag_hi)
        if limit > lo:
            meta.saves.append(SaveSpec(st.req_id, st.block_ids[lo:limit],
                                       [hash_bytes(h) for h in hashes[lo:limit]]))
            st.saved_any = True
        st.next_save = max(st.next_save, limit)

    def update_connector_output(self, output: Any) -> None:
        self._sending.difference_update(getattr(output, "finished_sending", None) or ())
        if self._release_after_send:
            for rid in getattr(output, "finished_sending", None) or ():
                tid = self._release_after_send.pop(rid, None)
                if tid:
                    self._release(transfer_id=tid)
        for rid in getattr(output, "finished_recving", None) or ():
            st = self._reqs.get(rid)
            if st is not None:
                st.loading = False

    def request_finished(self, request: Any, block_ids: Any = None) -> tuple[bool, dict[str, Any] | None]:
        st = self._reqs.pop(request.request_id, None)
        if st is None:
            return False, None
        if st in self._to_load:
            self._to_load.remove(st)
            if st.load is not None and st.load.lease_id:
                self._release(lease_id=st.load.lease_id)
            st.load = None
        if st.pending is not None:
            st.pending.add_done_callback(lambda f: self._release_result(f))
        self._drop_lease(st)
        params: dict[str, Any] | None = None
        if st.transfer_id:
            if st.transfer_last_sent:
                params = {K_DO_REMOTE_PREFILL: True, K_DO_REMOTE_DECODE: False,
                          K_TRANSFER_ID: st.transfer_id, K_NUM_BLOCKS: st.prompt_blocks}
                if self._ns_id:
                    params[K_NAMESPACE] = self._ns_id
                if self.client.peer_address:
                    params[K_SOURCE_ENGINE] = self.client.peer_address
            else:
                # The prefill ended before its prompt was saved (abort, error):
                # fail the transfer so the router stops waiting - after the
                # saves already handed to workers, which would recreate it.
                self.metrics.inc("transfers_abandoned")
                if st.saved_any:
                    self._release_after_send[st.req_id] = st.transfer_id
                else:
                    self._release(transfer_id=st.transfer_id)
                if self.disabled and not st.saved_any:
                    # Nothing was saved and the engine may never have heard
                    # of the transfer: tell the router, so D recomputes now.
                    self._pool.submit(self._failure_reporter.report, st.ready_url, st.transfer_id,
                                      st.ready_token, f"P's PegaFlow connector is disabled: "
                                      f"{self.disabled}")
        if st.remote_transfer and not st.transfer_loaded:
            self._release(transfer_id=st.remote_transfer)
        delay = st.saved_any
        if delay:
            self._delayed.add(st.req_id)
            self._sending.add(st.req_id)
        return delay, params

    def _release_result(self, fut: Future) -> None:
        try:
            res = fut.result()
        except Exception:  # noqa: BLE001
            return
        if res and res[1]:
            self._release(lease_id=res[1])

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def num_tracked(self) -> int:
        return len(self._reqs)


def _future_result(fut: Future) -> tuple[int, str, int] | None:
    try:
        res: tuple[int, str, int] | None = fut.result()
        return res
    except Exception as e:  # noqa: BLE001 - _query catches engine errors itself
        log.warning("pegaflow: query failed: %s", e)
        return None


def _accepts(asked: tuple[int, int, int], key: tuple[int, int, int],
             result: tuple[int, str, int] | None, prefetch: bool) -> bool:
    """Whether a finished query answers the question `key`: the same one,
    or (a prefetch from block 0) the same blocks and session with a local
    prefix that ends within the hit, so the hit's continuation is exact."""
    if asked == key:
        return True
    if not prefetch or result is None or asked[1:] != key[1:]:
        return False
    return asked[0] <= key[0] <= asked[0] + result[0]


def _fill_hashes(req: pb.QueryRequest, hs: list[bytes]) -> None:
    """Packed form when the API has it and every hash has one length: one
    bytes field instead of one per hash (cheaper to encode and decode)."""
    if hs and _HAS_PACKED and len(hs) > 1 and all(len(h) == len(hs[0]) for h in hs):
        req.packed_hashes = b"".join(hs)
        req.hash_len = len(hs[0])
    else:
        req.hashes.extend(hs)


_HAS_PACKED = "packed_hashes" in pb.QueryRequest.DESCRIPTOR.fields_by_name
