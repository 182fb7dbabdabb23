"""Every vLLM-version difference the connector tolerates, in one package.

The engine-facing core never imports vLLM or torch. The adapter subclasses
vLLM's real base classes when vLLM is importable and small stand-ins with
the same names where vLLM is not installed at all (tests, tools), so one
code path serves both. Supported: vLLM MIN_VLLM (0.11.1) to
NEWEST_CHECKED_VLLM (0.33.0), checked per release by scripts/vllm-compat;
the connector refuses to start on an older vLLM, or on one whose API
cannot be imported (require_supported_vllm). Fallbacks for releases older
than 0.11.1 predate the range; they are kept because they are cheap.

The rest of the connector imports vLLM symbols, and reads attributes whose
presence or shape differs between vLLM releases, only through this package
(always as `from .compat import X`; the modules below are its layout, not
its interface). Each workaround says which releases need it and why; the
connector is written against vLLM main of 2026 (0.33), and every fallback
degrades to what that release does. Attributes every release has
(`request_id`, `num_tokens`, `scheduled_new_reqs`, ...) are read directly
by the cores.

One module per concern:

    classes.py    vLLM's connector base classes (or stand-ins), its constructor, the role
    version.py    the supported range (MIN_VLLM, read by scripts/vllm-compat) and the refusal
    config.py     KVTransferConfig, CacheConfig (hash algorithm and seed), ParallelConfig
    kv_groups.py  KV cache groups (hybrid allocator) and per-group block ids
    request.py    Request and SchedulerOutput: block hashes, P/D parameters, preemptions
    metrics.py    the stats and Prometheus base classes, the cache-hit source label
    kv_events.py  vLLM's KV event classes and its event hash conversion
"""

from __future__ import annotations

from .classes import (
    HAVE_VLLM,
    PER_REQUEST_LOAD_FAILURES,
    VLLM_IMPORT_ERROR,
    VLLM_INSTALLED,
    KVConnectorBase_V1,
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
    SupportsHMA,
    init_connector_base,
    role_is_scheduler,
)
from .config import (
    DEFAULT_NONE_HASH_SEED,
    context_parallel_sizes,
    data_parallel_rank,
    kv_connector_extra_config,
    kv_engine_id,
    kv_load_failure_policy,
    prefix_caching_hash_algo,
    resolved_hash_seed,
    tensor_parallel_rank,
)
from .kv_events import kv_events_enabled, vllm_kv_events
from .kv_groups import (
    GroupInfo,
    all_group_block_ids,
    backend_block_axes,
    boundary_state_offloads,
    first_group,
    group_block_ids,
    kv_cache_groups,
    kv_cache_num_blocks,
)
from .metrics import CacheHitSource, KVConnectorPromMetrics, KVConnectorStats, prom_counter_cls
from .request import (
    hash_bytes,
    kv_transfer_params,
    num_prompt_tokens,
    num_publishable_block_hashes,
    preempted_req_ids,
    preemption_ids_arg,
    request_block_hashes,
    resumed_req_ids,
)
from .version import (
    MIN_VLLM,
    MIN_VLLM_WHY,
    NEWEST_CHECKED_VLLM,
    VLLM_CHECK_ENV,
    UnsupportedVLLM,
    release_tuple,
    require_supported_vllm,
    unsupported_vllm_reason,
    vllm_version,
)

# Our lines go through vLLM's logger: vLLM configures the "vllm" logger
# (handler, format, VLLM_LOGGING_LEVEL) and children propagate to it, so
# the connector's messages land in vLLM's log like its own connectors'.
LOGGER_NAME = "vllm.pegaflow_connector"

__all__ = [
    "CacheHitSource", "DEFAULT_NONE_HASH_SEED", "GroupInfo", "all_group_block_ids", "backend_block_axes",
    "boundary_state_offloads", "HAVE_VLLM", "KVConnectorBase_V1",
    "KVConnectorHandshakeMetadata", "KVConnectorMetadata", "KVConnectorPromMetrics",
    "KVConnectorRole", "KVConnectorStats", "KVConnectorTransferResults",
    "PER_REQUEST_LOAD_FAILURES", "LOGGER_NAME", "MIN_VLLM", "MIN_VLLM_WHY",
    "NEWEST_CHECKED_VLLM", "SupportsHMA", "UnsupportedVLLM", "VLLM_CHECK_ENV",
    "VLLM_IMPORT_ERROR", "VLLM_INSTALLED", "context_parallel_sizes", "data_parallel_rank",
    "first_group", "group_block_ids", "hash_bytes", "init_connector_base", "kv_cache_groups",
    "kv_cache_num_blocks", "kv_connector_extra_config", "kv_engine_id", "kv_load_failure_policy",
    "kv_transfer_params", "num_prompt_tokens", "num_publishable_block_hashes", "preempted_req_ids",
    "preemption_ids_arg", "prefix_caching_hash_algo", "prom_counter_cls", "release_tuple",
    "request_block_hashes", "require_supported_vllm", "resolved_hash_seed", "resumed_req_ids",
    "role_is_scheduler", "tensor_parallel_rank", "unsupported_vllm_reason", "vllm_version",
    "kv_events_enabled", "vllm_kv_events",
]
