"""The scheduler's query pool: the engine calls vLLM's scheduler thread must
never wait for (Query RPCs, lease and transfer releases, namespace opens),
run on a small thread pool.

A query's answer is `QueryResult` (hit blocks, lease, blocks in flight),
asked for a `QueryKey` (start block, usable blocks, engine session); the
per-request memo of those answers lives in reqstate.py (`QueryMemo`) and is
driven by scheduler.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ._proto import engine_pb2 as pb
from .client import EngineClient, EngineError, EngineUnavailable
from .compat import LOGGER_NAME, hash_bytes
from .config import ConnectorConfig
from .metrics import Metrics

log = logging.getLogger(LOGGER_NAME)

# (start block, usable blocks, engine session generation): what was asked.
QueryKey = tuple[int, int, int]
# (blocks hit from the start block, lease id, blocks still in flight).
QueryResult = tuple[int, str, int]

_HAS_PACKED = "packed_hashes" in pb.QueryRequest.DESCRIPTOR.fields_by_name


class QueryPool:
    """Runs the scheduler's engine calls off vLLM's thread. Thread-safe;
    never raises from a call it runs (engine trouble is counted)."""

    def __init__(self, cfg: ConnectorConfig, client: EngineClient, metrics: Metrics,
                 workers: int = 8, first_block: bool = False) -> None:
        self.cfg = cfg
        # Hybrid namespaces: name the start block (QueryRequest.first_block,
        # chunked-local groups depend on it); one-group queries stay as they were.
        self.first_block = first_block
        self.client = client
        self.metrics = metrics
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pegaflow-sched")

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        return self._pool.submit(fn, *args)

    def query_async(self, ns_id: str, hashes: list[Any], start: int, usable: int,
                    transfer_id: str, wait_ms: int, source_engine: str = "") -> Future[Any]:
        """`query` on the pool."""
        return self._pool.submit(self.query, ns_id, hashes, start, usable, transfer_id, wait_ms,
                                 source_engine)

    def query(self, ns_id: str, hashes: list[Any], start: int, usable: int, transfer_id: str,
              wait_ms: int, source_engine: str = "") -> QueryResult | None:
        """One Query RPC for hashes[start:usable], with a lease; None on
        failure. wait_ms: how long the engine may wait for transfer_id;
        source_engine: P's engine, from which ours fetches what it lacks."""
        hs = [hash_bytes(h) for h in hashes[start:usable]]
        req = pb.QueryRequest(namespace_id=ns_id, wait_ms=wait_ms, lease=True,
                              lease_ttl_ms=self.cfg.lease_ttl_ms, transfer_id=transfer_id,
                              source_engine=source_engine)
        if self.first_block:
            req.first_block = start
        fill_hashes(req, hs)
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

    def release(self, lease_id: str = "", transfer_id: str = "") -> None:
        """Gives a lease or a transfer back, on the pool (nothing to do
        while disconnected: the engine expires both)."""
        if not self.client.connected:
            return

        def run() -> None:
            try:
                self.client.release(lease_id=lease_id, transfer_id=transfer_id)
            except EngineError:
                pass  # expired or engine gone: nothing is pinned any more

        self._pool.submit(run)

    def release_result(self, fut: Future[Any]) -> None:
        """A done-callback: gives back the lease of a query nobody takes."""
        try:
            res = fut.result()
        except Exception:  # noqa: BLE001
            return
        if res and res[1]:
            self.release(lease_id=res[1])

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def future_result(fut: Future[Any]) -> QueryResult | None:
    try:
        res: QueryResult | None = fut.result()
        return res
    except Exception as e:  # noqa: BLE001 - QueryPool.query catches engine errors itself
        log.warning("pegaflow: query failed: %s", e)
        return None


def accepts(asked: QueryKey, key: QueryKey, result: QueryResult | None, prefetch: bool) -> bool:
    """Whether a finished query answers the question `key`: the same one,
    or (a prefetch from block 0) the same blocks and session with a local
    prefix that ends within the hit, so the hit's continuation is exact."""
    if asked == key:
        return True
    if not prefetch or result is None or asked[1:] != key[1:]:
        return False
    return asked[0] <= key[0] <= asked[0] + result[0]


def fill_hashes(req: pb.QueryRequest, hs: list[bytes]) -> None:
    """Packed form when the API has it and every hash has one length: one
    bytes field instead of one per hash (cheaper to encode and decode)."""
    if hs and _HAS_PACKED and len(hs) > 1 and all(len(h) == len(hs[0]) for h in hs):
        req.packed_hashes = b"".join(hs)
        req.hash_len = len(hs[0])
    else:
        req.hashes.extend(hs)
