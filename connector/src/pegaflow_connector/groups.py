"""Which KV cache groups of a hybrid model PegaFlow stores, and what a hit
on them needs (vLLM's hybrid allocator, `SupportsHMA`).

vLLM splits a hybrid model's layers into KV cache groups, each with its own
block table (one block-id list per group). A hit of K blocks is usable only
when every group vLLM loads into holds what vLLM's own prefix cache would
hold for K (`get_loaded_kv_cache_group_ids` names every stored group):

- full attention (FullAttentionSpec, MLAAttentionSpec): every block < K;
- sliding window W (SlidingWindowSpec, SlidingWindowMLASpec): the blocks
  of the last W - 1 tokens before K (vLLM gives the others the null block);
- chunked local C (ChunkedLocalAttentionSpec): the blocks of K's chunk;
- state (MambaSpec in prefix-caching "align" mode: Mamba, GDN, ...): the
  state after K blocks, held in block K - 1.

The engine answers a query with the largest K every stored group can serve
(design22: the boundary rule), so a hit is never claimed without every
group's blocks. A group PegaFlow cannot serve (cross-attention, circular
buffers, RSWA, attention sinks, non-align Mamba, an unknown spec, a block
size other than the hash block size) makes the whole model answer 0 hits
and store nothing, with one log line naming the group and why. Groups
vLLM marks enable_kv_transfer=False (replicas it rebuilds after a load)
are neither stored nor required.

A one-group model is planned as before groups existed: its namespace
carries no groups and stays byte for byte what it was.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ._proto import engine_pb2 as pb
from .compat import kv_cache_groups

# Kinds (KVGroup.kind) whose blocks are addressed per hash position; the
# state kind is saved from vLLM's boundary-state offers instead.
BLOCK_KINDS = frozenset({"full", "sliding_window", "chunked_local"})
STATE = "state"


@dataclasses.dataclass(frozen=True)
class PlannedGroup:
    """One stored group: vLLM's group index, its KVGroup kind and window."""

    index: int
    kind: str
    window_tokens: int
    layers: frozenset[str]

    def proto(self) -> pb.KVGroup:
        return pb.KVGroup(index=self.index, kind=self.kind, window_tokens=self.window_tokens)


@dataclasses.dataclass(frozen=True)
class GroupPlan:
    """What the connector does with each KV cache group (see module doc)."""

    # The stored groups of a hybrid model, in vLLM's order; () for a
    # one-group model (every layer is group 0) and for a refused model.
    groups: tuple[PlannedGroup, ...] = ()
    # The group structure, for the namespace key ("" for one group).
    label: str = ""
    # Why nothing is stored and every hit is 0 ("" when the model is served).
    why: str = ""

    @property
    def hybrid(self) -> bool:
        """vLLM has more than one KV cache group (block ids are per group,
        load failures are reported per request)."""
        return self.label != ""

    @property
    def hits_usable(self) -> bool:
        return not self.why

    @property
    def stored(self) -> int | None:
        """The first stored group (None: nothing is stored)."""
        if self.why:
            return None
        return self.groups[0].index if self.groups else 0

    @property
    def indices(self) -> tuple[int, ...]:
        """Every stored group (what a load restores)."""
        if self.why:
            return ()
        return tuple(g.index for g in self.groups) if self.hybrid else (0,)

    @property
    def layers(self) -> frozenset[str] | None:
        """The stored layers (None: every layer, a one-group model)."""
        if not self.hybrid:
            return None
        return frozenset(name for g in self.groups for name in g.layers)

    def group_of(self, layer: str) -> int:
        """The stored group a layer belongs to (0 in a one-group model)."""
        for g in self.groups:
            if layer in g.layers:
                return g.index
        return 0

    def kind_of(self, index: int) -> str:
        for g in self.groups:
            if g.index == index:
                return g.kind
        return "full"

    def by_kind(self, *kinds: str) -> tuple[int, ...]:
        return tuple(g.index for g in self.groups if g.kind in kinds) if self.hybrid else \
            ((0,) if "full" in kinds and not self.why else ())

    def protos(self) -> list[pb.KVGroup]:
        """Namespace.groups: set only for a hybrid model (one-group
        namespaces stay byte for byte what they were)."""
        return [g.proto() for g in self.groups] if self.hybrid else []


def plan_groups(kv_cache_config: Any, hash_block_size: int) -> GroupPlan:
    """The plan for vLLM's KVCacheConfig; one group, everything stored,
    where vLLM passed none or a single group."""
    groups = kv_cache_groups(kv_cache_config)
    if groups is None or len(groups) == 1:
        return GroupPlan()
    parts = []
    for i, g in enumerate(groups):
        kind = g.kind or g.spec_name
        window = f"/w{g.window_tokens}" if g.window_tokens else ""
        parts.append(f"{i}:{kind}{window}/{g.block_size}x{len(g.layers)}"
                     f"{'' if g.transferable else '/local'}")
    label = ",".join(parts)
    stored: list[PlannedGroup] = []
    for i, g in enumerate(groups):
        if not g.transferable:
            continue
        why = ""
        if not g.kind:
            why = g.why
        elif g.block_size != hash_block_size:
            why = (f"{g.block_size}-token blocks, but the request's hashes cover "
                   f"{hash_block_size} tokens")
        elif g.kind == "chunked_local" and g.window_tokens % hash_block_size:
            why = f"chunk of {g.window_tokens} tokens is not a multiple of the block size"
        if why:
            return GroupPlan((), label, f"group {i} ({g.spec_name}): {why}")
        stored.append(PlannedGroup(i, g.kind, g.window_tokens if g.kind != "full" else 0,
                                   frozenset(g.layers)))
    if not stored:
        return GroupPlan((), label, "no transferable KV cache group")
    return GroupPlan(tuple(stored), f"{label};stored={'+'.join(str(g.index) for g in stored)}")
