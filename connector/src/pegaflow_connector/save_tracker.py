"""A rank's save bookkeeping: which requests have saves in flight, when a
request whose free vLLM delays may be reported done, and which saves a
timed-out preemption wait gave up.

The worker's save path is three threads' business: vLLM's loop queues a
step's saves (`queue`) and reports finished requests (`finished`), the save
thread runs the jobs (`given_up`, `track`, `job_done`), and a preemption
waits for a request's saves (`wait`). `SaveTracker` is the one place that
state lives; it never talks to the engine, so it is tested alone
(tests/test_save_tracker.py).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Protocol

from .compat import LOGGER_NAME
from .metrics import Metrics

log = logging.getLogger(LOGGER_NAME)


class Cancellable(Protocol):
    """A call in flight that another thread can cancel (client.CallHandle)."""

    def cancel(self) -> None: ...


class SaveTracker:
    """Per-request save state of one rank. Thread-safe; every method takes
    the tracker's lock and none calls out while holding it, except
    `Cancellable.cancel` (which must not call back into the tracker).

    A request id r moves through these states:

        queued saves:   pending[r] = number of save jobs naming r that are
                        queued or running (`queue` +1, `job_done` -1)
        delayed:        vLLM delays freeing r's blocks until this rank
                        reports r done (`delay_free`), r not finished yet
        finished:       vLLM finished r (`finished`) while r was delayed:
                        - pending[r] > 0 -> waiting (reported by the
                          `job_done` that brings pending[r] to 0)
                        - else           -> done (reported by the next
                          `finished` call, exactly once)

    Invariants (`check` asserts them):

    1. pending holds no zero or negative counts: r has an entry iff a job
       naming r is queued or running.
    2. waiting ⊆ pending: a request waits only for saves that exist.
    3. delayed, waiting and done are disjoint: each delayed request is
       reported done exactly once, after vLLM finished it and its last
       save ended (succeeded, failed or cancelled).
    4. cancel_upto[r] exists only while pending[r] does: a request's saves
       in jobs with seq <= cancel_upto[r] were given up (a preemption wait
       timed out); jobs queued later save normally.
    5. handles[r] holds the calls in flight for r, never an empty set;
       giving r up cancels every one of them, and a call tracked after
       that is cancelled at once.
    """

    def __init__(self, metrics: Metrics | None = None) -> None:
        self.metrics = metrics or Metrics()
        self._cond = threading.Condition(threading.Lock())
        self._pending: collections.Counter[str] = collections.Counter()
        self._delayed: set[str] = set()
        self._waiting: set[str] = set()
        self._done: set[str] = set()
        self._seq = 0  # of the last queued job
        self._cancel_upto: dict[str, int] = {}
        self._handles: dict[str, set[Cancellable]] = {}

    # ------------------------------------------------------------ vLLM's loop

    def delay_free(self, req_ids: Iterable[str]) -> None:
        """vLLM frees these requests' blocks only once this rank reports
        them done (request_finished returned True)."""
        with self._cond:
            self._delayed.update(req_ids)

    def queue(self, req_ids: Iterable[str]) -> int:
        """A save job naming these requests is queued; returns its seq
        (increasing, from 1), which `given_up` and `track` take."""
        with self._cond:
            for rid in set(req_ids):
                self._pending[rid] += 1
            self._seq += 1
            return self._seq

    def finished(self, req_ids: Iterable[str]) -> set[str]:
        """vLLM finished these requests; returns every delayed request now
        done (vLLM may free its blocks), each reported once."""
        with self._cond:
            for rid in req_ids:
                if rid not in self._delayed:
                    continue
                self._delayed.discard(rid)
                if self._pending.get(rid, 0) == 0:
                    self._done.add(rid)
                else:
                    self._waiting.add(rid)
            done, self._done = self._done, set()
        return done

    def wait(self, req_ids: Iterable[str], timeout_s: float) -> bool:
        """Blocks until no save of these requests is queued or running.
        On timeout gives up the ones left (`given_up`, their calls
        cancelled) and returns False: their blocks may be reused now, and
        the engine must seal none of them. Another request's blocks in a
        cancelled Save RPC fail with it (a later miss, never wrong KV)."""
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
                    self._give_up_locked({r for r in ids if self._pending.get(r, 0)})
                    log.error("pegaflow: preempted requests %s still saving after %.1fs; their "
                              "saves are cancelled (the engine seals none of their blocks, "
                              "which may be overwritten now)", sorted(ids), timeout_s)
                    return False
                self._cond.wait(left)
        self.metrics.inc("preemption_wait_seconds", time.perf_counter() - t0)
        return True

    def wait_idle(self, deadline: float) -> bool:
        """Blocks until no save is queued or running (False at the
        time.monotonic() deadline)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending,
                                       max(deadline - time.monotonic(), 0))

    def _give_up_locked(self, req_ids: set[str]) -> None:
        for rid in req_ids:
            self._cancel_upto[rid] = self._seq
            self.metrics.inc("preempted_saves_cancelled")
            for h in self._handles.get(rid, ()):
                h.cancel()

    # ------------------------------------------------------------ save thread

    def given_up(self, seq: int) -> set[str]:
        """The requests whose saves in job `seq` must be dropped."""
        with self._cond:
            return {r for r, upto in self._cancel_upto.items() if seq <= upto}

    @contextlib.contextmanager
    def track(self, handle: Cancellable, req_ids: Iterable[str], seq: int) -> Iterator[None]:
        """Holds `handle` as a call in flight for these requests (of job
        `seq`) while the block runs: giving one of them up cancels it. It
        is cancelled at once when one was given up since the job started."""
        rids = set(req_ids)
        with self._cond:
            for rid in rids:
                self._handles.setdefault(rid, set()).add(handle)
            late = any(rid in self._cancel_upto and seq <= self._cancel_upto[rid] for rid in rids)
        if late:
            handle.cancel()
        try:
            yield
        finally:
            with self._cond:
                for rid in rids:
                    hs = self._handles.get(rid)
                    if hs is not None:
                        hs.discard(handle)
                        if not hs:
                            del self._handles[rid]

    def job_done(self, req_ids: Iterable[str]) -> None:
        """A job queued with these requests ended, whatever its outcome."""
        with self._cond:
            for rid in set(req_ids):
                self._pending[rid] -= 1
                if self._pending[rid] <= 0:
                    del self._pending[rid]
                    self._cancel_upto.pop(rid, None)
                    if rid in self._waiting:
                        self._waiting.discard(rid)
                        self._done.add(rid)
            self._cond.notify_all()

    # ------------------------------------------------------------ tests

    def busy(self) -> bool:
        """Whether any save is queued or running."""
        with self._cond:
            return bool(self._pending)

    def check(self) -> None:
        """Raises AssertionError when an invariant of the class doc fails."""
        with self._cond:
            pending = set(self._pending)
            if any(n <= 0 for n in self._pending.values()):
                raise AssertionError(f"non-positive pending counts: {dict(self._pending)}")
            if not self._waiting <= pending:
                raise AssertionError(f"waiting without saves: {self._waiting - pending}")
            for a, b in ((self._delayed, self._waiting), (self._delayed, self._done),
                         (self._waiting, self._done)):
                if a & b:
                    raise AssertionError(f"request in two states: {a & b}")
            if not set(self._cancel_upto) <= pending:
                raise AssertionError(f"given up without saves: {set(self._cancel_upto) - pending}")
            if any(not hs for hs in self._handles.values()):
                raise AssertionError("an empty handle set is kept")
