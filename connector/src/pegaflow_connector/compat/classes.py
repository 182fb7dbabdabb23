"""vLLM's connector base classes, or stand-ins with the same names.

When vLLM is importable the adapter subclasses its real classes; where vLLM
is not installed at all (tests, tools) it subclasses the small stand-ins
below, so one code path serves both. vLLM installed but its connector API
not importable is remembered (VLLM_IMPORT_ERROR) and refused at start-up
(version.require_supported_vllm). Each class says which releases brought it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any


def _vllm_installed() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("vllm") is not None
    except Exception:  # noqa: BLE001 - a broken vllm package is still "installed"
        return True


VLLM_INSTALLED = _vllm_installed()
# Why vLLM's connector API could not be imported although vLLM is
# installed ("" otherwise): the connector then refuses to start.
VLLM_IMPORT_ERROR = ""

try:  # pragma: no cover - exercised only where vLLM is installed
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (  # type: ignore
        KVConnectorBase_V1,
        KVConnectorMetadata,
        KVConnectorRole,
    )

    HAVE_VLLM = True
except Exception as _e:  # noqa: BLE001 - ImportError, or a broken vLLM/torch install
    # No vLLM at all: the stand-ins below serve tests and tools. vLLM
    # installed but its API not importable (broken install, a release that
    # moved it): remembered, and the connector refuses to start with it
    # (require_supported_vllm) rather than run on stand-ins.
    HAVE_VLLM = False
    if VLLM_INSTALLED:
        VLLM_IMPORT_ERROR = f"{type(_e).__name__}: {_e}"

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

# SupportsHMA (base.py, with request_finished_all_groups) came with the
# hybrid KV cache manager's connector support (0.10.2/0.11): a connector
# without it gets the hybrid allocator switched off, so Mamba hybrids fail
# to start and sliding-window models lose KV capacity. The stand-in is a
# plain mixin (nothing checks it without vLLM).
try:  # pragma: no cover
    from vllm.distributed.kv_transfer.kv_connector.v1.base import SupportsHMA  # type: ignore
except Exception:  # noqa: BLE001

    class SupportsHMA:  # type: ignore[no-redef]
        """Stand-in for vLLM's hybrid-allocator marker base."""


# KVConnectorHandshakeMetadata came with the worker -> scheduler handshake
# hooks (get_handshake_metadata / set_xfer_handshake_metadata, second half
# of 2025, in 0.12 at the latest); older releases lack the class, never call
# the hooks, and the namespace then travels through the rendezvous file
# only (rendezvous.py).
try:  # pragma: no cover
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (  # type: ignore
        KVConnectorHandshakeMetadata,
    )
except Exception:  # noqa: BLE001

    class KVConnectorHandshakeMetadata:  # type: ignore[no-redef]
        """Stand-in for vLLM's handshake metadata base."""


# KVConnectorTransferResults and get_transfer_results (base.py, vLLM 0.32):
# receive failures reported per request (failed_recving). vLLM 0.32 raises
# on block-id load-error reports for models with several KV cache groups
# (block ids are per group), so hybrids must report this way; releases
# without it take block ids only (PER_REQUEST_LOAD_FAILURES False). Without
# vLLM (tests, tools) the stand-in behaves like 0.32.
try:  # pragma: no cover
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (  # type: ignore
        KVConnectorTransferResults,
    )

    PER_REQUEST_LOAD_FAILURES = True
except Exception:  # noqa: BLE001
    import dataclasses as _dc

    PER_REQUEST_LOAD_FAILURES = not VLLM_INSTALLED

    @_dc.dataclass
    class KVConnectorTransferResults:  # type: ignore[no-redef]
        """Stand-in for vLLM 0.32's transfer results."""

        finished_sending: set[str] = _dc.field(default_factory=set)
        finished_recving: set[str] = _dc.field(default_factory=set)
        failed_recving: set[str] = _dc.field(default_factory=set)


def init_connector_base(base_init: Callable[..., None], vllm_config: Any, role: Any,
                        kv_cache_config: Any) -> None:
    """Calls KVConnectorBase_V1.__init__ (bound, as `super().__init__`).

    vLLM made kv_cache_config an explicit constructor argument in late 2025
    (vllm PR #27887, 0.11.1/0.12); earlier releases take only
    (vllm_config, role) and raise TypeError for the third argument.
    """
    try:
        base_init(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
    except TypeError:  # vLLM releases before kv_cache_config
        base_init(vllm_config=vllm_config, role=role)


def role_is_scheduler(role: Any) -> bool:
    """KVConnectorRole.SCHEDULER, compared by name: the enum is vLLM's or the
    stand-in above, and some callers pass the role's name as a string."""
    name = getattr(role, "name", str(role))
    return str(name).upper().endswith("SCHEDULER")
