"""A hybrid model for the harness: vLLM 0.32's hybrid KV cache allocator.

What it mimics (vllm/v1/core/single_type_kv_cache_manager.py,
kv_cache_coordinator.py, sched/scheduler.py, sched/output.py):

- several KV cache groups (FullAttentionSpec, SlidingWindowSpec,
  ChunkedLocalAttentionSpec, MambaSpec in "align" mode: vLLM's class
  names, as compat reads them), each with its own block table; one block
  pool shared by every group (ids unique across groups, id 0 the null
  block); block ids passed as a tuple of per-group lists;
- memory as vLLM's hybrid allocator lays it out: layer j of every group is
  a view of one raw buffer (the page of block X holds group g's layer j
  data for whichever group owns X), so a block handed from one group to
  another overwrites the first group's bytes;
- allocation per kind: blocks below `skipped(kind, num_computed)` are
  null (vLLM's get_num_skipped_tokens: SWA num_computed - W + 1, chunked
  floor(num_computed / C) * C, state num_computed - 1) and freed while the
  request runs (remove_skipped_blocks); an external hit of K blocks gets
  fresh blocks only where the group needs them;
- state ("align"): block p holds the state after (p + 1) * block_size
  tokens; chunk ends are block aligned, except the prompt's last chunk, and
  P's prefill stops at the last checkpoint floor((N - 1) / bs) * bs;
  a chunk that ends on a boundary offers its state block in
  SchedulerOutput.kv_connector_block_state.boundary_state_offloads.

The worker's forward is checked: before writing a chunk [start, end) it
reads what the kernels would read (full: every earlier position; SWA: the
last W - 1; chunked: the chunk's start; state: the state after `start`
tokens in block (start - 1) // bs) and compares it with the bytes the
prefix must produce. A wrong, missing or null block of any group is a read
error, returned with the step (Instance.read_errors).
"""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace
from typing import Any

import numpy as np
from harness import (
    CachedRequestData,
    CacheSpec,
    FullAttentionSpec,
    Instance,
    KVConnectorOutput,
    NewRequestData,
    Request,
    RequestStatus,
    SchedulerOutput,
    SlidingWindowSpec,
    Step,
    kv_values,
    token_keys,
)


@dataclasses.dataclass(frozen=True)
class ChunkedLocalAttentionSpec:
    block_size: int
    attention_chunk_size: int = 64


@dataclasses.dataclass(frozen=True)
class AlignMambaSpec:
    block_size: int
    mamba_cache_mode: str = "align"


AlignMambaSpec.__name__ = "MambaSpec"  # vLLM's class name, align mode

ATTENTION = ("full", "sliding_window", "chunked_local")
MAX_ERRORS = 8  # read errors reported per forward (the first ones say enough)


