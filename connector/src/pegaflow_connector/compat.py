"""Every vLLM-version difference the connector tolerates, in one place.

The engine-facing core never imports vLLM or torch. The adapter subclasses
vLLM's real base classes when vLLM is importable and small stand-ins with
the same names where vLLM is not installed at all (tests, tools), so one
code path serves both. Supported: vLLM MIN_VLLM (0.11.1) to
NEWEST_CHECKED_VLLM (0.33.0), checked per release by scripts/vllm-compat;
the connector refuses to start on an older vLLM, or on one whose API
cannot be imported (require_supported_vllm). Fallbacks below for releases
older than 0.11.1 predate the range; they are kept because they are cheap.

The rest of the package imports vLLM symbols, and reads attributes whose
presence or shape differs between vLLM releases, only through this module.
Each workaround below says which releases need it and why; the connector
is written against vLLM main of 2026 (0.33), and every fallback degrades to
what that release does. Attributes every release has (`request_id`,
`num_tokens`, `scheduled_new_reqs`, ...) are read directly by the cores.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Collection, Iterable
from typing import Any

# Our lines go through vLLM's logger: vLLM configures the "vllm" logger
# (handler, format, VLLM_LOGGING_LEVEL) and children propagate to it, so
# the connector's messages land in vLLM's log like its own connectors'.
LOGGER_NAME = "vllm.pegaflow_connector"

# ---------------------------------------------------------------- version range

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


# KVConnectorStats / KVConnectorPromMetrics (v1/metrics.py) came with the
# connector stats hooks (get_kv_connector_stats, build_kv_connector_stats,
# build_prom_metrics; NIXL's stats, 0.10/0.11). Stand-ins keep the stats
# class usable without vLLM (tests); without vLLM nothing calls the hooks.
try:  # pragma: no cover
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (  # type: ignore
        KVConnectorPromMetrics,
        KVConnectorStats,
    )
except Exception:  # noqa: BLE001
    import dataclasses as _dc

    @_dc.dataclass
    class KVConnectorStats:  # type: ignore[no-redef]
        """Stand-in for vLLM's stats base (a dataclass with `data`)."""

        data: dict[str, Any] = _dc.field(default_factory=dict)

    class KVConnectorPromMetrics:  # type: ignore[no-redef]
        """Stand-in for vLLM's per-connector Prometheus base."""

        def __init__(self, vllm_config: Any, metric_types: dict[Any, Any], labelnames: list[str],
                     per_engine_labelvalues: dict[int, list[object]]):
            self._kv_transfer_config = vllm_config.kv_transfer_config
            self._counter_cls = next((v for k, v in metric_types.items()
                                      if getattr(k, "__name__", "") == "Counter"), None)
            self._labelnames = labelnames
            self.per_engine_labelvalues = per_engine_labelvalues


# CacheHitSource (vllm/v1/metrics/cache_hit_source.py, 2026) labels where
# external hits came from; releases before it never call
# get_external_cache_hit_sources, and the stand-in keeps the value.
try:  # pragma: no cover
    from vllm.v1.metrics.cache_hit_source import CacheHitSource  # type: ignore
except Exception:  # noqa: BLE001

    class CacheHitSource(str, enum.Enum):  # type: ignore[no-redef]
        HOST = "host"


def prom_counter_cls(prom: Any, metric_types: dict[Any, Any]) -> Any:
    """The Counter class vLLM hands build_prom_metrics (Ray wraps them)."""
    cls = getattr(prom, "_counter_cls", None)
    if cls is None:
        cls = next(v for k, v in metric_types.items() if getattr(k, "__name__", "") == "Counter")
    return cls


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


# ---------------------------------------------------------------- config objects


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


# KVCacheSpec classes whose blocks hold every token's KV for good (what a
# hash-addressed store can serve). Exact names: subclasses such as RSWASpec
# or SinkFullAttentionSpec evict or add blocks and count as other kinds.
_FULL_ATTENTION_SPECS = frozenset({"FullAttentionSpec", "MLAAttentionSpec"})
_SPEC_KINDS = {"SlidingWindowSpec": "sliding_window", "SlidingWindowMLASpec": "sliding_window",
               "ChunkedLocalAttentionSpec": "chunked_local", "MambaSpec": "mamba"}


def _spec_kind(spec: Any) -> str:
    name = type(spec).__name__
    if name == "UniformTypeKVCacheSpecs":  # one group of same-kind layers
        kinds = {_spec_kind(s) for s in (getattr(spec, "kv_cache_specs", None) or {}).values()}
        return kinds.pop() if len(kinds) == 1 else "mixed"
    if name in _FULL_ATTENTION_SPECS:
        return "full_attention"
    return _SPEC_KINDS.get(name, name.removesuffix("Spec").lower() or "unknown")


def kv_cache_groups(kv_cache_config: Any) -> list[tuple[str, int, list[str], bool]] | None:
    """(kind, block_size, layer names, transferable) per KVCacheConfig
    group, in vLLM's group order (the order of per-group block-id lists);
    None where vLLM passed no KVCacheConfig (releases before PR #27887, or
    tools): then there is one group holding every layer. `kind` is
    "full_attention", "sliding_window", "chunked_local", "mamba" or the
    spec's class name; `transferable` is KVCacheGroupSpec.enable_kv_transfer
    (2026; False for replicas vLLM rebuilds after a load, True before)."""
    groups = getattr(kv_cache_config, "kv_cache_groups", None)
    if not groups:
        return None
    out = []
    for g in groups:
        spec = g.kv_cache_spec
        out.append((_spec_kind(spec), int(getattr(spec, "block_size", 0) or 0),
                    list(g.layer_names), bool(getattr(g, "enable_kv_transfer", True))))
    return out


