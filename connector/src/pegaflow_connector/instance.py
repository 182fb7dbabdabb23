"""What this vLLM process is to the engine, read from vLLM's config at
start-up: the connector's settings and role, the instance id, the TP rank,
and the namespace its blocks are keyed in.

Plain functions of vLLM's config objects (read through compat), so each
is testable without vLLM or an engine; PegaFlowConnector._setup calls them
in order. Any of them may raise: the connector then disables itself
(vllm_connector.py).
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from ._proto import engine_pb2 as pb
from .compat import (
    LOGGER_NAME,
    context_parallel_sizes,
    kv_connector_extra_config,
    kv_load_failure_policy,
    prefix_caching_hash_algo,
    tensor_parallel_rank,
)
from .config import ConnectorConfig, hash_seed_fingerprint, private_hash_seed_fingerprint
from .groups import GroupPlan

log = logging.getLogger(LOGGER_NAME)


def load_config(kv_transfer_config: Any, *, is_scheduler: bool) -> ConnectorConfig:
    """The connector's settings from kv_connector_extra_config; unknown
    keys and (once, on the scheduler) vLLM's failing load policy are logged."""
    cfg = ConnectorConfig.load(kv_connector_extra_config(kv_transfer_config))
    for k in getattr(cfg, "unknown_keys", []):
        log.warning("pegaflow: unknown kv_connector_extra_config key %r ignored", k)
    if kv_load_failure_policy(kv_transfer_config) == "fail" and is_scheduler:
        log.warning("pegaflow: kv_load_failure_policy is 'fail' (vLLM's default): a block the "
                    "engine cannot deliver (evicted, engine restarted) fails its request. Set "
                    "\"kv_load_failure_policy\": \"recompute\" in --kv-transfer-config to "
                    "recompute such blocks instead.")
    return cfg


def kv_role(kv_transfer_config: Any) -> tuple[str, bool, bool]:
    """kv_role, and whether this instance loads and saves."""
    role_name = str(getattr(kv_transfer_config, "kv_role", "kv_both") or "kv_both")
    return role_name, role_name in ("kv_both", "kv_consumer"), role_name in ("kv_both", "kv_producer")


def tensor_parallel_size(parallel_config: Any) -> int:
    """The TP size; raises ValueError for the parallelism the connector
    does not support (pipeline, decode/prefill context parallelism)."""
    pc = parallel_config
    if int(getattr(pc, "pipeline_parallel_size", 1) or 1) > 1:
        raise ValueError("pipeline parallelism is not supported")
    dcp, pcp = context_parallel_sizes(pc)
    if dcp > 1 or pcp > 1:
        raise ValueError(f"context parallelism is not supported (decode_context_parallel_size="
                         f"{dcp}, prefill_context_parallel_size={pcp}): it splits each "
                         "block's KV by token across ranks; run with DCP=PCP=1")
    return int(getattr(pc, "tensor_parallel_size", 1) or 1)


def instance_id_for(configured: str, engine_id: Any, dp_rank: int | None) -> str:
    """The engine instance id: configured, else from vLLM's engine_id, else
    the host name; with data parallelism `-dp<rank>` is appended unless the
    base already carries the rank (vLLM's `_dp<rank>` engine_id), so DP
    ranks sharing one configured id never register under the same name."""
    base = configured or (f"vllm-{engine_id}" if engine_id else f"vllm-{socket.gethostname()}")
    if dp_rank is None or (not configured and engine_id and str(engine_id).endswith(f"_dp{dp_rank}")):
        return base
    return f"{base}-dp{dp_rank}"


def tp_rank(cfg: ConnectorConfig) -> int:
    """This worker's TP rank: configured (tests, tools), else vLLM's."""
    if cfg.tp_rank is not None:
        return cfg.tp_rank
    rank = tensor_parallel_rank()
    return 0 if rank is None else rank  # not in a vLLM worker (tests, tools)


def namespace_template(cfg: ConnectorConfig, vllm_config: Any, *, block_size: int, tp: int,
                       instance_id: str, groups: GroupPlan, is_scheduler: bool) -> pb.Namespace:
    """The namespace this instance's blocks are keyed in: only instances
    whose block hashes can match (model, revision, block size, TP, hash
    algorithm and seed, KV dtype, group structure) share one. The scheduler
    logs why an instance is kept private or which groups it stores."""
    mc, cc = vllm_config.model_config, vllm_config.cache_config
    hash_algo = prefix_caching_hash_algo(cc)
    extra = {"kv_cache_dtype": str(getattr(cc, "cache_dtype", "auto"))}
    fp = hash_seed_fingerprint(hash_algo)
    if not fp:
        # vLLM seeds this instance's hashes randomly: no other process
        # can match them, so sharing a namespace would only be a silent
        # 0% hit rate (and, for xxhash, a known-seed collision risk).
        fp = private_hash_seed_fingerprint(hash_algo, instance_id)
        extra["hash_seed"] = f"random:{instance_id}"
        if is_scheduler:
            log.warning("pegaflow: vLLM seeds block hashes randomly per process (%s without "
                        "PYTHONHASHSEED): this instance's blocks are kept private to it (no "
                        "P/D, no sharing with other instances). Set the same PYTHONHASHSEED "
                        "on every instance to share.", hash_algo)
    if groups.hybrid:
        # Only instances with this very group structure share blocks.
        extra["kv_groups"] = groups.label
        if is_scheduler:
            log_groups(groups)
    extra.update(cfg.namespace_extra)
    return pb.Namespace(
        model=cfg.model_name or str(mc.model), model_revision=str(getattr(mc, "revision", "") or ""),
        block_size=block_size, tp_size=tp, hash_algo=hash_algo, hash_seed_fingerprint=fp, extra=extra,
        groups=groups.protos())


def log_groups(groups: GroupPlan) -> None:
    """What a hybrid model's KV cache groups mean for PegaFlow (groups.py):
    one line, naming the group PegaFlow cannot serve and why."""
    if groups.why:
        log.warning("pegaflow: hybrid KV cache groups [%s]: %s; PegaFlow cannot serve this "
                    "model, so nothing is saved or loaded (0 matched tokens)",
                    groups.label, groups.why)
    else:
        log.info("pegaflow: KV cache groups [%s]: groups %s are saved and loaded (%s)",
                 groups.label, ", ".join(str(g.index) for g in groups.groups),
                 ", ".join(g.kind for g in groups.groups))
