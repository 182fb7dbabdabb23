"""The CPU tier as vLLM KV events: what the engine holds of this instance's
blocks, published through vLLM's own event path (the scheduler's
`connector.take_events()`, which vLLM's publisher sends with its own GPU
events, msgpack over ZMQ, medium "CPU").

Who knows what:
  - the scheduler knows each block's tokens and parent hash, for the blocks
    of the requests it serves (the blocks it plans to save or load);
  - the engine knows when a block seals, is found present (a rank-0 save
    that it skipped, a rank-0 load) and leaves the pool (eviction). It
    tells a reader through BlockEvents: a per-namespace ring with a
    cursor, polled here off vLLM's thread.

A block is advertised (BlockStored) when the engine's feed says it is in
the pool and this instance knows its tokens (the "book", filled when a
save or load is planned, so before the worker's RPC that makes the engine
emit the event: the feed's order is then the truth). It is withdrawn
(BlockRemoved) when the feed says it left. Each instance advertises the
blocks of its own requests, not the whole shared namespace: the format
needs every block's tokens, which only the instance that served the
request has (see docs/connector.md, "KV events").

Lost events are never silent: a gap in the feed (the ring overran this
reader), an engine restart (another epoch) or the connector disabling
itself withdraw everything advertised (BlockRemoved, medium CPU, so
vLLM's GPU entries at the consumer stay), counted as a resync; when more
blocks were advertised than could be tracked, AllBlocksCleared instead.

Thread contract: `note`, `take` and `resync` run on vLLM's scheduler
thread; the poll runs on the QueryPool and touches no state here (its
answer is applied by the next `take`).
"""

from __future__ import annotations

import logging
import time
from array import array
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from ._proto import engine_pb2 as pb
from .client import EngineClient, EngineError, EngineUnavailable
from .compat import LOGGER_NAME
from .metrics import Metrics

log = logging.getLogger(LOGGER_NAME)

# Bounds (entries): the book of the tokens of blocks saved or loaded
# lately (least recently noted dropped first; ~200 bytes an entry at block
# size 16), and the advertised set.
BOOK_CAP = 1 << 15
ADVERTISED_CAP = 1 << 20
# At most one poll in flight, at most one per POLL_INTERVAL_S, each for at
# most POLL_MAX events (the engine caps it too) within POLL_TIMEOUT_S.
POLL_INTERVAL_S = 0.02
POLL_MAX = 4096
POLL_TIMEOUT_S = 2.0

_STORED = pb.BLOCK_EVENT_KIND_STORED
_PRESENT = pb.BLOCK_EVENT_KIND_PRESENT
_REMOVED = pb.BLOCK_EVENT_KIND_REMOVED

Key = tuple[int, bytes]  # (KV cache group, block hash)


@dataclass
class Stored:
    """A run of consecutive blocks of one group (BlockStored)."""

    group: int
    parent: bytes | None
    hashes: list[bytes] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)


@dataclass
class Removed:
    """Blocks of one group that left the pool (BlockRemoved)."""

    group: int
    hashes: list[bytes] = field(default_factory=list)


@dataclass
class Cleared:
    """Everything this publisher advertised is gone (AllBlocksCleared)."""


Event = Stored | Removed | Cleared


@dataclass
class _Poll:
    """A poll's answer, applied on the scheduler thread."""

    events: list[tuple[int, int, bytes]]  # (kind, group, hash)
    next: int
    epoch: str
    gap: bool
    restarted: bool


