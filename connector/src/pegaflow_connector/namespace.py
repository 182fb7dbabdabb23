"""The scheduler's namespace: the one the workers registered in, opened on
the engine so that queries can name it.

The scheduler learns the namespace from the workers (vLLM's handshake,
or rank 0's rendezvous file on releases without it, rendezvous.py) and
opens it once per engine connection: a namespace id is only good for the
connection generation it was opened on, and until it is open queries are
skipped (no hit, never a wait).

Threads: `set` and `id` run on vLLM's scheduler thread; the open runs on
the query pool (after `set`) and on the client's connect callback. `_lock`
guards the (namespace, id, generation) triple those threads share; `id`
runs on every ask and reads it without the lock: a read racing a change
sees the state just before it, or skips one query.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from ._proto import engine_pb2 as pb
from .client import EngineClient, EngineError, EngineUnavailable
from .compat import LOGGER_NAME
from .config import ConnectorConfig
from .metrics import Metrics
from .rendezvous import NamespacePoller

log = logging.getLogger(LOGGER_NAME)


class SchedulerNamespace:
    """The namespace the scheduler queries, and its id on the engine."""

    def __init__(self, cfg: ConnectorConfig, client: EngineClient, metrics: Metrics, instance_id: str,
                 *, submit: Callable[[Callable[[], None]], Any], disable: Callable[[str], None]):
        # submit runs the open off vLLM's thread (the query pool); disable
        # is called when rank 0's rendezvous marker says a worker failed.
        self.cfg = cfg
        self.client = client
        self.metrics = metrics
        self._submit = submit
        self._disable = disable
        self._lock = threading.Lock()
        self._ns: pb.Namespace | None = None
        self._ns_id: str | None = None
        self._ns_gen = -1
        self._poller = NamespacePoller(instance_id)
        self.rejected = False

    @property
    def opened_id(self) -> str | None:
        """The id of the last namespace opened (None before), whatever the
        connection: what P/D answers and diagnostics name."""
        return self._ns_id

    def set(self, ns: pb.Namespace) -> None:
        """The namespace the workers registered in (from the handshake)."""
        with self._lock:
            if self._ns is not None and self._ns.SerializeToString(deterministic=True) == \
                    ns.SerializeToString(deterministic=True):
                return
            self._ns, self._ns_id, self._ns_gen = ns, None, -1
        if self.client.connected:
            self._submit(self.open)

    def on_connect(self, _client: EngineClient) -> None:
        self.open()

    def open(self) -> None:
        """Opens the namespace on the current connection (an RPC: never on
        vLLM's thread)."""
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
            self._report_error(e)
            return
        with self._lock:
            if self._ns is ns:
                self._ns_id, self._ns_gen, self.rejected = ns_id, gen, False
        log.info("pegaflow: scheduler uses namespace %s", ns_id)

    def _report_error(self, e: EngineError) -> None:
        import grpc

        if e.code == grpc.StatusCode.FAILED_PRECONDITION:
            self.metrics.inc("namespace_rejected")
            self.rejected = True
            log.error("pegaflow: ENGINE REJECTED THIS INSTANCE'S NAMESPACE: %s. Block hashes "
                      "of this instance cannot match the others sharing the namespace (check "
                      "PYTHONHASHSEED, the hash algorithm and the block size on every P and D). "
                      "Cache lookups are disabled until this is fixed.", e.details)
        else:
            log.error("pegaflow: open namespace failed: %s", e)

    def id(self) -> str | None:
        """The namespace to query, or None while unknown (queries skipped)."""
        ns_id, gen = self._ns_id, self._ns_gen
        if ns_id is not None and gen == self.client.generation and self.client.connected:
            return ns_id
        if self._ns is None:
            # No handshake (older vLLM): rank 0's rendezvous file.
            ns = self._poller.poll()
            if self._poller.disabled:
                self._disable(self._poller.disabled)
            if ns is not None:
                self.set(ns)
        return None
