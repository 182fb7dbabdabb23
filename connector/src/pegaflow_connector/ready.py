"""Reports a transfer as failed to the router's /kv_ready when the engine cannot.

Normally the engine tells the router that a P/D transfer is ready or failed.
When the engine itself is gone (crashed, restarting, unreachable), nobody
would, and the router would wait its whole --kv-ready-timeout before
decoding anyway. The P worker knows its save was dropped, so it reports the
failure itself and D starts recomputing at once.
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.error
import urllib.request
from collections import OrderedDict

from .compat import LOGGER_NAME

log = logging.getLogger(LOGGER_NAME)

# Transfers already reported by this worker (a transfer's blocks may be
# saved over several steps; one report is enough). Bounded: old ids go.
_REMEMBERED = 4096


class FailureReporter:
    """Posts {"transfer_id", "token", "status": "failed", "message"} once per transfer."""

    def __init__(self, timeout_s: float = 2.0) -> None:
        self._timeout_s = timeout_s
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def report(self, url: str, transfer_id: str, token: str, message: str) -> bool:
        """Sends the report; returns whether the router accepted it.

        Called on the worker's save thread, never on vLLM's loop, and bounded
        by the timeout. Without a URL or token (sync handoff, old router)
        there is nobody to tell.
        """
        if not url or not token or not transfer_id:
            return False
        with self._lock:
            if transfer_id in self._seen:
                return False
            self._seen[transfer_id] = None
            while len(self._seen) > _REMEMBERED:
                self._seen.popitem(last=False)
        body = json.dumps({"transfer_id": transfer_id, "token": token, "status": "failed",
                           "message": message}).encode()
        req = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self._timeout_s) as resp:
                return bool(200 <= resp.status < 300)
        except (urllib.error.URLError, OSError, ValueError) as e:
            log.warning("pegaflow: could not report failed transfer %s to %s: %s", transfer_id, url, e)
            return False
