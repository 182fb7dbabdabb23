"""Scheduler-side core: what to load, what to save, when blocks may be freed.

vLLM-agnostic: it reads only plain attributes of vLLM's Request and
SchedulerOutput objects (listed in the README) and never imports vLLM;
attributes that differ between vLLM releases are read through compat.
Every method is called on vLLM's scheduler thread and must be cheap and
never raise; engine trouble degrades to "no hit" / "nothing saved".

A request's record is `ReqState` (reqstate.py: P leg, D leg, query memo,
save cursor); engine calls that may wait run on `QueryPool` (query.py);
the namespace that queries name is `SchedulerNamespace` (namespace.py).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ._proto import engine_pb2 as pb
from .client import EngineClient
from .compat import (
    LOGGER_NAME,
    all_group_block_ids,
    boundary_state_offloads,
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
from .groups import BLOCK_KINDS, STATE, GroupPlan
from .kv_events import Event, KVEventsTracker
from .metadata import LoadSpec, PegaConnectorMetadata, SaveSpec
from .metrics import Metrics
from .namespace import SchedulerNamespace
from .query import QueryKey, QueryPool, QueryResult, accepts, future_result
from .ready import FailureReporter
from .rendezvous import disabled_reason
from .reqstate import ReqState, legs

log = logging.getLogger(LOGGER_NAME)


class SchedulerCore:
    """State machine behind the scheduler-side connector methods."""

    def __init__(self, cfg: ConnectorConfig, client: EngineClient, *, block_size: int,
                 instance_id: str, load_enabled: bool, save_enabled: bool,
                 metrics: Metrics | None = None, plan: GroupPlan | None = None):
        self.cfg = cfg
        # The KV cache groups saved and loaded (groups.py); a refused model
        # (plan.why) is answered 0 matched tokens.
        self.plan = plan = plan or GroupPlan()
        self.hits_usable = plan.hits_usable
        self._hybrid = plan.hybrid
        self._block_groups = plan.by_kind(*BLOCK_KINDS)
        self._state_groups = plan.by_kind(STATE)
        # Hybrid: block id -> the request whose save planned it (a step that
        # hands the id out again fences that request, see _fence), and the
        # planned ids of finished requests whose saves may still run.
        self._owner: dict[int, str] = {}
        self._finishing: dict[str, set[int]] = {}
        # P/D transfers settled at request_finished (sent next step).
        self._finals: list[SaveSpec] = []
        self.client = client
        self.bs = block_size
        self.instance_id = instance_id
        self.load_enabled = load_enabled
        self.save_enabled = save_enabled
        self.metrics = metrics or client.metrics
        self._reqs: dict[str, ReqState] = {}
        self._to_load: list[ReqState] = []
        self._delayed: set[str] = set()
        self._sending: set[str] = set()  # delayed frees not reported done yet
        # Abandoned transfers to fail once the request's saves are done (a
        # Release that overtook an in-flight tagged save would be undone by it).
        self._release_after_send: dict[str, str] = {}
        self._pool = QueryPool(cfg, client, self.metrics, first_block=plan.hybrid)
        self._namespace = SchedulerNamespace(cfg, client, self.metrics, instance_id,
                                             submit=self._pool.submit, disable=self.disable)
        self._has_preempted_field: bool | None = None
        self.disabled = ""
        self._failure_reporter = FailureReporter(cfg.kv_ready_allow)
        # vLLM builds the scheduler after the workers registered: a rank
        # that failed has left its marker already (older vLLM: no handshake).
        if (reason := disabled_reason(instance_id)) is not None:
            self.disable(reason)
        client.add_on_connect(self._namespace.on_connect)
        # KV events (kv_events.py), when vLLM publishes them: the groups
        # advertised are the full-attention ones (vLLM's consumers index
        # prefix blocks; a window's blocks are not a prefix).
        self.events: KVEventsTracker | None = None
        self._event_groups = frozenset(plan.by_kind("full"))

    def enable_kv_events(self) -> None:
        """Publish the CPU tier as vLLM KV events (take_events)."""
        self.events = KVEventsTracker(self.client, self.metrics, block_size=self.bs,
                                      submit=self._pool.submit, namespace_id=self.namespace_id)

    def take_events(self) -> list[Event]:
        """This step's KV events (vLLM's scheduler publishes them)."""
        if self.events is None:
            return []
        if self.disabled:
            self.events.stop(f"the connector stopped using the engine ({self.disabled})")
        return self.events.take()

    def _note(self, request: Any, items: Any, hashes: list[Any]) -> None:
        """Tell the events tracker the tokens of the blocks about to be
        saved or loaded: (group, hash index) items."""
        ev = self.events
        if ev is None:
            return
        tokens = getattr(request, "all_token_ids", None) or ()
        for g, i in items:
            if g in self._event_groups:
                ev.note(g, hash_bytes(hashes[i]), hash_bytes(hashes[i - 1]) if i > 0 else None,
                        tokens[i * self.bs:(i + 1) * self.bs])

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
        self._namespace.set(ns)

    def namespace_id(self) -> str | None:
        """The namespace to query, or None while unknown (queries skipped)."""
        return self._namespace.id()

    @property
    def _ns_id(self) -> str | None:
        """The namespace last opened, named in P/D answers and diagnostics."""
        return self._namespace.opened_id

    # ------------------------------------------------------------ requests

    def _state(self, request: Any) -> ReqState:
        rid = request.request_id
        st = self._reqs.get(rid)
        if st is None:
            st = ReqState(rid, request, prompt_blocks=num_prompt_tokens(request) // self.bs)
            st.prefill, st.decode = legs(kv_transfer_params(request))
            if st.prefill is not None and not self.save_enabled:
                st.prefill = None
                self.client.warn_limited("pegaflow: prefill request %s arrived at a kv_consumer "
                                         "instance: nothing will be saved for the decode leg", rid)
            self._reqs[rid] = st
        else:
            st.request = request
        return st

    def on_new_request(self, request: Any) -> None:
        """vLLM (0.22+) announces a request when it arrives: its query starts
        now, on the pool, so that the first get_num_new_matched_tokens
        usually finds the answer ready. Asked from block 0 (the local prefix
        hit is not known yet); a later ask whose local prefix ends within the
        hit takes it (see query.accepts)."""
        if not self.cfg.async_query or not self.load_enabled or self.disabled \
                or not self.hits_usable:
            return
        st = self._state(request)
        if st.memo.pending is not None or st.memo.key is not None:
            return
        hashes = request_block_hashes(request)
        usable = min(len(hashes), max(request.num_tokens - 1, 0) // self.bs)
        ns_id = self.namespace_id() if usable > 0 else None
        if ns_id is not None:
            self._submit_query(st, ns_id, hashes, (0, usable, self.client.generation))
            st.memo.pending_prefetch = True

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        """Never waits for the engine (async_query, the default): a question
        not answered yet starts its query on the pool and answers None, which
        vLLM takes as "ask again next step"; the result is memoised with its
        lease. async_query=false answers from a synchronous RPC (up to
        query_timeout_ms, or query_wait_ms for a P/D wait) on this thread.
        A request whose load failed is answered 0 from then on (see
        ReqState.load_failed)."""
        st = self._state(request)
        memo = st.memo
        memo.last_num_computed = num_computed_tokens
        if memo.pending is not None and not memo.pending.done():
            return None, False  # the cheapest answer: vLLM polls while the query runs
        if not self.load_enabled or self.disabled or not self.hits_usable:
            return 0, False
        if st.load_failed:
            self._forget_query(st)
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

        if memo.pending is not None:  # done (checked above)
            fut, pkey, prefetch = memo.pending, memo.pending_key, memo.pending_prefetch
            memo.pending, memo.pending_prefetch = None, False
            result = future_result(fut)
            if pkey is not None and accepts(pkey, key, result, prefetch):
                self._take_result(st, key, result, pkey[0])
            elif result is not None and result[1]:
                self._pool.release(lease_id=result[1])
        if memo.key != key or time.monotonic() - memo.time > self.cfg.lease_ttl_ms / 2000:
            self._drop_lease(st)
            if self.cfg.async_query:
                self._submit_query(st, ns_id, hashes, key)
                return None, False
            tid, wait_ms, src = self._wait_for(st)
            self._take_result(st, key, self._pool.query(ns_id, hashes, start, usable, tid,
                                                        wait_ms, src))
        tokens = memo.hit * self.bs - num_computed_tokens
        if tokens <= 0:
            # The answer stays memoised (asked again: 0 at once); the lease
            # of a hit the local prefix already covers is not needed.
            if memo.lease:
                self._pool.release(lease_id=memo.lease)
                memo.lease = ""
            return 0, False
        return tokens, True

    def _wait_for(self, st: ReqState) -> tuple[str, int, str]:
        """The transfer this query waits for, how long the engine may hold
        it, and P's engine: a decode leg's first query waits for its
        prefill's transfer, every other query not at all."""
        d = st.decode
        if d is not None and not d.waited and self.cfg.query_wait_ms:
            return d.transfer_id, self.cfg.query_wait_ms, d.source_engine
        return "", 0, ""

    def _submit_query(self, st: ReqState, ns_id: str, hashes: list[Any], key: QueryKey) -> None:
        start, usable, _ = key
        tid, wait_ms, src = self._wait_for(st)
        st.memo.pending = self._pool.query_async(ns_id, hashes, start, usable, tid, wait_ms, src)
        st.memo.pending_key, st.memo.pending_prefetch = key, False

    def _forget_query(self, st: ReqState) -> None:
        """Nothing to load after all (the local prefix covers what could
        be): a query still running gives its lease back when it ends."""
        if st.memo.pending is not None:
            st.memo.pending.add_done_callback(self._pool.release_result)
            st.memo.pending = None
        self._drop_lease(st)

    def _take_result(self, st: ReqState, key: QueryKey, result: QueryResult | None,
                     asked_from: int | None = None) -> None:
        """Memoises a query's answer for `key`; `asked_from` is the block the
        query started at when it differs from key's (a prefetch from 0)."""
        start, usable, _ = key
        base = start if asked_from is None else asked_from
        hit, lease = (0, "") if result is None else (result[0], result[1])
        if st.decode is not None and not st.decode.waited:
            st.decode.waited = True
            st.decode.check(hit, usable - base, st.prompt_blocks, self._ns_id or "", self.metrics)
        memo = st.memo
        memo.key, memo.hit, memo.lease = key, base + hit, lease
        memo.time = time.monotonic()

    def _drop_lease(self, st: ReqState) -> None:
        if st.memo.lease:
            self._pool.release(lease_id=st.memo.lease)
            st.memo.lease = ""
        st.memo.key = None

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        st = self._state(request)
        if num_external_tokens <= 0:
            # Called again after an async load with 0: keep the load.
            if st.load is None and not st.loading:
                self._drop_lease(st)
            return
        computed = st.memo.last_num_computed
        start = computed // self.bs
        end = (computed + num_external_tokens) // self.bs
        hashes = request_block_hashes(request)
        tid = st.decode.transfer_id if st.decode else ""
        if not self._hybrid:
            ids = group_block_ids(blocks, 0)
            if end > len(ids) or end > len(hashes) or end <= start:
                log.error("pegaflow: request %s: cannot map %d external tokens onto %d blocks",
                          st.req_id, num_external_tokens, len(ids))
                return
            st.load = LoadSpec(st.req_id, ids[start:end],
                               [hash_bytes(h) for h in hashes[start:end]],
                               lease_id=st.memo.lease, transfer_id=tid)
            self._note(request, ((0, i) for i in range(start, end)), hashes)
        else:
            # Per group, the blocks vLLM allocated for the hit: the null
            # block (0) where the group needs nothing (out of the window,
            # states before the boundary) - exactly what the lease pins.
            per_group = all_group_block_ids(blocks)
            b_ids: list[int] = []
            b_hashes: list[bytes] = []
            b_groups: list[int] = []
            for g in self.plan.indices:
                ids = per_group[g] if g < len(per_group) else []
                for i in range(start, min(end, len(ids), len(hashes))):
                    if ids[i]:
                        b_ids.append(ids[i])
                        b_hashes.append(hash_bytes(hashes[i]))
                        b_groups.append(g)
            if end > len(hashes) or end <= start or not b_ids:
                log.error("pegaflow: request %s: cannot map %d external tokens onto its "
                          "blocks", st.req_id, num_external_tokens)
                return
            st.load = LoadSpec(st.req_id, b_ids, b_hashes, lease_id=st.memo.lease,
                               transfer_id=tid, groups=b_groups)
            self._note(request, ((g, i) for g in self.plan.indices
                                 for i in range(start, min(end, len(hashes)))), hashes)
        self.metrics.inc("external_hit_tokens", num_external_tokens)
        st.memo.lease = ""  # the load's, released by the engine once every rank loaded
        st.memo.key = None
        if st.decode is not None:
            st.decode.loaded = True
        self._to_load.append(st)

    # ------------------------------------------------------------ per step

    def build_connector_meta(self, so: Any) -> PegaConnectorMetadata:
        meta = PegaConnectorMetadata()
        for queued in self._to_load:
            if queued.load is not None:
                meta.loads.append(queued.load)
                queued.load_ids = frozenset(queued.load.block_ids)
                queued.load, queued.loading = None, True
        self._to_load = []
        if self._finals:
            meta.saves.extend(self._finals)
            self._finals = []
        new_reqs = list(getattr(so, "scheduled_new_reqs", None) or ())
        cached = getattr(so, "scheduled_cached_reqs", None)
        resumed = resumed_req_ids(cached) if cached is not None else set()
        if self._hybrid and self._owner:
            self._fence(meta, new_reqs, cached, resumed)
        offers = boundary_state_offloads(so) if self._state_groups else {}
        scheduled: set[str] = set()
        st: ReqState | None
        for new in new_reqs:
            st = self._reqs.get(new.req_id)
            if st is None:
                continue
            scheduled.add(new.req_id)
            cur = st.saves
            self._set_block_ids(cur, new.block_ids, replace=True)
            if not cur.seen:
                cur.seen = True
                # P/D saves start at block 0 so that every prompt block,
                # local prefix hits included, is tagged and pinned.
                first = 0 if st.prefill else new.num_computed_tokens // self.bs
                cur.next_save = {g: first for g in self._block_groups}
                self._offer_hit_state(st, new.num_computed_tokens, offers)
            self._plan_saves(meta, st, new.num_computed_tokens, so, offers.pop(new.req_id, ()))
        if cached is not None:
            for i, rid in enumerate(cached.req_ids):
                st = self._reqs.get(rid)
                if st is None:
                    continue
                scheduled.add(rid)
                new_ids = cached.new_block_ids[i] if i < len(cached.new_block_ids) else None
                if rid in resumed:
                    self._set_block_ids(st.saves, new_ids, replace=True)
                elif new_ids is not None:
                    self._set_block_ids(st.saves, new_ids, replace=False)
                self._plan_saves(meta, st, cached.num_computed_tokens[i], so, offers.pop(rid, ()))
        for rid, entries in offers.items():
            # States offered for a request not scheduled this step.
            if (st := self._reqs.get(rid)) is not None:
                self._plan_saves(meta, st, None, so, entries)
        preempted = preempted_req_ids(so)
        if preempted is None:
            # Older vLLM does not list preemptions: treat every tracked
            # request missing from this step as possibly preempted (its
            # saves are waited for; harmless if it was merely not scheduled).
            finished = set(getattr(so, "finished_req_ids", None) or ())
            preempted = {rid for rid, st in self._reqs.items()
                         if st.saves.saved_any and rid not in scheduled and rid not in finished}
        for rid in preempted:
            st = self._reqs.get(rid)
            if st is not None:
                self._disown(rid, st.saves.planned)
                # Its recomputed blocks are saved again on resume: a save
                # cut off by a timed-out preemption wait sealed nothing (the
                # engine skips blocks it already holds).
                st.saves.reset(restart=not st.prefill)
                if st.saves.saved_any:
                    meta.preempted.add(rid)
        meta.delayed_free, self._delayed = self._delayed, set()
        return meta

    def _set_block_ids(self, cur: Any, block_ids: Any, replace: bool) -> None:
        """The request's block tables (stored groups) from vLLM's per-group
        lists; `replace`: the whole table, else blocks appended this step."""
        if not self._hybrid:
            ids = group_block_ids(block_ids, 0)
            if replace:
                cur.block_ids = {0: ids}
            else:
                cur.ids(0).extend(ids)
            return
        per_group = all_group_block_ids(block_ids)
        if replace:
            cur.block_ids = {}
        for g in self.plan.indices:
            cur.ids(g).extend(per_group[g] if g < len(per_group) else [])

    def _fence(self, meta: PegaConnectorMetadata, new_reqs: list[Any], cached: Any,
               resumed: set[str]) -> None:
        """Blocks vLLM hands out this step (fresh allocations of every
        group, and the blocks of this step's loads) that a request planned
        saves from: vLLM freed them early (out of the window, offered
        states); the owner's in-flight saves must end before the forward
        writes them (meta.fence). Run before this step's saves are planned."""
        fresh: list[int] = []
        for new in new_reqs:
            first = new.num_computed_tokens // self.bs  # below: prefix-cache hits, shared
            for ids in all_group_block_ids(new.block_ids):
                fresh.extend(ids[first:])
        if cached is not None:
            for i, rid in enumerate(cached.req_ids):
                new_ids = cached.new_block_ids[i] if i < len(cached.new_block_ids) else None
                first = cached.num_computed_tokens[i] // self.bs if rid in resumed else 0
                for ids in all_group_block_ids(new_ids):
                    fresh.extend(ids[first:])
        for load in meta.loads:
            fresh.extend(load.block_ids)
        for b in fresh:
            owner = self._owner.pop(b, None) if b else None
            if owner is None:
                continue
            meta.fence.add(owner)
            self.metrics.inc("save_fences")
            st = self._reqs.get(owner)
            if st is not None:
                st.saves.planned.discard(b)

    def _disown(self, rid: str, planned: set[int]) -> None:
        for b in planned:
            if self._owner.get(b) == rid:
                del self._owner[b]

    def _offer_hit_state(self, st: ReqState, num_computed: int,
                         offers: dict[str, list[tuple[int, int, int]]]) -> None:
        """A local prefix hit's state block (the state after the hit,
        vLLM never offers it again): saved like an offered one."""
        k = num_computed // self.bs
        if k <= 0:
            return
        for g in self._state_groups:
            ids = st.saves.ids(g)
            if k - 1 < len(ids) and ids[k - 1]:
                offers.setdefault(st.req_id, []).append((g, ids[k - 1], k * self.bs))

    def _save_cap(self, st: ReqState, total: int | None) -> int:
        """Blocks of the request whose hashes may be saved (computed by the
        end of this step when `total` tokens are)."""
        req = st.request
        hashes = request_block_hashes(req)
        limit = len(hashes) if total is None else min(total // self.bs, len(hashes))
        publishable = num_publishable_block_hashes(req)
        if publishable is not None:
            limit = min(limit, publishable)
        if not self.cfg.save_decode_blocks:
            limit = min(limit, st.prompt_blocks)
        return limit

    def _plan_saves(self, meta: PegaConnectorMetadata, st: ReqState, num_computed: int | None,
                    so: Any, offers: Any = ()) -> None:
        """This step's saves of one request: the blocks of every
        block-addressed group computed by the end of the forward (null
        blocks skipped) and the states vLLM offers (`offers`, state groups;
        hash index boundary/block_size - 1). `num_computed` None: the
        request is not scheduled, only offers are planned."""
        if not self.save_enabled or self.disabled:
            return
        req, cur, p = st.request, st.saves, st.prefill
        hashes = request_block_hashes(req)
        items: list[tuple[int, int, int]] = []  # (group, block id, hash index)
        if num_computed is not None:
            n_sched = so.num_scheduled_tokens.get(st.req_id, 0)
            limit = self._save_cap(st, min(num_computed + n_sched, req.num_tokens))
            for g in self._block_groups:
                ids = cur.ids(g)
                lo, hi = cur.next_save.get(g, 0), min(limit, len(ids))
                # vLLM's null block (id 0, hybrid groups: out of the
                # window, skipped states) holds nothing to save.
                items.extend((g, ids[i], i) for i in range(lo, hi) if ids[i] or not self._hybrid)
                cur.next_save[g] = max(lo, hi)
        if offers:
            cap = self._save_cap(st, None)
            need = self._transfer_state_index(st)
            for g, b, n in offers:
                i = n // self.bs - 1
                if g not in self._state_groups or not b or n % self.bs or not 0 <= i < cap:
                    continue
                items.append((g, b, i))
                if i == need:
                    cur.state_ready.add(g)
        self._note(req, ((g, i) for g, _, i in items), hashes)
        f = st.prompt_blocks
        tagged: list[tuple[int, int, int]] = []
        rest: list[tuple[int, int, int]] = []
        for it in items:
            (tagged if p is not None and not p.last_sent and it[2] < f else rest).append(it)
        if p is not None and not p.last_sent:
            last = self._transfer_complete(st)
            if tagged or last:
                meta.saves.append(self._spec(st.req_id, tagged, hashes, transfer_id=p.transfer_id,
                                             transfer_last=last, ready_url=p.ready_url,
                                             ready_token=p.ready_token))
                cur.saved_any = True
                p.last_sent = last
        if rest:
            meta.saves.append(self._spec(st.req_id, rest, hashes))
            cur.saved_any = True
        if self._hybrid:
            for _, b, _ in items:
                self._owner[b] = st.req_id
                cur.planned.add(b)

    def _spec(self, rid: str, items: list[tuple[int, int, int]], hashes: list[Any],
              **kw: Any) -> SaveSpec:
        return SaveSpec(rid, [b for _, b, _ in items], [hash_bytes(hashes[i]) for _, _, i in items],
                        groups=[g for g, _, _ in items] if self._hybrid else [], **kw)

    def _transfer_state_index(self, st: ReqState) -> int:
        """The hash index of the state D needs for its hit (the prompt's
        usable blocks, the last token is always recomputed); -1: none."""
        usable = min(max(num_prompt_tokens(st.request) - 1, 0) // self.bs, st.prompt_blocks)
        return usable - 1

    def _blocks_complete(self, st: ReqState) -> bool:
        f = st.prompt_blocks
        return all(st.saves.next_save.get(g, 0) >= f for g in self._block_groups)

    def _transfer_complete(self, st: ReqState) -> bool:
        """Every group's blocks for D's boundary are planned: the transfer's
        last save may go (the engine then settles it)."""
        if not self._blocks_complete(st):
            return False
        if self._state_groups and self._transfer_state_index(st) >= 0:
            return all(g in st.saves.state_ready for g in self._state_groups)
        return True

    def update_connector_output(self, output: Any) -> None:
        self._sending.difference_update(getattr(output, "finished_sending", None) or ())
        if self._finishing:
            for rid in getattr(output, "finished_sending", None) or ():
                self._disown(rid, self._finishing.pop(rid, set()))
        if self._release_after_send:
            for rid in getattr(output, "finished_sending", None) or ():
                tid = self._release_after_send.pop(rid, None)
                if tid:
                    self._pool.release(transfer_id=tid)
        invalid = getattr(output, "invalid_block_ids", None)
        failed = getattr(output, "failed_recving", None)
        if invalid or failed:
            self._note_failed_loads(invalid or set(), failed or set())
        for rid in getattr(output, "finished_recving", None) or ():
            st = self._reqs.get(rid)
            if st is not None:
                st.loading, st.load_ids = False, frozenset()

    def _note_failed_loads(self, invalid: set[int], failed: set[str]) -> None:
        """Marks the loading requests whose load failed: by request
        (failed_recving, a hybrid's) or by block (invalid_block_ids, which
        vLLM sends in the step a rank reports them, possibly before the
        request's last rank finished). Runs only in a step with failures."""
        for st in self._reqs.values():
            if not st.loading or st.load_failed:
                continue
            if st.req_id in failed or not st.load_ids.isdisjoint(invalid):
                st.load_failed = True
                self.metrics.inc("loads_failed_recomputed")

    def request_finished(self, request: Any, block_ids: Any = None) -> tuple[bool, dict[str, Any] | None]:
        st = self._reqs.pop(request.request_id, None)
        if st is None:
            return False, None
        if st in self._to_load:
            self._to_load.remove(st)
            if st.load is not None and st.load.lease_id:
                self._pool.release(lease_id=st.load.lease_id)
            st.load = None
        if st.memo.pending is not None:
            st.memo.pending.add_done_callback(self._pool.release_result)
        self._drop_lease(st)
        params: dict[str, Any] | None = None
        saved_any = st.saves.saved_any
        p = st.prefill
        if p is not None and not p.last_sent and self._state_groups and saved_any \
                and self._blocks_complete(st):
            # Every block was planned but vLLM never offered the state at
            # D's boundary: settle the transfer with what was saved (the
            # engine's boundary rule then gives D a smaller hit, or none).
            self._finals.append(SaveSpec(st.req_id, [], [], transfer_id=p.transfer_id,
                                         transfer_last=True, ready_url=p.ready_url,
                                         ready_token=p.ready_token))
            p.last_sent = True
            self.metrics.inc("transfers_without_state")
        if p is not None:
            if p.last_sent:
                params = p.answer(st.prompt_blocks, self._ns_id or "", self.client.peer_address)
            else:
                # The prefill ended before its prompt was saved (abort, error):
                # fail the transfer so the router stops waiting - after the
                # saves already handed to workers, which would recreate it.
                self.metrics.inc("transfers_abandoned")
                if saved_any:
                    self._release_after_send[st.req_id] = p.transfer_id
                else:
                    self._pool.release(transfer_id=p.transfer_id)
                if self.disabled and not saved_any:
                    # Nothing was saved and the engine may never have heard
                    # of the transfer: tell the router, so D recomputes now.
                    self._pool.submit(self._failure_reporter.report, p.ready_url, p.transfer_id,
                                      p.ready_token, f"P's PegaFlow connector is disabled: "
                                      f"{self.disabled}")
        if st.decode is not None and not st.decode.loaded:
            self._pool.release(transfer_id=st.decode.transfer_id)
        delay = saved_any
        if delay:
            self._delayed.add(st.req_id)
            self._sending.add(st.req_id)
            if st.saves.planned:
                self._finishing[st.req_id] = st.saves.planned
        else:
            self._disown(st.req_id, st.saves.planned)
        return delay, params

    def shutdown(self) -> None:
        self._pool.shutdown()

    def num_tracked(self) -> int:
        return len(self._reqs)
