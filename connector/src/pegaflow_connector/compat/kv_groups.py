"""KV cache groups (vLLM's hybrid allocator, HMA) and per-group block ids.

KVCacheConfig came as a constructor argument with vllm PR #27887
(0.11.1/0.12); block ids arrive as one list per group since hybrid KV cache
groups (0.9), as one flat list before.
"""

from __future__ import annotations

import dataclasses
from typing import Any

# KVCacheSpec classes by exact name (subclasses such as RSWASpec or
# SinkFullAttentionSpec evict or add blocks and are refused by name):
# what a hit at a block boundary needs of such a group (groups.py).
_FULL_SPECS = frozenset({"FullAttentionSpec", "MLAAttentionSpec"})
_WINDOW_SPECS = {"SlidingWindowSpec": ("sliding_window", "sliding_window"),
                 "SlidingWindowMLASpec": ("sliding_window", "sliding_window"),
                 "ChunkedLocalAttentionSpec": ("chunked_local", "attention_chunk_size")}
# Specs PegaFlow refuses, with the reason logged.
_REFUSED_SPECS = {
    "CrossAttentionSpec": "cross-attention (encoder KV, not addressed by the prompt's hashes)",
    "EncoderOnlyAttentionSpec": "encoder-only attention (no KV kept)",
    "CircularBufferSpec": "a circular buffer (blocks are overwritten in place)",
    "RSWASpec": "RSWA (blocks are evicted out of order)",
    "SinkFullAttentionSpec": "attention sinks (extra blocks outside the prompt's hashes)",
}


@dataclasses.dataclass(frozen=True)
class GroupInfo:
    """One KVCacheConfig group as the connector reads it."""

    kind: str  # "full", "sliding_window", "chunked_local", "state" or "" (refused)
    block_size: int
    layers: tuple[str, ...]
    transferable: bool  # KVCacheGroupSpec.enable_kv_transfer
    window_tokens: int = 0  # sliding window W or chunk C, in tokens
    why: str = ""  # kind "": why PegaFlow cannot serve the group
    spec_name: str = ""


def _spec_kind(spec: Any) -> tuple[str, int, str]:
    """(kind, window tokens, why refused) of one KVCacheSpec."""
    name = type(spec).__name__
    if name == "UniformTypeKVCacheSpecs":  # one group of same-kind layers (0.11+)
        kinds = {_spec_kind(s) for s in (getattr(spec, "kv_cache_specs", None) or {}).values()}
        if len(kinds) == 1:
            return kinds.pop()
        return "", 0, f"layers of different kinds in one group ({sorted(k[0] for k in kinds)})"
    if name in _FULL_SPECS:
        return "full", 0, ""
    if name in _WINDOW_SPECS:
        kind, attr = _WINDOW_SPECS[name]
        w = int(getattr(spec, attr, 0) or 0)
        return (kind, w, "") if w > 0 else ("", 0, f"{name} without a window size")
    if name == "MambaSpec":
        # MambaSpec.mamba_cache_mode (0.13+; CacheConfig.mamba_cache_mode is
        # where it is configured): only "align" keeps a state per block.
        mode = str(getattr(spec, "mamba_cache_mode", "none") or "none")
        if mode == "align":
            return "state", 0, ""
        return "", 0, (f"Mamba state in prefix-caching mode {mode!r} (only 'align' keeps a "
                       "state per block boundary)")
    return "", 0, _REFUSED_SPECS.get(name, f"unknown KV cache spec {name}")


def kv_cache_groups(kv_cache_config: Any) -> list[GroupInfo] | None:
    """One GroupInfo per KVCacheConfig group, in vLLM's group order (the
    order of per-group block-id lists); None where vLLM passed no
    KVCacheConfig (releases before PR #27887, or tools): then there is one
    group holding every layer. `transferable` is
    KVCacheGroupSpec.enable_kv_transfer (2026; False for replicas vLLM
    rebuilds after a load, True before)."""
    groups = getattr(kv_cache_config, "kv_cache_groups", None)
    if not groups:
        return None
    out = []
    for g in groups:
        spec = g.kv_cache_spec
        kind, window, why = _spec_kind(spec)
        out.append(GroupInfo(kind, int(getattr(spec, "block_size", 0) or 0),
                             tuple(g.layer_names), bool(getattr(g, "enable_kv_transfer", True)),
                             window, why, type(spec).__name__))
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


def all_group_block_ids(block_ids: Any) -> list[list[int]]:
    """Every group's block ids (KVCacheBlocks, per-group lists or, before
    hybrid groups, one flat list = group 0)."""
    if block_ids is None:
        return []
    if hasattr(block_ids, "get_block_ids"):
        block_ids = block_ids.get_block_ids()
    if isinstance(block_ids, (tuple, list)) and block_ids and isinstance(block_ids[0], (list, tuple)):
        return [list(g) for g in block_ids]
    return [list(block_ids)]


def boundary_state_offloads(scheduler_output: Any) -> dict[str, list[tuple[int, int, int]]]:
    """{req_id: [(group, block_id, boundary_tokens)]}: the Mamba "align"
    boundary states vLLM offers a producer connector this step
    (SchedulerOutput.kv_connector_block_state, vLLM 0.32+); {} before."""
    state = getattr(scheduler_output, "kv_connector_block_state", None)
    offers = getattr(state, "boundary_state_offloads", None) if state is not None else None
    if not isinstance(offers, dict):
        return {}
    out: dict[str, list[tuple[int, int, int]]] = {}
    for rid, entries in offers.items():
        try:
            out[str(rid)] = [(int(g), int(b), int(n)) for g, b, n in entries]
        except (TypeError, ValueError):
            continue  # a shape we do not know: offer nothing rather than guess
    return out


_PROBE_BLOCKS = 7919  # a block count no other axis of a real layer has


def backend_block_axes(vllm_config: Any, layer_names: Any) -> dict[str, tuple[str, int | None]]:
    """{layer: (attention backend name, block axis)} from vLLM's own layer
    objects (CompilationConfig.static_forward_context[layer].attn_backend,
    0.9+): the block axis of the backend's get_kv_cache_shape. vLLM hands
    the logical shape (the physical get_kv_cache_stride_order permuted
    back), so the strides, not the axis order, say where bytes are. A layer without a backend (Mamba, 0.33's per-layer [B, H, N, C]
    views, tools without vLLM) is left out: layout.py then decides."""
    ctx = getattr(getattr(vllm_config, "compilation_config", None), "static_forward_context", None)
    if not isinstance(ctx, dict):
        return {}
    out: dict[str, tuple[str, int | None]] = {}
    for name in layer_names:
        layer = ctx.get(name)
        backend = getattr(layer, "attn_backend", None)
        if backend is None:
            continue
        try:
            label = str(backend.get_name())
        except Exception:  # noqa: BLE001 - a backend without a name: unknown
            continue
        axis: int | None = None
        try:
            shape = tuple(backend.get_kv_cache_shape(
                _PROBE_BLOCKS, int(getattr(layer, "block_size", 0) or 16),
                int(getattr(layer, "num_kv_heads", 1) or 1), int(getattr(layer, "head_size", 64))))
            if shape.count(_PROBE_BLOCKS) == 1:
                axis = shape.index(_PROBE_BLOCKS)
        except Exception:  # noqa: BLE001 - the backend refused the probe: name only
            axis = None
        out[name] = (label, axis)
    return out