class KVEventsTracker:
    """Joins the scheduler's knowledge of tokens with the engine's feed."""

    def __init__(self, client: EngineClient, metrics: Metrics, *, block_size: int,
                 submit: Callable[..., Future[Any]], namespace_id: Callable[[], str | None],
                 book_cap: int = BOOK_CAP, advertised_cap: int = ADVERTISED_CAP,
                 clock: Callable[[], float] = time.monotonic):
        self.client = client
        self.metrics = metrics
        self.bs = block_size
        self._submit = submit
        self._namespace_id = namespace_id
        self._book_cap = book_cap
        self._advertised_cap = advertised_cap
        self._clock = clock
        # (group, hash) -> (parent hash, token ids), insertion ordered.
        # Kept after a block is advertised: it may leave and be stored again.
        self._book: dict[Key, tuple[bytes | None, array[int]]] = {}
        self._advertised: set[Key] = set()
        self._untracked = False  # advertised more than could be tracked
        self._after = 0
        self._epoch = ""
        self._ns = ""
        self._poll: Future[Any] | None = None
        self._last_poll = float("-inf")
        self._out: list[Event] = []
        self._stopped = False

    # ------------------------------------------------------------ the book

    def note(self, group: int, block_hash: bytes, parent: bytes | None,
             token_ids: Sequence[int]) -> None:
        """A block is about to be saved or loaded in `group`: its hash, its
        parent's (None for a request's first block) and its tokens."""
        if self._stopped or len(token_ids) != self.bs:
            return
        key = (group, block_hash)
        # Re-inserted at the end: the book drops the least recently noted.
        self._book.pop(key, None)
        self._book[key] = (parent, array("q", token_ids))
        if len(self._book) > self._book_cap:
            del self._book[next(iter(self._book))]
            self.metrics.inc("kv_events_book_dropped")

    # ------------------------------------------------------------ per step

    def take(self) -> list[Event]:
        """This step's events; starts the next poll when due. Cheap."""
        if self._poll is not None and self._poll.done():
            fut, self._poll = self._poll, None
            try:
                res = fut.result()
            except Exception as e:  # noqa: BLE001 - the poll never raises, but be sure
                res = None
                log.debug("pegaflow: KV events poll failed: %s", e)
            if isinstance(res, _Poll):
                self._apply(res)
        if self._poll is None and not self._stopped:
            ns = self._namespace_id()
            now = self._clock()
            if ns and now - self._last_poll >= POLL_INTERVAL_S:
                if ns != self._ns and self._ns:
                    self.resync("the namespace changed")
                if ns != self._ns:
                    self._ns, self._epoch, self._after = ns, "", 0
                self._last_poll = now
                self._poll = self._submit(self._read, ns, self._after, self._epoch)
        out, self._out = self._out, []
        return out

    def _read(self, ns: str, after: int, epoch: str) -> _Poll | None:
        """One BlockEvents RPC (on the pool); None when the engine is away."""
        try:
            r = self.client.block_events(pb.BlockEventsRequest(
                namespace_id=ns, after=after, epoch=epoch, max_events=POLL_MAX), POLL_TIMEOUT_S)
        except (EngineUnavailable, EngineError) as e:
            self.metrics.inc("kv_events_poll_failures")
            self.client.warn_limited("pegaflow: KV events: cannot read the engine's feed: %s", e)
            return None
        return _Poll([(ev.kind, ev.group, ev.hash) for ev in r.events], r.next, r.epoch, r.gap,
                     r.restarted)

    def _apply(self, p: _Poll) -> None:
        if p.restarted:
            self.resync("the engine restarted")
        elif p.gap:
            self.resync("events were lost (the engine's ring overran this reader)")
        self._after, self._epoch = p.next, p.epoch
        out = self._out
        for kind, group, h in p.events:
            key = (group, h)
            last = out[-1] if out else None
            if kind in (_STORED, _PRESENT):
                if key in self._advertised:
                    continue
                entry = self._book.get(key)
                if entry is None:
                    continue
                if len(self._advertised) >= self._advertised_cap:
                    self._untracked = True
                    self.metrics.inc("kv_events_untracked")
                else:
                    self._advertised.add(key)
                parent, tokens = entry
                # Consecutive blocks of a chain make one BlockStored.
                if not (isinstance(last, Stored) and last.group == group and last.hashes[-1] == parent):
                    last = Stored(group, parent)
                    out.append(last)
                last.hashes.append(h)
                last.token_ids.extend(tokens)
                self.metrics.inc("kv_events_stored_blocks")
            elif kind == _REMOVED and key in self._advertised:
                self._advertised.discard(key)
                if not (isinstance(last, Removed) and last.group == group):
                    last = Removed(group)
                    out.append(last)
                last.hashes.append(h)
                self.metrics.inc("kv_events_removed_blocks")

    def resync(self, why: str) -> None:
        """Withdraw everything advertised: the engine's state is unknown."""
        if not self._advertised and not self._untracked:
            return
        self.metrics.inc("kv_events_resyncs")
        log.warning("pegaflow: KV events: %s; withdrawing the %d blocks advertised on medium CPU",
                    why, len(self._advertised))
        if self._untracked:
            self._out.append(Cleared())
        else:
            by_group: dict[int, Removed] = {}
            for g, h in self._advertised:
                by_group.setdefault(g, Removed(g)).hashes.append(h)
            self._out.extend(by_group[g] for g in sorted(by_group))
            self.metrics.inc("kv_events_removed_blocks", len(self._advertised))
        self._advertised.clear()
        self._untracked = False

    def stop(self, why: str) -> None:
        """The connector stopped using the engine (disabled, reset_cache):
        withdraw everything and publish nothing more."""
        if self._stopped:
            return
        self.resync(why)
        self._stopped = True
        self._book.clear()
