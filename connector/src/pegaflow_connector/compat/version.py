"""The vLLM releases the connector supports, and the start-up refusal.

scripts/vllm-compat reads MIN_VLLM from this file (by `ast`) and checks
every release up to NEWEST_CHECKED_VLLM against the connector's class.
"""

from __future__ import annotations

import re
from typing import Any

from .classes import VLLM_IMPORT_ERROR, VLLM_INSTALLED

# The oldest vLLM the connector runs on, and why (checked against each
# release's wheel by scripts/vllm-compat): 0.11.1 is the first release
# with get_block_ids_with_load_errors (a block the engine cannot deliver
# is recomputed instead of read as garbage), the kv_cache_config
# constructor argument and the worker -> scheduler handshake hooks;
# `None` from get_num_new_matched_tokens is tolerated since 0.10.2 and
# Request.block_hashes exists since 0.10.1. scripts/vllm-compat also checks
# every release up to NEWEST_CHECKED_VLLM against our class.
MIN_VLLM = (0, 11, 1)
NEWEST_CHECKED_VLLM = (0, 33, 0)
MIN_VLLM_WHY = ("it is the first release where a connector can report blocks it failed to load "
                "(get_block_ids_with_load_errors), so that vLLM recomputes them")
# Set to 0 to start on a vLLM this module refuses (e.g. a source build
# whose version string is not a release number); unsupported, at your risk.
VLLM_CHECK_ENV = "PEGAFLOW_CONNECTOR_VLLM_CHECK"


class UnsupportedVLLM(RuntimeError):
    """This vLLM cannot run the connector; the message says why and what to do."""


def release_tuple(version: str) -> tuple[int, ...]:
    """(major, minor, patch) of a vLLM version string: "0.11.1",
    "0.12.0rc1", "0.11.1.dev42+g1234.cu128" -> (0, 11, 1); () when the
    string does not start with a release number. Pre-releases and dev
    builds count as their release (a dev build of main is newer than the
    last release, never older than the one it leads to)."""
    m = re.match(r"\s*v?(\d+)\.(\d+)(?:\.(\d+))?", version or "")
    if m is None:
        return ()
    return tuple(int(x) for x in m.groups(default="0"))


def vllm_version() -> str | None:
    """vllm.__version__, or None where vLLM is not installed."""
    if not VLLM_INSTALLED:
        return None
    try:
        import vllm  # type: ignore

        return str(getattr(vllm, "__version__", "") or "")
    except Exception as e:  # noqa: BLE001
        return f"unimportable ({type(e).__name__}: {e})"


def unsupported_vllm_reason(version: str | None, import_error: str = "") -> str | None:
    """Why this vLLM cannot run the connector, or None when it can (or
    when vLLM is absent: tests and tools use the stand-ins)."""
    if version is None:
        return None
    oldest = ".".join(map(str, MIN_VLLM))
    rel = release_tuple(version)
    if not rel:
        return (f"vLLM version {version!r} is not a release number, so the connector cannot tell "
                f"whether it is at least {oldest}; set {VLLM_CHECK_ENV}=0 to start anyway")
    if rel < MIN_VLLM:
        return (f"vLLM {version} is older than {oldest}, the oldest release the connector supports "
                f"({MIN_VLLM_WHY}); upgrade vLLM")
    if import_error:
        return (f"vLLM {version} is installed but its KV connector API "
                f"(vllm.distributed.kv_transfer.kv_connector.v1.base) cannot be imported: "
                f"{import_error}")
    return None


def require_supported_vllm(env: Any = None) -> None:
    """Raises UnsupportedVLLM, with one clear message, on a vLLM the
    connector does not support; called when vLLM builds the connector."""
    import os

    env = os.environ if env is None else env
    if str(env.get(VLLM_CHECK_ENV, "1")).strip().lower() in ("0", "false", "no", "off"):
        return
    reason = unsupported_vllm_reason(vllm_version(), VLLM_IMPORT_ERROR)
    if reason is not None:
        raise UnsupportedVLLM(f"pegaflow connector: {reason}. (Without the connector, remove "
                              f"--kv-transfer-config.)")
