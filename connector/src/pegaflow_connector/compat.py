"""vLLM import guard.

The engine-facing core never imports vLLM or torch. The adapter subclasses
vLLM's real base classes when vLLM is importable and small stand-ins with
the same names otherwise (tests, tools), so one code path serves both.
"""

from __future__ import annotations

import enum
from typing import Any

try:  # pragma: no cover - exercised only where vLLM is installed
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (  # type: ignore
        KVConnectorBase_V1,
        KVConnectorMetadata,
        KVConnectorRole,
    )

    HAVE_VLLM = True
except Exception:  # noqa: BLE001 - ImportError, or a broken vLLM/torch install
    HAVE_VLLM = False

    class KVConnectorRole(enum.Enum):  # type: ignore[no-redef]
        SCHEDULER = 0
        WORKER = 1

    class KVConnectorMetadata:  # type: ignore[no-redef]
        """Stand-in for vLLM's abstract metadata base."""

    class KVConnectorBase_V1:  # type: ignore[no-redef]
        """Stand-in with the bits of vLLM's base class the adapter relies on."""

        def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any = None):
            self._connector_metadata = None
            self._vllm_config = vllm_config
            self._kv_transfer_config = vllm_config.kv_transfer_config
            self._kv_cache_config = kv_cache_config
            self._role = role

        @property
        def role(self) -> Any:
            return self._role

        def bind_connector_metadata(self, connector_metadata: Any) -> None:
            self._connector_metadata = connector_metadata

        def clear_connector_metadata(self) -> None:
            self._connector_metadata = None

        def _get_connector_metadata(self) -> Any:
            assert self._connector_metadata is not None
            return self._connector_metadata

        def has_connector_metadata(self) -> bool:
            return self._connector_metadata is not None

try:  # pragma: no cover
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (  # type: ignore
        KVConnectorHandshakeMetadata,
    )
except Exception:  # noqa: BLE001

    class KVConnectorHandshakeMetadata:  # type: ignore[no-redef]
        """Stand-in for vLLM's handshake metadata base."""


def role_is_scheduler(role: Any) -> bool:
    name = getattr(role, "name", str(role))
    return str(name).upper().endswith("SCHEDULER")