@dataclasses.dataclass
class HybridCache(CacheSpec):
    """A hybrid model's KV caches. `kinds`: one group per entry ("full",
    "sliding_window", "chunked_local", "state"), each with `num_layers`
    layers; `window`: SWA W, `chunk`: chunked-local C (tokens)."""

    layout: str = "flashinfer"  # blocks outermost: one page per block id
    kinds: tuple[str, ...] = ("full", "sliding_window")
    num_layers: int = 2
    num_blocks: int = 96
    window: int = 40
    chunk: int = 64

    # -------------------------------------------------------- vLLM's config

    def layer(self, g: int, j: int) -> str:
        i = j * len(self.kinds) + g
        return f"model.layers.{i}.mixer" if self.kinds[g] == "state" else \
            f"model.layers.{i}.self_attn.attn"

    def spec(self, g: int) -> Any:
        kind, bs = self.kinds[g], self.block_size
        if kind == "full":
            return FullAttentionSpec(bs)
        if kind == "sliding_window":
            return SlidingWindowSpec(bs, self.window)
        if kind == "chunked_local":
            return ChunkedLocalAttentionSpec(bs, self.chunk)
        return AlignMambaSpec(bs)

    def vllm_kv_cache_config(self) -> SimpleNamespace:
        return SimpleNamespace(num_blocks=self.num_blocks, kv_cache_groups=[
            SimpleNamespace(layer_names=[self.layer(g, j) for j in range(self.num_layers)],
                            kv_cache_spec=self.spec(g)) for g in range(len(self.kinds))])

    def skipped(self, g: int, num_computed: int) -> int:
        """Leading blocks group g no longer needs once num_computed tokens
        are computed (vLLM's get_num_skipped_tokens, in blocks)."""
        kind, bs = self.kinds[g], self.block_size
        if kind == "sliding_window":
            return max(num_computed - self.window + 1, 0) // bs
        if kind == "chunked_local":
            return num_computed // self.chunk * self.chunk // bs
        if kind == "state":
            return max(num_computed - 1, 0) // bs
        return 0

    # -------------------------------------------------------- memory

    def _state_shapes(self, tp: int) -> tuple[tuple[int, int], tuple[int, int, int]]:
        h = self.heads_per_rank(tp)
        return (3, 64 * h), (h, self.head_size, 8)  # conv (f16), ssm (f32)

    def page_bytes(self, tp: int) -> int:
        attn = 2 * self.block_size * self.heads_per_rank(tp) * self.head_size * 2
        conv, ssm = self._state_shapes(tp)
        assert math.prod(conv) * 2 + math.prod(ssm) * 4 <= attn, "state larger than a page"
        return attn

    def allocate(self, tp: int, path: str | None) -> dict[str, Any]:
        """One raw buffer per layer slot j, viewed by layer j of every group."""
        nb, page = self.num_blocks, self.page_bytes(tp)
        total = nb * page * self.num_layers
        buf = (np.memmap(path, dtype=np.uint8, mode="w+", shape=(total,)) if path is not None
               else np.zeros(total, dtype=np.uint8))
        h, d, bs = self.heads_per_rank(tp), self.head_size, self.block_size
        conv, ssm = self._state_shapes(tp)
        caches: dict[str, Any] = {}
        for j in range(self.num_layers):
            raw = buf[j * nb * page:(j + 1) * nb * page]
            for g, kind in enumerate(self.kinds):
                if kind != "state":
                    caches[self.layer(g, j)] = raw.view(np.float16).reshape(nb, 2, bs, h, d)
                    continue
                cbytes = math.prod(conv) * 2
                c = np.lib.stride_tricks.as_strided(
                    raw.view(np.float16), shape=(nb, *conv),
                    strides=(page, conv[1] * 2, 2))
                s = np.lib.stride_tricks.as_strided(
                    raw[cbytes:].view(np.float32), shape=(nb, *ssm),
                    strides=(page, ssm[1] * ssm[2] * 4, ssm[2] * 4, 4))
                caches[self.layer(g, j)] = [c, s]
        return caches

    # -------------------------------------------------------- contents

    def state_parts(self, caches: dict[str, Any], g: int, j: int) -> list[np.ndarray]:
        return [t.view(np.uint16) for t in caches[self.layer(g, j)]]

    def state_value(self, key: int, g: int, j: int, rank: int, part: int, shape: tuple[int, ...]
                    ) -> np.ndarray:
        """The state after a prefix whose last token key is `key`: a
        function of the whole prefix, as a recurrent state is."""
        n = math.prod(shape)
        li = g * 100 + j
        return kv_values(np.array([key], dtype=np.uint64), li, rank, 2 + part, n)[0].reshape(shape)

    def attn_value(self, keys: np.ndarray, g: int, j: int, rank: int, kv: int, h: int) -> np.ndarray:
        li = g * 100 + j
        return kv_values(keys, li, rank, kv, h * self.head_size).reshape(-1, h, self.head_size)

    def context_start(self, g: int, start: int) -> int:
        """The first earlier position the kernels read for a chunk at `start`."""
        kind = self.kinds[g]
        if kind == "sliding_window":
            return max(start - self.window + 1, 0)
        if kind == "chunked_local":
            return start // self.chunk * self.chunk
        return 0

    def forward(self, caches: dict[str, Any], rank: int, tokens: list[int],
                table: tuple[list[int], ...], start: int, end: int) -> list[str]:
        """Reads the chunk's context (checked), then writes its KV and
        state; returns the read errors."""
        if end <= start:
            return []
        keys = token_keys(tokens[:end])
        bs, errors = self.block_size, []
        for g, kind in enumerate(self.kinds):
            ids = np.asarray(table[g])
            for j in range(self.num_layers):
                if kind == "state":
                    parts = self.state_parts(caches, g, j)
                    if start > 0:
                        b = int(ids[(start - 1) // bs])
                        ok = b != 0 and all(np.array_equal(
                            p[b], self.state_value(int(keys[start - 1]), g, j, rank, k, p.shape[1:]))
                            for k, p in enumerate(parts))
                        if not ok:
                            errors.append(f"g{g} state layer {j}: block {b} (index "
                                          f"{(start - 1) // bs}) is not the state after {start}")
                    b = int(ids[(end - 1) // bs])
                    assert b != 0, ("forward writes the null block", g, end)
                    for k, p in enumerate(parts):
                        p[b] = self.state_value(int(keys[end - 1]), g, j, rank, k, p.shape[1:])
                    continue
                u = caches[self.layer(g, j)].view(np.uint16)
                h = u.shape[3]
                lo = self.context_start(g, start)
                if lo < start:
                    pos = np.arange(lo, start)
                    blks, offs = ids[pos // bs], pos % bs
                    for kv in (0, 1):
                        want = self.attn_value(keys[lo:start], g, j, rank, kv, h)
                        bad = np.nonzero((blks == 0) | ~np.all(u[blks, kv, offs] == want,
                                                              axis=(1, 2)))[0]
                        if len(bad):
                            p0 = int(pos[bad[0]])
                            errors.append(f"g{g} {kind} layer {j}: {len(bad)} positions wrong "
                                          f"from {p0} (block {int(ids[p0 // bs])})")
                            break
                pos = np.arange(start, end)
                blks, offs = ids[pos // bs], pos % bs
                assert (blks != 0).all(), ("forward writes the null block", g, start, end)
                for kv in (0, 1):
                    u[blks, kv, offs] = self.attn_value(keys[start:end], g, j, rank, kv, h)
        return errors[:MAX_ERRORS]

    def read_group(self, caches: dict[str, Any], g: int, ids: list[int]) -> list[list[np.ndarray]]:
        """Group g's bytes of each block (every layer; states: each part)."""
        out = []
        for b in ids:
            blk = []
            for j in range(self.num_layers):
                if self.kinds[g] == "state":
                    blk.extend(np.array(p[b]) for p in self.state_parts(caches, g, j))
                else:
                    blk.append(np.array(caches[self.layer(g, j)].view(np.uint16)[b]))
            out.append(blk)
        return out


class HybridBlocks:
    """vLLM's KVCacheBlocks for a hybrid model: one list per group."""

    def __init__(self, table: list[list[int]]):
        self._table = table

    def get_block_ids(self) -> tuple[list[int], ...]:
        return tuple(list(ids) for ids in self._table)


class HybridInstance(Instance):
    """Instance with vLLM's hybrid allocator (see the module doc).

    Freed blocks go to the front of the free queue (`reuse_first`): the
    next allocation of any request and group takes them, which is when a
    save still reading them must be fenced. No preemption: a test sizes
    the pool so that every request fits."""

    def __init__(self, engine: Any, *, cache: HybridCache, reuse_first: bool = True, **kw: Any):
        super().__init__(engine, cache=cache, **kw)
        self.hcache = cache
        self.free.clear()
        self.free.extend(range(1, cache.num_blocks))  # 0: the null block
        self.reuse_first = reuse_first
        self.read_errors: list[tuple[str, str]] = []
        self.failed_reqs: set[str] = set()
        self.offers: dict[str, list[tuple[int, int, int]]] = {}
        self.hit_tokens: dict[str, int] = {}
        self.freed_ids: list[int] = []  # every id freed, in order (tests look for reuse)
        self.offered: list[tuple[str, int, int, int]] = []  # (req, group, block, tokens)

    # -------------------------------------------------------------- blocks

    def _give_back(self, b: int) -> None:
        if b == 0:
            return
        self.freed_ids.append(b)
        if self.reuse_first:
            self.free.appendleft(b)
        else:
            self.free.append(b)

    def _grow(self, rid: str, computed: int, total: int) -> tuple[list[int], ...]:
        """Blocks for tokens up to `total` once `computed` are computed:
        skipped blocks freed (nulled), new ones per kind; returns what each
        group's table gained this step (nulls included, as vLLM's
        new_block_ids)."""
        c, bs = self.hcache, self.bs
        table = self.blocks.setdefault(rid, [[] for _ in c.kinds])  # type: ignore[arg-type]
        gained: list[list[int]] = []
        for g, kind in enumerate(c.kinds):
            ids = table[g]
            skip = c.skipped(g, computed)
            for i in range(min(skip, len(ids))):
                self._give_back(ids[i])
                ids[i] = 0
            target = math.ceil(total / bs)
            start = len(ids)
            for i in range(start, target):
                if kind == "state":
                    need = i == target - 1 or (computed > 0 and i == (computed - 1) // bs)
                else:
                    need = i >= skip
                if need and not self.free:
                    raise RuntimeError(f"{self.name}: block pool exhausted (size the test's pool)")
                ids.append(self.free.popleft() if need else 0)
            gained.append(ids[start:])
        return tuple(gained)

    def _groups(self, table: Any) -> tuple[list[int], ...]:  # type: ignore[override]
        return tuple(list(ids) for ids in (table or [[] for _ in self.hcache.kinds]))

    def _free_blocks(self, rid: str) -> None:
        table = self.blocks.pop(rid, [])
        self.last_blocks[rid] = [list(ids) for ids in table]  # type: ignore[misc]
        for ids in table:
            for b in ids:  # type: ignore[union-attr]
                self._give_back(b)
        self.events.append(("freed", rid))

    def _chunk(self, req: Request, computed: int, n: int) -> int:
        """vLLM's _mamba_block_aligned_split for align-mode state groups."""
        if "state" not in self.hcache.kinds or computed >= req.num_prompt_tokens:
            return n
        bs, end = self.bs, computed + n
        last_ckpt = (req.num_prompt_tokens - 1) // bs * bs
        if computed < last_ckpt < end:
            end = last_ckpt
        elif end < req.num_prompt_tokens and end // bs * bs > computed:
            end = end // bs * bs
        return end - computed

    def _offer(self, rid: str, end: int) -> None:
        """A chunk ending on a block boundary caches (and offers) its state."""
        req = self.requests[rid]
        if end % self.bs or end // self.bs > len(req.block_hashes):
            return
        for g, kind in enumerate(self.hcache.kinds):
            if kind == "state":
                b = self.blocks[rid][g][end // self.bs - 1]  # type: ignore[index]
                self.offers.setdefault(rid, []).append((g, b, end))
                self.offered.append((rid, g, b, end))

    # -------------------------------------------------------------- a step

    def schedule(self, preempt: Any = (), preempt_to_back: bool = False) -> Step:
        assert not preempt, "the hybrid harness does not preempt"
        budget = self.budget
        new_reqs: list[NewRequestData] = []
        cached = CachedRequestData([], set(), [], {}, [], [], [])
        num_sched: dict[str, int] = {}
        for req in list(self.running):
            n = self._chunk(req, req.num_computed_tokens,
                            min(req.num_tokens - req.num_computed_tokens, budget))
            if budget <= 0 or n <= 0:
                continue
            gained = self._grow(req.request_id, req.num_computed_tokens, req.num_computed_tokens + n)
            self._cached_entry(cached, req, gained, req.num_computed_tokens)
            num_sched[req.request_id] = n
            budget -= n
        for req in list(self.waiting):
            if budget <= 0:
                break
            rid = req.request_id
            hit = self._external_hit(req)
            if hit is None:
                continue
            ext, load_async = hit
            if load_async:
                assert ext > 0 and ext % self.bs == 0, ext
                self._grow(rid, ext, ext)
                self.hit_tokens[rid] = ext
                self.connector.update_state_after_alloc(req, HybridBlocks(self.blocks[rid]), ext)  # type: ignore[arg-type]
                req.status = RequestStatus.WAITING_FOR_REMOTE_KVS
                self.events.append(("loading", rid))
                continue
            computed = req.num_computed_tokens + ext
            n = self._chunk(req, computed, min(req.num_tokens - computed, budget))
            self._grow(rid, computed, computed + n)
            self.connector.update_state_after_alloc(req, HybridBlocks(self.blocks[rid]), ext)  # type: ignore[arg-type]
            self.waiting.remove(req)
            self.running.append(req)
            req.status = RequestStatus.RUNNING
            new_reqs.append(NewRequestData(rid, req.prompt_token_ids,
                                           self._groups(self.blocks[rid]), computed))
            req.num_computed_tokens = computed
            num_sched[rid] = n
            budget -= n
        for rid, n in num_sched.items():
            self._offer(rid, self.requests[rid].num_computed_tokens + n)
        so = SchedulerOutput(new_reqs, cached, num_sched, sum(num_sched.values()),
                             self.finished_req_ids, set())
        so.kv_connector_block_state = SimpleNamespace(  # type: ignore[attr-defined]
            boundary_state_offloads=self.offers)
        self.offers = {}
        return self._dispatch(so, self._groups)

    def _update_waiting_for_remote_kv(self, req: Request) -> None:
        """vLLM 0.32 with per-request load failures (_handle_failed_recving):
        a failed request restarts from 0 (its blocks freed, the connector
        asked again); a loaded one continues after its hit."""
        rid = req.request_id
        self.finished_recving.discard(rid)
        if rid in self.failed_reqs:
            self.failed_reqs.discard(rid)
            self._free_blocks(rid)
            req.num_computed_tokens = 0
            req.load_done_computed = 0
            self.events.append(("load_failed", rid))
            return
        n = self.hit_tokens.pop(rid)
        req.num_computed_tokens = n
        req.load_done_computed = n
        self.events.append(("loaded", rid))

    def execute(self, step: Step, ranks: Any = None) -> list[Any]:
        outs = super().execute(step, ranks)
        for out in outs:
            self.read_errors.extend(("step", e) for e in out[3])
        return [(fs, fr, failed) for fs, fr, failed, _ in outs]

    def _failed_recving(self, done_recv: set[str]) -> set[str]:
        return done_recv & self.failed_reqs

    def update(self, step: Step, outputs: list[Any]) -> KVConnectorOutput:
        for _, _, failed in outputs:
            self.failed_reqs |= set(failed or ())
        return super().update(step, [(fs, fr, ()) for fs, fr, _ in outputs])

    def read_group(self, rank: int, g: int, ids: list[int]) -> list[list[np.ndarray]]:
        return self.workers[rank].call("read_group", g, ids)


def expected_group_block(cache: HybridCache, tp: int, rank: int, tokens: list[int], g: int,
                         index: int) -> list[np.ndarray]:
    """What HybridCache.read_group returns for the request's block `index`
    of group g (a state block: the state after (index + 1) blocks)."""
    bs = cache.block_size
    keys = token_keys(tokens[:(index + 1) * bs])
    out: list[np.ndarray] = []
    for j in range(cache.num_layers):
        if cache.kinds[g] == "state":
            conv, ssm = cache._state_shapes(tp)
            out.append(cache.state_value(int(keys[-1]), g, j, rank, 0, conv))
            out.append(cache.state_value(int(keys[-1]), g, j, rank, 1,
                                         (ssm[0], ssm[1], ssm[2] * 2)))
        else:
            h = cache.heads_per_rank(tp)
            k = cache.attn_value(keys[index * bs:], g, j, rank, 0, h)
            v = cache.attn_value(keys[index * bs:], g, j, rank, 1, h)
            out.append(np.stack([k, v]))
    return out