def kv_cache_num_blocks(kv_cache_config: Any) -> int | None:
    """KVCacheConfig.num_blocks, or None where vLLM passed no KVCacheConfig
    (releases before PR #27887, see init_connector_base): layout detection
    then takes the block count from the tensors."""
    return getattr(kv_cache_config, "num_blocks", None)


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


# ---------------------------------------------------------------- requests


def hash_bytes(h: Any) -> bytes:
    """One block hash as bytes.

    vLLM's BlockHash is bytes since vllm PR #23673 (0.10.2/0.11, Sep 2025);
    earlier releases used the BlockHashType named tuple with an int
    `hash_value` (V1 before that), or plain ints; ints become 32 big-endian
    bytes so that the engine sees one width.
    """
    if isinstance(h, bytes):
        return h
    if isinstance(h, (bytearray, memoryview)):
        return bytes(h)
    v = getattr(h, "hash_value", h)
    if isinstance(v, bytes):
        return v
    if isinstance(v, int):
        return (v & ((1 << 256) - 1)).to_bytes(32, "big")
    raise TypeError(f"unsupported block hash {type(h).__name__}")


def request_block_hashes(request: Any) -> list[Any]:
    """Request.block_hashes (one per full block). vLLM moved them from the
    KV cache manager onto Request in vllm PR #19728 (0.10, mid 2025); on
    earlier releases a connector cannot see them, so nothing is queried or
    saved."""
    hs = getattr(request, "block_hashes", None)
    return hs if hs is not None else []


def kv_transfer_params(request: Any) -> dict[str, Any]:
    """Request.kv_transfer_params, the client's P/D parameters; requests of
    releases before P/D support (vLLM < 0.9) have no such attribute, and
    requests without parameters carry None."""
    return getattr(request, "kv_transfer_params", None) or {}


def num_prompt_tokens(request: Any) -> int:
    """Request.num_prompt_tokens, else len(prompt_token_ids) for request
    objects without the property (early V1 requests and stand-ins)."""
    n = getattr(request, "num_prompt_tokens", None)
    if n is None:
        n = len(getattr(request, "prompt_token_ids", None) or [])
    return int(n)


def num_publishable_block_hashes(request: Any) -> int | None:
    """Request.num_publishable_block_hashes, the cap on blocks a connector
    may publish, which only recent vLLM (2026) has; None where absent (no
    cap beyond the computed tokens)."""
    publishable = getattr(request, "num_publishable_block_hashes", None)
    return publishable if isinstance(publishable, int) else None


def group_block_ids(block_ids: Any, group: int = 0) -> list[int]:
    """The block ids of KV cache group `group` (first_group for group 0);
    [] where vLLM passed fewer groups (a group without new blocks)."""
    if block_ids is None:
        return []
    if hasattr(block_ids, "get_block_ids"):
        block_ids = block_ids.get_block_ids()
    if isinstance(block_ids, (tuple, list)) and block_ids and isinstance(block_ids[0], (list, tuple)):
        return list(block_ids[group]) if group < len(block_ids) else []
    return list(block_ids) if group == 0 else []


def first_group(block_ids: Any) -> list[int]:
    """The block ids of the first (only supported) KV cache group.

    vLLM passes KVCacheBlocks (get_block_ids() -> one list per group) to
    update_state_after_alloc and per-group lists, ([...],) or [[...]], in
    SchedulerOutput since hybrid KV cache groups (0.9); older releases
    passed one flat list.
    """
    if block_ids is None:
        return []
    if hasattr(block_ids, "get_block_ids"):
        block_ids = block_ids.get_block_ids()
    if isinstance(block_ids, (tuple, list)) and block_ids and isinstance(block_ids[0], (list, tuple)):
        return list(block_ids[0])
    return list(block_ids)


# ---------------------------------------------------------------- scheduler output


def resumed_req_ids(cached: Any) -> set[str]:
    """Cached requests resumed from preemption this step (their block ids
    are replaced, not extended). CachedRequestData.resumed_req_ids (a set)
    replaced the per-request resumed_from_preemption flags in late 2025
    (0.11.1); both are read."""
    r = getattr(cached, "resumed_req_ids", None)
    if r is not None:
        return set(r)
    flags: Iterable[bool] = getattr(cached, "resumed_from_preemption", None) or ()
    return {rid for rid, f in zip(cached.req_ids, flags, strict=False) if f}


def preempted_req_ids(scheduler_output: Any) -> Iterable[str] | None:
    """SchedulerOutput.preempted_req_ids, or None on releases that do not
    list preemptions (before late 2025): the scheduler then treats tracked
    requests missing from the step as possibly preempted."""
    preempted: Iterable[str] | None = getattr(scheduler_output, "preempted_req_ids", None)
    return preempted


def preemption_ids_arg(arg: Any) -> Collection[str] | None:
    """handle_preemptions' argument when it is the set of preempted request
    ids (some releases) rather than the step's connector metadata (vLLM
    0.33); None otherwise."""
    if isinstance(arg, (set, frozenset, list, tuple)):
        return arg
    return None
