"""KV cache groups (vLLM's hybrid allocator, HMA) and per-group block ids.

KVCacheConfig came as a constructor argument with vllm PR #27887
(0.11.1/0.12); block ids arrive as one list per group since hybrid KV cache
groups (0.9), as one flat list before.
"""

from __future__ import annotations

from typing import Any

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
