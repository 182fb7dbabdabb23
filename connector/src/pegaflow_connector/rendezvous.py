"""How the scheduler learns the namespace its workers registered in.

The namespace key includes the KV layout, which only workers know (they
see the caches). Two channels carry it from the workers to the scheduler:

- vLLM's handshake metadata: every rank returns a `PegaHandshake` from
  `get_handshake_metadata`; vLLM hands all of them to the scheduler's
  `set_xfer_handshake_metadata`, which takes rank 0's namespace.
- a rendezvous file, for vLLM releases without the handshake hooks (see
  compat/classes.py): rank 0 publishes its namespace after every registration in
  `$TMPDIR/pegaflow-ns-<uid>/<instance>.pb` (written atomically), and the
  scheduler polls that file, at most once a second, while it knows no
  namespace.

Until either arrives the scheduler answers "no hit".

Both channels also carry a rank's failure to start: its handshake has
`disabled` set, and it writes a marker file next to the namespace file
(`<instance>.disabled-r<rank>`, removed when that rank registers again), so
the scheduler stops planning saves and loads for an instance that cannot
serve them.
"""

from __future__ import annotations

import glob
import logging
import os
import tempfile
import time
from collections.abc import Iterable

from ._proto import engine_pb2 as pb
from .compat import LOGGER_NAME
from .metadata import PegaHandshake

log = logging.getLogger(LOGGER_NAME)

POLL_INTERVAL_S = 1.0


def _base(instance_id: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in instance_id)
    return os.path.join(tempfile.gettempdir(), f"pegaflow-ns-{os.getuid()}", safe)


def namespace_file(instance_id: str) -> str:
    """Rendezvous file where rank 0 publishes its namespace for the
    scheduler (fallback for vLLM releases without the handshake hook)."""
    return _base(instance_id) + ".pb"


def disabled_file(instance_id: str, rank: int) -> str:
    """Marker a rank whose connector could not start leaves for the scheduler."""
    return f"{_base(instance_id)}.disabled-r{rank}"


def _write_atomic(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def publish_disabled(instance_id: str, rank: int, reason: str) -> None:
    """A failed rank's side; errors are logged (the handshake also tells)."""
    try:
        _write_atomic(disabled_file(instance_id, rank), reason.encode(errors="replace"))
    except OSError as e:
        log.debug("pegaflow: cannot publish disabled marker: %s", e)


def clear_disabled(instance_id: str, rank: int) -> None:
    """A rank that starts (again) removes its stale marker."""
    try:
        os.unlink(disabled_file(instance_id, rank))
    except OSError:
        pass


def disabled_reason(instance_id: str) -> str | None:
    """The first failed rank's reason, or None when no rank left a marker."""
    pattern = glob.escape(_base(instance_id)) + ".disabled-r*"
    for path in sorted(glob.glob(pattern)):
        try:
            with open(path, "rb") as f:
                return f"rank {path.rsplit('-r', 1)[-1]}: {f.read().decode(errors='replace')}"
        except OSError:
            continue
    return None


def publish_namespace(instance_id: str, ns: pb.Namespace) -> None:
    """Rank 0's side: write the namespace atomically (tmp + rename), so a
    reader never parses a torn file. Failures are logged, not raised: the
    handshake may still deliver the namespace."""
    path = namespace_file(instance_id)
    try:
        _write_atomic(path, ns.SerializeToString(deterministic=True))
    except OSError as e:
        log.debug("pegaflow: cannot publish namespace to %s: %s", path, e)


class NamespacePoller:
    """The scheduler's side of the file: reads it at most once per
    POLL_INTERVAL_S. Not thread-safe; called on the scheduler thread."""

    def __init__(self, instance_id: str):
        self.instance_id = instance_id
        self._checked = 0.0
        self.disabled: str | None = None

    def poll(self) -> pb.Namespace | None:
        """The published namespace, or None (not due yet, absent, torn).
        A rank's disabled marker, if any, is left in `self.disabled`."""
        now = time.monotonic()
        if now - self._checked < POLL_INTERVAL_S:
            return None
        self._checked = now
        self.disabled = disabled_reason(self.instance_id)
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
    ours = sorted((m for m in metas if isinstance(m, PegaHandshake) and m.namespace),
                  key=lambda m: m.rank)
    if not ours:
        return None
    ns = pb.Namespace()
    ns.ParseFromString(ours[0].namespace)
    return ns


def disabled_from_handshakes(metas: Iterable[object]) -> str | None:
    """The lowest failed rank's reason among the handshakes, or None."""
    failed = sorted((m for m in metas if isinstance(m, PegaHandshake)
                     and getattr(m, "disabled", "")), key=lambda m: m.rank)
    return f"rank {failed[0].rank}: {failed[0].disabled}" if failed else None
