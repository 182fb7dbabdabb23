"""The worker a rank runs when its connector could not start.

vLLM keeps driving a broken connector: the scheduler may still ask it to
delay frees (`request_finished` -> True for saves it planned before it
learnt of the failure) and to load blocks. A rank that simply did nothing
would never report those requests, and vLLM would hold their blocks until
it stops scheduling. `DisabledWorker` answers every such obligation at
once: a delayed free is reported done in the step vLLM reports the request
finished, and a load is reported finished with all of its blocks failed
(vLLM recomputes them). It also tells the scheduler side, through the
handshake metadata and a rendezvous marker (rendezvous.py), so that it
stops planning and answers 0 matched tokens.

Thread-safety: called only on the worker's main thread, like vLLM's hooks.
"""

from __future__ import annotations

from collections.abc import Iterable

from .metadata import PegaConnectorMetadata, PegaHandshake
from .metrics import Metrics


class DisabledWorker:
    """Same surface as WorkerCore's per-step methods; never touches KV."""

    mode = "disabled"

    def __init__(self, reason: str, rank: int, metrics: Metrics):
        self.reason = reason
        self.rank = rank
        self.metrics = metrics
        self._delayed: set[str] = set()
        self._failed_loads: dict[str, set[int]] = {}
        self._errors: set[int] = set()
        self._last_meta: PegaConnectorMetadata | None = None
        metrics.inc("connector_disabled")

    def registered(self) -> bool:
        return False

    def handshake(self) -> PegaHandshake:
        return PegaHandshake(b"", "", self.rank, disabled=self.reason)

    def start_step(self, meta: PegaConnectorMetadata | None) -> None:
        if meta is None or meta is self._last_meta:
            return
        self._last_meta = meta
        self._delayed |= meta.delayed_free
        for spec in meta.loads:
            self._failed_loads[spec.req_id] = set(spec.block_ids)
            self.metrics.inc("loads_failed")
            self.metrics.inc("blocks_load_failed", len(spec.block_ids))

    def end_step(self, meta: PegaConnectorMetadata | None) -> None:
        if meta is not None and meta.saves:
            self.metrics.inc("saves_dropped", sum(max(len(s.block_ids), 1) for s in meta.saves))

    def get_finished(self, finished_req_ids: Iterable[str]) -> tuple[set[str] | None, set[str] | None]:
        # As WorkerCore: the delay request (this step's metadata) arrives no
        # later than the step in which vLLM reports the request finished.
        sending = self._delayed & set(finished_req_ids)
        self._delayed -= sending
        recving = set(self._failed_loads)
        for blocks in self._failed_loads.values():
            self._errors |= blocks
        self._failed_loads.clear()
        return (sending or None), (recving or None)

    def load_errors(self) -> set[int]:
        errors, self._errors = self._errors, set()
        return errors

    def wait_preempted(self, req_ids: Iterable[str]) -> bool:
        return True  # nothing is ever in flight

    def flush(self, timeout_s: float) -> bool:
        return True

    def shutdown(self, timeout_s: float = 5.0) -> None:
        return
