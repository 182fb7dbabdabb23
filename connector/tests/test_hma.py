"""Hybrid KV cache models (vLLM's hybrid allocator, SupportsHMA): one
full-attention group is saved and loaded, other groups are skipped, and
only hits vLLM can use are claimed."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from harness import (
    CacheSpec,
    Engine,
    FullAttentionSpec,
    Instance,
    MambaSpec,
    SlidingWindowSpec,
    ask,
    expected_block,
    group_block_id,
)
from test_faults import prompt

from pegaflow_connector.groups import GroupPlan, plan_groups


def _cfg(*groups: tuple[object, int, bool]) -> SimpleNamespace:
    return SimpleNamespace(num_blocks=8, kv_cache_groups=[
        SimpleNamespace(layer_names=[f"g{i}.l{j}" for j in range(n)], kv_cache_spec=spec,
                        enable_kv_transfer=transfer)
        for i, (spec, n, transfer) in enumerate(groups)])


@pytest.mark.parametrize("cfg, stored, usable", [
    (SimpleNamespace(num_blocks=8), 0, True),  # no KVCacheConfig groups: one group
    (_cfg((FullAttentionSpec(16), 4, True)), 0, True),
    (_cfg((FullAttentionSpec(16), 4, True), (SlidingWindowSpec(16), 4, True)), 0, False),
    (_cfg((SlidingWindowSpec(16), 4, True), (FullAttentionSpec(16), 4, True)), 1, False),
    (_cfg((MambaSpec(64), 4, True), (FullAttentionSpec(16), 4, True)), 1, False),
    (_cfg((FullAttentionSpec(16), 4, True), (FullAttentionSpec(16), 4, True)), 0, False),
    # A replica vLLM rebuilds after a load (enable_kv_transfer=False).
    (_cfg((FullAttentionSpec(16), 4, True), (SlidingWindowSpec(16), 4, False)), 0, True),
    # Only a group whose blocks the request's hashes address can be stored.
    (_cfg((FullAttentionSpec(32), 4, True), (MambaSpec(16), 4, True)), None, False),
], ids=["no-config", "one-group", "full+swa", "swa+full", "mamba+full", "full+full",
        "full+local-replica", "no-storable-group"])
def test_plan_groups(cfg: SimpleNamespace, stored: int | None, usable: bool) -> None:
    plan = plan_groups(cfg, 16)
    assert (plan.stored, plan.hits_usable) == (stored, usable)
    groups = getattr(cfg, "kv_cache_groups", None) or []
    assert plan.hybrid == (len(groups) > 1)
    if plan.hybrid and stored is not None:
        assert plan.layers == frozenset(groups[stored].layer_names)
    assert plan_groups(SimpleNamespace(num_blocks=8), 16) == GroupPlan()


def test_full_and_sliding_window_saves_only_the_full_group(engine: Engine) -> None:
    """Full attention + sliding window (gpt-oss, Gemma-3 style): P saves the
    full-attention group's blocks, byte-exact, and nothing of the
    sliding-window group; a hit on the full group alone is of no use to
    vLLM (the window's KV is missing), so the connector claims 0 tokens
    for this model - while a dense model in the same engine still hits."""
    hybrid = CacheSpec("flash_attn", num_layers=2, groups=("full_attention", "sliding_window"))
    p = Instance(engine, name="p", tp=2, cache=hybrid)
    d = Instance(engine, name="d", tp=2, cache=hybrid)
    dense = Instance(engine, name="dense", tp=2, cache=CacheSpec("flash_attn", num_layers=2))
    try:
        for inst in (p, d, dense):
            inst.handshake()
        tokens = prompt(150, 21)  # 9 full blocks
        r = p.add_request("r", tokens)
        p.run()
        assert r.is_finished() and p.flush()
        sm = p.connector.scheduler_core
        assert sm is not None and sm.group == 0 and not sm.hits_usable
        # The group structure is part of the namespace key.
        assert p.connector.scheduler_core._ns_id != dense.connector.scheduler_core._ns_id
        per_rank = [m for m in p.worker_metrics()]
        assert all(m["blocks_saved"] == 9 for m in per_rank), per_rank
        # One block = the full group's 2 layers (K and V of 2 heads x 32,
        # fp16, per rank), not the sliding-window group's.
        layer_bytes = 2 * hybrid.block_size * (hybrid.num_kv_heads // 2) * hybrid.head_size * 2
        assert all(m["bytes_saved"] == 9 * 2 * layer_bytes for m in per_rank), per_rank

        # What vLLM can use: nothing, for this model.
        probe = d.add_request("probe", tokens)
        assert ask(d.connector, probe) == (0, False)
        assert d.connector.get_loaded_kv_cache_group_ids(probe) == (0,)
        d.run()
        assert probe.load_done_computed is None and probe.is_finished()

        # Byte-exact: the stored blocks, loaded straight into D's full
        # group, are P's full-attention KV; D's sliding-window layers for
        # the same block ids stay untouched (zero).
        hashes = list(probe.block_hashes[:9])
        ids = [40 + i for i in range(9)]
        for rank, w in enumerate(d.workers):
            assert w.call("load_direct", ids, hashes) == set()
            got = w.call("read_group", 0, ids)
            for i in range(9):
                want = expected_block(hybrid, d.tp, rank, tokens, i)
                for layer in range(hybrid.num_layers):
                    assert np.array_equal(got[i][layer], want[layer]), (rank, i, layer)
            swa = w.call("read_group", 1, ids)
            assert all(not a.any() for blk in swa for a in blk)
        # P's own sliding-window group held the KV at other block ids
        # (so the save did read the full group's blocks, not group 1's).
        assert group_block_id(hybrid, 1, 0) != 0

        # A dense model on the same engine is unaffected.
        dense.add_request("x", tokens)
        dense.run()
        assert dense.flush()
        again = dense.add_request("y", tokens)
        dense.run()
        assert again.load_done_computed == 144
    finally:
        p.close()
        d.close()
        dense.close()
