"""Which KV cache groups of a hybrid model PegaFlow stores, and whether a
hit on them is one vLLM can use (vLLM's hybrid allocator, `SupportsHMA`).

vLLM splits a hybrid model's layers into KV cache groups, each with its own
block table (one block-id list per group). The connector stores exactly one
group: the first transferable full-attention group, whose blocks hold every
token's KV for good and are addressed by the request's block hashes.
Sliding-window groups are skipped: vLLM frees a request's early blocks as
the window moves (they become null blocks), so they are not there to save,
and a hit needs the window's last blocks, which a prefix of full blocks does
not give. State groups (Mamba, linear attention) are skipped: one state per
request, not a block per hash.

vLLM's scheduler takes an external hit as computed for every group it
loads into (`get_loaded_kv_cache_group_ids`); a group left out holds
nothing for the hit's tokens, so the hit is usable only when the stored
group is the only transferable group. For other layouts (full attention
with sliding-window, chunked-local or state groups, or several
full-attention groups) the connector answers 0 matched tokens: vLLM
computes those requests itself (its own prefix cache still serves them).
The stored group's blocks are still saved, into a namespace whose key
names the group structure, so that only this layout ever shares them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .compat import kv_cache_groups

FULL = "full_attention"


@dataclasses.dataclass(frozen=True)
class GroupPlan:
    """What the connector does with each KV cache group (see module doc)."""

    # The group whose blocks are saved and loaded; None: none is storable
    # (nothing is saved or loaded).
    stored: int | None = 0
    # Layers of the stored group (None: every layer, a single-group model).
    layers: frozenset[str] | None = None
    # Whether vLLM can use a hit on the stored group alone.
    hits_usable: bool = True
    # The group structure, for the namespace key ("" for one group).
    label: str = ""
    # Why hits are not usable ("" when they are).
    why: str = ""

    @property
    def hybrid(self) -> bool:
        return self.label != ""


def plan_groups(kv_cache_config: Any, hash_block_size: int) -> GroupPlan:
    """The plan for vLLM's KVCacheConfig; one group, everything stored,
    where vLLM passed none or a single group."""
    groups = kv_cache_groups(kv_cache_config)
    if groups is None or len(groups) == 1:
        return GroupPlan()
    label = ",".join(f"{kind}/{bs}x{len(layers)}{'' if transfer else '/local'}"
                     for kind, bs, layers, transfer in groups)
    stored = next((i for i, (kind, bs, _, transfer) in enumerate(groups)
                   if kind == FULL and transfer and bs == hash_block_size), None)
    if stored is None:
        return GroupPlan(None, frozenset(), False, label,
                         f"no full-attention group with {hash_block_size}-token blocks")
    others = [kind for i, (kind, _, _, transfer) in enumerate(groups) if transfer and i != stored]
    why = f"vLLM also needs the KV of its {'/'.join(sorted(set(others)))} group(s)" if others else ""
    return GroupPlan(stored, frozenset(groups[stored][2]), not others, f"{label};stored={stored}", why)
