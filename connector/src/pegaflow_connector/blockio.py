"""A rank's Save and Load RPCs: blocks between its registered memory and
the engine, in chunks the staging buffer holds (when there is one).

The worker's save and load threads call these once they know the rank is
registered; everything here runs on those threads, never on vLLM's loop.
What goes wrong is counted and turned into "dropped" (saves) or "failed
block ids" (loads, recomputed by vLLM), never raised.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence

from ._proto import engine_pb2 as pb
from .client import CallCancelled, CallHandle, EngineClient, EngineError, EngineUnavailable
from .compat import LOGGER_NAME
from .metadata import LoadSpec
from .metrics import Metrics
from .registration import StagingBuffer

log = logging.getLogger(LOGGER_NAME)


def unique_refs(ids: list[int], hashes: list[bytes], groups: list[int] | None = None
                ) -> tuple[list[int], list[bytes], list[int]]:
    """Drops repeated hashes and block ids of a group (first wins): the
    engine refuses a call that names either twice, and one step may batch
    several requests' saves (identical prompts without prefix caching share
    hashes). Block ids and hashes are per KV cache group."""
    grps = groups if groups else [0] * len(ids)
    seen_ids: set[tuple[int, int]] = set()
    seen_hashes: set[tuple[int, bytes]] = set()
    out_ids: list[int] = []
    out_hashes: list[bytes] = []
    out_groups: list[int] = []
    for b, h, g in zip(ids, hashes, grps, strict=False):
        if (g, b) in seen_ids or (g, h) in seen_hashes:
            continue
        seen_ids.add((g, b))
        seen_hashes.add((g, h))
        out_ids.append(b)
        out_hashes.append(h)
        out_groups.append(g)
    return out_ids, out_hashes, out_groups


@dataclasses.dataclass(frozen=True)
class RankTarget:
    """Where one rank's blocks are, as the engine knows them (a snapshot
    taken per call: a re-registration changes bytes_per_block)."""

    instance_id: str  # the engine instance (an MLA rank > 0 has its own)
    rank: int  # the engine rank
    tp_rank: int  # vLLM's, for messages
    staging: StagingBuffer | None
    bases: Sequence[int]  # each layer's base pointer (staging copies)
    bytes_per_block: int

    def chunk(self, n: int) -> int:
        """Blocks per RPC: half the staging slots (saves use the lower half,
        loads the upper), else all of them in one call."""
        return self.staging.slots // 2 if self.staging else max(n, 1)


@dataclasses.dataclass(frozen=True)
class Transfer:
    """The P/D transfer a save belongs to ("" when it belongs to none)."""

    transfer_id: str = ""
    last: bool = False  # these blocks complete the request's transfer
    ready_url: str = ""
    ready_token: str = ""


# (url, transfer id, token, message): tells the router a transfer failed.
ReportFailed = Callable[[str, str, str, str], None]


class BlockIO:
    """Save and Load RPCs of one rank. Stateless between calls."""

    def __init__(self, client: EngineClient, metrics: Metrics, rpc_timeout_s: float,
                 report_failed: ReportFailed) -> None:
        self.client = client
        self.metrics = metrics
        self.timeout_s = rpc_timeout_s
        self.report_failed = report_failed

    def save(self, t: RankTarget, ids: list[int], hashes: list[bytes], tr: Transfer,
             wait_event: bool = False, handle: CallHandle | None = None,
             groups: list[int] | None = None) -> None:
        """Saves blocks `ids` under `hashes`; the transfer's last flag goes
        with the final chunk. A cancelled or engine-less save stops and
        reports the transfer failed; an engine error drops that chunk."""
        chunk = t.chunk(len(ids))
        starts = list(range(0, len(ids), chunk)) or [0]
        for i, lo in enumerate(starts):
            c_ids, c_hashes = ids[lo:lo + chunk], hashes[lo:lo + chunk]
            c_groups = groups[lo:lo + chunk] if groups else [0] * len(c_ids)
            final = i == len(starts) - 1
            if t.staging is not None:
                for slot, (bid, g) in enumerate(zip(c_ids, c_groups, strict=False)):
                    t.staging.copy_in(t.bases, bid, slot, g if groups else None)
                refs = [pb.BlockRef(block_id=slot, hash=h, group=g)
                        for slot, (h, g) in enumerate(zip(c_hashes, c_groups, strict=False))]
            else:
                refs = [pb.BlockRef(block_id=b, hash=h, group=g)
                        for b, h, g in zip(c_ids, c_hashes, c_groups, strict=False)]
            req = pb.SaveRequest(instance_id=t.instance_id, rank=t.rank, blocks=refs,
                                 transfer_id=tr.transfer_id, transfer_last=tr.last and final,
                                 ready_url=tr.ready_url, ready_token=tr.ready_token,
                                 wait_event=wait_event)
            t0 = time.perf_counter()
            try:
                resp = self.client.save(req, self.timeout_s, handle)
            except CallCancelled:
                self.metrics.inc("saves_cancelled_blocks", len(ids) - lo)
                self._report(tr, "P's save was cancelled (its request was preempted and the "
                                 "save did not finish in time)")
                return
            except EngineUnavailable as e:
                self.metrics.inc("saves_dropped", len(ids) - lo or 1)
                self.client.warn_limited("pegaflow: engine went away during a save, %d blocks "
                                         "dropped (rank %d): %s", len(ids) - lo, t.tp_rank, e)
                self._report(tr, f"engine went away during P's save: {e}")
                return
            except EngineError as e:
                self.metrics.inc("saves_dropped", len(c_ids) or 1)
                log.warning("pegaflow: save of %d blocks failed (rank %d): %s", len(c_ids),
                            t.tp_rank, e)
                continue
            self.metrics.inc("save_seconds", time.perf_counter() - t0)
            self.metrics.inc("save_calls")
            self.metrics.inc("blocks_saved", resp.saved)
            self.metrics.inc("bytes_saved", resp.saved * t.bytes_per_block)
            self.metrics.inc("blocks_save_skipped", resp.skipped)
            if resp.failed:
                self.metrics.inc("blocks_save_failed", resp.failed)
                self.client.warn_limited("pegaflow: engine could not store %d blocks (pool full "
                                         "of pinned blocks?)", resp.failed)

    def _report(self, tr: Transfer, message: str) -> None:
        self.report_failed(tr.ready_url, tr.transfer_id, tr.ready_token, message)

    def load(self, t: RankTarget, spec: LoadSpec, lease_owner: bool,
             wait_event: bool = False) -> set[int]:
        """Loads a request's blocks; returns the ids that did not load. The
        lease and transfer go with the final chunk, and only from the rank
        that owns them (lease_owner). wait_event: the engine's copies wait
        for the rank's interprocess event on the GPU."""
        lease = spec.lease_id if lease_owner else ""
        tid = spec.transfer_id if lease_owner else ""
        chunk = t.chunk(len(spec.block_ids))
        failed: set[int] = set()
        n = len(spec.block_ids)
        for lo in range(0, n, chunk):
            ids, hashes = spec.block_ids[lo:lo + chunk], spec.hashes[lo:lo + chunk]
            grps = [spec.group(lo + i) for i in range(len(ids))]
            final = lo + chunk >= n
            if t.staging is not None:
                base = t.staging.slots // 2
                refs = [pb.BlockRef(block_id=base + i, hash=h, group=g)
                        for i, (h, g) in enumerate(zip(hashes, grps, strict=False))]
            else:
                refs = [pb.BlockRef(block_id=b, hash=h, group=g)
                        for b, h, g in zip(ids, hashes, grps, strict=False)]
            req = pb.LoadRequest(instance_id=t.instance_id, rank=t.rank, blocks=refs,
                                 lease_id=lease if final else "", transfer_id=tid if final else "",
                                 wait_event=wait_event)
            t0 = time.perf_counter()
            try:
                resp = self.client.load(req, self.timeout_s)
            except EngineError as e:
                self.metrics.inc("loads_failed")
                self.client.warn_limited("pegaflow: load failed (rank %d), recomputing: %s",
                                         t.tp_rank, e)
                failed.update(spec.block_ids[lo:])
                break
            self.metrics.inc("load_seconds", time.perf_counter() - t0)
            self.metrics.inc("load_calls")
            ok = pb.BlockStatus.BLOCK_STATUS_OK
            for i, (bid, status) in enumerate(zip(ids, resp.status, strict=False)):
                if status != ok:
                    failed.add(bid)
                elif t.staging is not None:
                    t.staging.copy_out(t.bases, t.staging.slots // 2 + i, bid,
                                       grps[i] if spec.groups else None)
            if len(resp.status) < len(ids):
                failed.update(ids[len(resp.status):])
        self.metrics.inc("blocks_loaded", n - len(failed))
        self.metrics.inc("bytes_loaded", (n - len(failed)) * t.bytes_per_block)
        if failed:
            self.metrics.inc("blocks_load_failed", len(failed))
        return failed
