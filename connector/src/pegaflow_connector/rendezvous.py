"""How the scheduler learns the namespace its workers registered in.

The namespace key includes the KV layout, which only workers know (they
see the caches). Two channels carry it from the workers to the scheduler:

- vLLM's handshake metadata: every rank returns a `PegaHandshake` from
  `get_handshake_metadata`; vLLM hands all of them to the scheduler's
  `set_xfer_handshake_metadata`, which takes rank 0's namespace.
- a rendezvous file, for vLLM releases without the handshake hooks (see
  compat.py): rank 0 publishes its namespace after every registration in
  `$TMPDIR/pegaflow-ns-<uid>/<instance>.pb` (written atomically), and the
  scheduler polls that file, at most once a second, while it knows no
  namespace.

Until either arrives the scheduler answers "no hit".
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Iterable

from ._proto import engine_pb2 as pb
from .metadata import PegaHandshake

log = logging.getLogger("pegaflow_connector")

POLL_INTERVAL_S = 1.0


def namespace_file(instance_id: str) -> str:
    """Rendezvous file where rank 0 publishes its namespace for the
    scheduler (fallback for vLLM releases without the handshake hook)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in instance_id)
    return os.path.join(tempfile.gettempdir(), f"pegaflow-ns-{os.getuid()}", safe + ".pb")


def publish_namespace(instance_id: str, ns: pb.Namespace) -> None:
    """Rank 0's side: write the namespace atomically (tmp + rename), so a
    reader never parses a torn file. Failures are logged, not raised: the
    handshake may still deliver the namespace."""
    path = namespace_file(instance_id)
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(ns.SerializeToString(deterministic=True))
        os.replace(tmp, path)
    except OSError as e:
        log.debug("pegaflow: cannot publish namespace to %s: %s", path, e)


class NamespacePoller:
    """The scheduler's side of the file: reads it at most once per
    POLL_INTERVAL_S. Not thread-safe; called on the scheduler thread."""

    def __init__(self, instance_id: str):
        self.instance_id = instance_id
        self._checked = 0.0

    def poll(self) -> pb.Namespace | None:
        """The published namespace, or None (not due yet, absent, torn)."""
        now = time.monotonic()
        if now - self._checked < POLL_INTERVAL_S:
            return None
        self._checked = now
        try:
            with open(namespace_file(self.instance_id), "rb") as f:
                data = f.read()
        except OSError:
            return None
        ns = pb.Namespace()
        try:
            ns.ParseFromString(data)
        except Exception:  # noqa: BLE001 - a torn write; try again later
            return None
        return ns


def handshake(ns: pb.Namespace, namespace_id: str, rank: int) -> PegaHandshake:
    """A worker's handshake metadata: its namespace, serialized."""
    return PegaHandshake(ns.SerializeToString(deterministic=True), namespace_id, rank)


def namespace_from_handshakes(metas: Iterable[object]) -> pb.Namespace | None:
    """The lowest rank's namespace among the workers' handshakes (other
    connectors' metadata is ignored), or None if there is none."""
    ours = sorted((m for m in metas if isinstance(m, PegaHandshake)), key=lambda m: m.rank)
    if not ours:
        return None
    ns = pb.Namespace()
    ns.ParseFromString(ours[0].namespace)
    return ns
