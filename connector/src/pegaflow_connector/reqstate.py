"""The scheduler's record of one request, in parts with one owner each.

`ReqState` is created when vLLM first shows the scheduler a request and
dropped at `request_finished`. Its parts:

- `PrefillLeg` (P, `do_remote_decode`): the transfer P's saves are tagged
  with; owned by the save planning and `request_finished` (P's answer).
- `DecodeLeg` (D, `do_remote_prefill`): the prefill's transfer D waits
  for and loads; owned by the query path (wait, diagnostics) and the load.
- `QueryMemo`: the last question asked of the engine, its answer and lease,
  and the query still running; owned by get_num_new_matched_tokens.
- `SaveCursor`: the request's block table and how far it was saved; owned
  by build_connector_meta's save planning.

A request has at most one leg: the router may echo do_remote_decode on the
decode leg; do_remote_prefill decides.
"""

from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import Future
from typing import Any

from .compat import LOGGER_NAME
from .metadata import LoadSpec
from .metrics import Metrics
from .query import QueryKey

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
class PrefillLeg:
    """P side: every prompt block is saved tagged with this transfer."""

    transfer_id: str
    ready_url: str = ""
    ready_token: str = ""
    last_sent: bool = False  # the save completing the transfer was planned

    def answer(self, prompt_blocks: int, ns_id: str, peer_address: str) -> dict[str, Any]:
        """P's kv_transfer_params for the decode leg (its saves are all
        planned): the transfer, what D checks it against, and P's engine."""
        params: dict[str, Any] = {K_DO_REMOTE_PREFILL: True, K_DO_REMOTE_DECODE: False,
                                  K_TRANSFER_ID: self.transfer_id, K_NUM_BLOCKS: prompt_blocks}
        if ns_id:
            params[K_NAMESPACE] = ns_id
        if peer_address:
            params[K_SOURCE_ENGINE] = peer_address
        return params


@dataclasses.dataclass
class DecodeLeg:
    """D side: the prefill's transfer to wait for, and what P said of it."""

    transfer_id: str
    num_blocks: int | None = None  # full prompt blocks P saved (None: not told)
    namespace: str = ""  # P's namespace id ("": not told)
    source_engine: str = ""  # P's engine when it is not ours (host:port)
    waited: bool = False  # the first query (the one that waits) was answered
    loaded: bool = False  # a load took the transfer (its lease goes with it)

    def check(self, hit: int, asked: int, prompt_blocks: int, ns_id: str,
              metrics: Metrics) -> None:
        """Loud diagnostics for the ways a P/D pair silently misses, from
        the first query's answer (hit of asked blocks) in namespace ns_id."""
        if self.namespace and ns_id and self.namespace != ns_id:
            metrics.inc("pd_namespace_mismatch")
            log.error("pegaflow: transfer %s: prefill stored its KV in namespace %s, this decode "
                      "instance uses %s (model name, dtype, block size, TP size or layout "
                      "differ); every P/D request will recompute", self.transfer_id,
                      self.namespace, ns_id)
        elif self.num_blocks is not None and self.num_blocks != prompt_blocks:
            metrics.inc("pd_block_count_mismatch")
            log.error("pegaflow: transfer %s: prefill saved %d full blocks, this prompt has %d "
                      "(different block size or tokenization on P and D)",
                      self.transfer_id, self.num_blocks, prompt_blocks)
        elif self.num_blocks and hit == 0 and asked > 0:
            metrics.inc("pd_transfer_miss")
            log.warning("pegaflow: transfer %s: prefill reported %d blocks, none found (transfer "
                        "failed or timed out, or P and D disagree on PYTHONHASHSEED / hash "
                        "algorithm); recomputing", self.transfer_id, self.num_blocks)
        elif hit:
            metrics.inc("pd_transfer_hits")


@dataclasses.dataclass
class QueryMemo:
    """The engine's answer for (start block, usable blocks, session)."""

    key: QueryKey | None = None
    hit: int = 0  # absolute number of blocks hit from block 0
    lease: str = ""  # pins the hit until loaded or released
    time: float = 0.0  # time.monotonic() of the answer
    pending: Future[Any] | None = None  # a query still running
    pending_key: QueryKey | None = None
    pending_prefetch: bool = False  # started by on_new_request, from block 0
    last_num_computed: int = 0  # of the last get_num_new_matched_tokens


@dataclasses.dataclass
class SaveCursor:
    """The request's block tables (one per stored group) and how far each
    was saved. A one-group model has only group 0."""

    # group -> the request's block ids in that group (0: vLLM's null block).
    block_ids: dict[int, list[int]] = dataclasses.field(default_factory=dict)
    # group -> blocks below were planned for saving (block-addressed kinds).
    next_save: dict[int, int] = dataclasses.field(default_factory=dict)
    seen: bool = False  # scheduled at least once
    saved_any: bool = False  # a save was handed to workers (frees are delayed)
    # State groups whose state at the P/D boundary was planned for saving.
    state_ready: set[int] = dataclasses.field(default_factory=set)
    # Block ids (any group) this request planned saves from: a step that
    # hands one of them out again fences the request (scheduler.py).
    planned: set[int] = dataclasses.field(default_factory=set)

    def ids(self, group: int) -> list[int]:
        return self.block_ids.setdefault(group, [])

    def reset(self, restart: bool) -> None:
        """Preempted: the block tables are gone; `restart`: plan every
        block again on resume (the engine skips blocks it holds)."""
        self.block_ids = {}
        self.planned = set()
        if restart:
            self.next_save = {}


@dataclasses.dataclass
class ReqState:
    req_id: str
    request: Any
    prompt_blocks: int = 0  # full blocks of the prompt
    prefill: PrefillLeg | None = None
    decode: DecodeLeg | None = None
    memo: QueryMemo = dataclasses.field(default_factory=QueryMemo)
    saves: SaveCursor = dataclasses.field(default_factory=SaveCursor)
    # Load handed to workers (at most one per request) and whether it runs.
    load: LoadSpec | None = None
    loading: bool = False
    # The block ids of the load that runs (for vLLM's invalid_block_ids),
    # and whether a load of this request failed: vLLM then asks again from
    # 0 computed tokens, and a hit claimed again would fail the same way
    # for as long as its cause lasts (a rank that never registered), a
    # loop with no end. A failed request recomputes instead.
    load_ids: frozenset[int] = frozenset()
    load_failed: bool = False


def legs(params: dict[str, Any]) -> tuple[PrefillLeg | None, DecodeLeg | None]:
    """The P or D leg a request's kv_transfer_params describe (or neither)."""
    tid = str(params.get(K_TRANSFER_ID) or "")
    if tid and params.get(K_DO_REMOTE_PREFILL):
        n = params.get(K_NUM_BLOCKS)
        src = params.get(K_SOURCE_ENGINE)
        return None, DecodeLeg(
            tid, num_blocks=int(n) if isinstance(n, (int, str)) and str(n).isdigit() else None,
            namespace=str(params.get(K_NAMESPACE) or ""),
            source_engine=src if isinstance(src, str) else "")
    if tid and params.get(K_DO_REMOTE_DECODE):
        return PrefillLeg(tid, ready_url=str(params.get(K_READY_URL) or ""),
                          ready_token=str(params.get(K_READY_TOKEN) or "")), None
    return None, None
