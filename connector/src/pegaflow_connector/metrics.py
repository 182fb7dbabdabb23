"""Process-local counters of the connector.

Kept dependency-free: vLLM exposes connector stats its own way, and the
harness/bench read them directly. Names are documented in the README.
"""

from __future__ import annotations

import threading


class Metrics:
    """Thread-safe monotonic counters."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._c: dict[str, float] = {}

    def inc(self, name: str, n: float = 1) -> None:
        with self._lock:
            self._c[name] = self._c.get(name, 0) + n

    def get(self, name: str) -> float:
        with self._lock:
            return self._c.get(name, 0)

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self._c)
