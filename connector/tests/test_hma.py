"""Hybrid KV cache models (vLLM's hybrid allocator, SupportsHMA) against
the real engine: a model with a group PegaFlow cannot serve stores nothing
and claims nothing (the plan of every group kind: test_hybrid.py)."""

from __future__ import annotations

from harness import (
    CacheSpec,
    Engine,
    Instance,
    ask,
)
from test_faults import prompt


def test_refused_group_kind_saves_nothing_and_claims_nothing(engine: Engine) -> None:
    """Full attention + non-align Mamba state (a kind PegaFlow cannot
    serve): no hit, nothing saved, no group reported loaded; a dense model
    on the same engine still hits."""
    hybrid = CacheSpec("flash_attn", num_layers=2, groups=("full_attention", "mamba"))
    p = Instance(engine, name="p", tp=2, cache=hybrid)
    d = Instance(engine, name="d", tp=2, cache=hybrid)
    dense = Instance(engine, name="dense", tp=2, cache=CacheSpec("flash_attn", num_layers=2))
    try:
        for inst in (p, d):
            inst.handshake(expect_disabled=True)
        dense.handshake()
        tokens = prompt(150, 21)
        r = p.add_request("r", tokens)
        p.run()
        assert r.is_finished() and p.flush()
        sm = p.connector.scheduler_core
        assert sm is not None and not sm.hits_usable and "MambaSpec" in sm.plan.why
        assert all(not m.get("blocks_saved") for m in p.worker_metrics())
        probe = d.add_request("probe", tokens)
        assert ask(d.connector, probe) == (0, False)
        assert d.connector.get_loaded_kv_cache_group_ids(probe) == ()
        d.run()
        assert probe.load_done_computed is None and probe.is_finished()
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
