"""vLLM's config objects: attributes some releases lack or shaped differently.

KVTransferConfig, CacheConfig (the prefix-caching hash and its seed) and
ParallelConfig (DP, DCP/PCP, TP rank); each helper says which releases
differ and what the fallback is.
"""

from __future__ import annotations

import re
from typing import Any

from .classes import HAVE_VLLM


def kv_connector_extra_config(kv_transfer_config: Any) -> dict[str, Any]:
    """KVTransferConfig.kv_connector_extra_config; None (or, in early V1
    releases and stand-ins, missing) means no extra keys."""
    extra = getattr(kv_transfer_config, "kv_connector_extra_config", None)
    return dict(extra or {})


def kv_engine_id(kv_transfer_config: Any) -> Any:
    """KVTransferConfig.engine_id: None where unset or, before the NIXL
    connector added it (vLLM 0.9), missing."""
    return getattr(kv_transfer_config, "engine_id", None)


def kv_load_failure_policy(kv_transfer_config: Any) -> str | None:
    """KVTransferConfig.kv_load_failure_policy ("fail" or "recompute"),
    added by vllm PR #26813 (Oct 2025; default "fail" since PR #34896, Feb
    2026); None on releases without the setting."""
    return getattr(kv_transfer_config, "kv_load_failure_policy", None)


def prefix_caching_hash_algo(cache_config: Any) -> str:
    """CacheConfig.prefix_caching_hash_algo; releases before it (vLLM < 0.9)
    hash with sha256 when they hash reproducibly at all."""
    return str(getattr(cache_config, "prefix_caching_hash_algo", "sha256") or "sha256")


# vLLM's DEFAULT_NONE_HASH_SEED (vllm/v1/core/kv_cache_utils.py, 0.32+).
DEFAULT_NONE_HASH_SEED = "vllm-none-hash"
_NON_CRYPTO_HASH_ALGOS = frozenset({"xxhash", "xxhash_cbor"})


def resolved_hash_seed(hash_algo: str, env: Any = None) -> str | None:
    """The seed vLLM derives NONE_HASH (the root of every block-hash chain)
    from, or None when it is random per process (nothing shareable).

    Mirrors vLLM's resolve_none_hash_seed (0.32, 0.33): PYTHONHASHSEED if
    set; else the fixed DEFAULT_NONE_HASH_SEED for sha256/sha256_cbor and
    fresh random bytes for xxhash/xxhash_cbor. Releases without
    resolve_none_hash_seed seeded NONE_HASH randomly whenever
    PYTHONHASHSEED was unset. Computed rather than read from vLLM: the
    scheduler connector is built before vLLM calls init_none_hash, and
    workers never call it.
    """
    import os

    env = os.environ if env is None else env
    seed = env.get("PYTHONHASHSEED")
    if seed is not None:
        return str(seed)
    if hash_algo in _NON_CRYPTO_HASH_ALGOS or not _vllm_has_default_seed():
        return None
    return DEFAULT_NONE_HASH_SEED


def _vllm_has_default_seed() -> bool:
    if not HAVE_VLLM:
        return True  # stand-ins follow current vLLM
    try:  # pragma: no cover - only where vLLM is installed
        from vllm.v1.core import kv_cache_utils  # type: ignore

        return hasattr(kv_cache_utils, "resolve_none_hash_seed")
    except Exception:  # noqa: BLE001
        return True


def data_parallel_rank(parallel_config: Any, engine_id: Any = None) -> int | None:
    """This engine's DP rank, or None without data parallelism.

    ParallelConfig.data_parallel_rank is reset to 0 for dense models run as
    independent DP ranks (reconfigure_for_independent_dp_rank, 2026), which
    keep the rank in data_parallel_index; releases before that field have
    only data_parallel_rank. vLLM also appends `_dp<rank>` to
    kv_transfer_config.engine_id whenever DP is on (every V1 release with
    DP), which is the one signal left for rank 0 of a dense DP group.
    """
    size = int(getattr(parallel_config, "data_parallel_size", 1) or 1)
    rank = getattr(parallel_config, "data_parallel_index", None)
    if not isinstance(rank, int):
        rank = int(getattr(parallel_config, "data_parallel_rank", 0) or 0)
    tagged = isinstance(engine_id, str) and re.search(r"_dp\d+$", engine_id) is not None
    if size > 1 or rank > 0 or tagged:
        return rank
    return None


def context_parallel_sizes(parallel_config: Any) -> tuple[int, int]:
    """(decode, prefill) context-parallel sizes; 1 on releases without
    DCP (before 0.11) or PCP (before 0.12)."""
    dcp = int(getattr(parallel_config, "decode_context_parallel_size", 1) or 1)
    pcp = int(getattr(parallel_config, "prefill_context_parallel_size", 1) or 1)
    return dcp, pcp


def tensor_parallel_rank() -> int | None:
    """This worker's TP rank from vLLM's parallel state, or None outside a
    vLLM worker (tests, tools) or where the import path differs (the
    module has lived at vllm.distributed.parallel_state throughout V1)."""
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank  # type: ignore

        return int(get_tensor_model_parallel_rank())
    except Exception:  # noqa: BLE001 - not in a vLLM worker (tests, tools)
        return None
