"""A rank's KV memory as the engine opens it: the RegisterRequest's regions
and per-layer segments, from a layout `layout.py` detected.

Everything that touches the OS or a device lives here: /proc/self/maps
(caches already in a shared file are registered in place), a shared-memory
staging buffer (caches the engine cannot open), CUDA IPC handles and the
rank's interprocess event (GPU caches). Layout detection itself is pure
and lives in layout.py.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import mmap
import os
import uuid
from collections.abc import Sequence
from typing import Any

from ._proto import engine_pb2 as pb
from .compat import LOGGER_NAME
from .layout import LayoutError, ModelLayout, TensorInfo

log = logging.getLogger(LOGGER_NAME)


# ---------------------------------------------------------------- memory


@dataclasses.dataclass(frozen=True)
class Mapping:
    path: str
    file_offset: int  # offset in the file of the queried address


def find_file_mapping(ptr: int, span: int, maps_text: str | None = None) -> Mapping | None:
    """The shared file mapping holding [ptr, ptr+span), from /proc/self/maps.

    Only MAP_SHARED mappings of files that still exist qualify: the engine
    opens the same path and must see the worker's writes.
    """
    if maps_text is None:
        with open("/proc/self/maps") as f:
            maps_text = f.read()
    rows = []
    for line in maps_text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 6:
            continue
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        rows.append((lo, hi, parts[1], int(parts[2], 16), parts[5]))
    for i, (lo, hi, perms, off, path) in enumerate(rows):
        if not lo <= ptr < hi:
            continue
        if len(perms) < 4 or perms[3] != "s" or not path.startswith("/") or path.endswith(" (deleted)"):
            return None
        end, file_end = hi, off + (hi - lo)
        j = i + 1
        # The kernel may split one mapping into adjacent rows.
        while end < ptr + span and j < len(rows) and rows[j][0] == end and rows[j][4] == path \
                and rows[j][3] == file_end and rows[j][2][3:4] == "s":
            end, file_end = rows[j][1], rows[j][3] + (rows[j][1] - rows[j][0])
            j += 1
        if ptr + span > end or not os.path.isfile(path):
            return None
        return Mapping(path, off + (ptr - lo))
    return None


class StagingBuffer:
    """A shared-memory bounce buffer for CPU caches the engine cannot open.

    A real vLLM CPU worker allocates its KV caches with torch, not in a
    file the engine can map. The connector then registers this buffer
    instead: `slots` block-sized slots, each holding one block of every
    layer packed back to back. Saves copy blocks into slots before the Save
    RPC, loads copy them out after the Load RPC (one memcpy per run).
    """

    def __init__(self, layout: ModelLayout, slots: int, directory: str, tag: str):
        self.layout = layout
        self.slots = slots
        self.slot_bytes = layout.block_bytes
        # slot_off[layer][seg]: where that run sits inside a slot.
        self.slot_off: list[list[int]] = []
        off = 0
        for layer in layout.layers:
            row = []
            for seg in layer.segments:
                row.append(off)
                off += seg.length
            self.slot_off.append(row)
        self.size = max(self.slot_bytes * slots, 1)
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, f"pegaflow-staging-{tag}-{uuid.uuid4().hex[:12]}")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, self.size)
            self._mm = mmap.mmap(fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self._buf = (ctypes.c_char * self.size).from_buffer(self._mm)
        self.addr = ctypes.addressof(self._buf)

    def copy_in(self, bases: Sequence[int], block_id: int, slot: int,
                group: int | None = None) -> None:
        """Cache block `block_id` (of KV cache group `group`; None: every
        layer) -> staging slot."""
        dst = self.addr + slot * self.slot_bytes
        for base, layer, offs in zip(bases, self.layout.layers, self.slot_off, strict=False):
            if group is not None and layer.group != group:
                continue
            for seg, o in zip(layer.segments, offs, strict=False):
                ctypes.memmove(dst + o, base + seg.offset + block_id * seg.stride, seg.length)

    def copy_out(self, bases: Sequence[int], slot: int, block_id: int,
                 group: int | None = None) -> None:
        """Staging slot -> cache block `block_id` (of group `group`)."""
        src = self.addr + slot * self.slot_bytes
        for base, layer, offs in zip(bases, self.layout.layers, self.slot_off, strict=False):
            if group is not None and layer.group != group:
                continue
            for seg, o in zip(layer.segments, offs, strict=False):
                ctypes.memmove(base + seg.offset + block_id * seg.stride, src + o, seg.length)

    def close(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        try:
            del self._buf
            self._mm.close()
        except (BufferError, ValueError):
            pass  # a copy still references the buffer; the OS frees it at exit


@dataclasses.dataclass(frozen=True)
class CudaAllocation:
    handle: bytes
    size: int
    offset: int  # of the tensor's first byte inside the allocation
    device_uuid: str


CUDA_IPC_HANDLE_BYTES = 64  # sizeof(cudaIpcMemHandle_t)


def ipc_mem_handle(raw: bytes) -> bytes:
    """The cudaIpcMemHandle_t inside torch's `_share_cuda_()` handle.

    Older torch returns the 64 handle bytes; newer torch prefixes a version
    byte and a type byte (b"c": cudaMalloc memory, b"e": an expandable
    segment, shared as a POSIX fd or fabric handle, which
    cudaIpcOpenMemHandle cannot open).
    """
    if len(raw) == CUDA_IPC_HANDLE_BYTES:
        return raw
    if len(raw) == CUDA_IPC_HANDLE_BYTES + 2 and raw[1:2] == b"c":
        return raw[2:]
    if len(raw) >= 2 and raw[1:2] == b"e":
        raise LayoutError("KV caches are in expandable segments (PYTORCH_CUDA_ALLOC_CONF="
                          "expandable_segments:True), which CUDA IPC handles cannot share; unset it")
    raise LayoutError(f"unrecognized torch CUDA IPC handle ({len(raw)} bytes)")


def cuda_allocation(t: Any) -> CudaAllocation:
    """IPC handle of the CUDA allocation behind a torch tensor.

    The handle names the caching allocator's whole block; the engine opens
    it with cudaIpcOpenMemHandle and addresses our bytes by offset.
    """
    import torch  # only on GPU workers

    storage = t.untyped_storage()
    shared = storage._share_cuda_()
    device, handle, storage_bytes, storage_offset = shared[0], shared[1], shared[2], shared[3]
    offset = storage_offset + (t.data_ptr() - storage.data_ptr())
    props = torch.cuda.get_device_properties(device)
    dev_uuid = str(getattr(props, "uuid", ""))
    if dev_uuid and not dev_uuid.startswith("GPU-"):
        dev_uuid = "GPU-" + dev_uuid
    return CudaAllocation(ipc_mem_handle(bytes(handle)), storage_offset + storage_bytes, offset, dev_uuid)


# ---------------------------------------------------------------- registration


@dataclasses.dataclass
class Registration:
    """What describing a rank's memory produced, besides the request."""

    mode: str  # "shm", "staging" or "cuda"
    staging: StagingBuffer | None = None
    # CUDA: the rank's interprocess event (None: saves sync on the host).
    ipc_event: Any = None


def describe_memory(req: pb.RegisterRequest, infos: Sequence[tuple[str, TensorInfo]],
                    layout: ModelLayout, *, staging_blocks: int, staging_dir: str,
                    rank: int) -> Registration:
    """Fills req's regions and layers for the rank's caches: CUDA IPC
    handles for CUDA tensors, else shared files or a staging buffer (the
    device decides, never the layout's label); caches on several devices
    are refused."""
    devices = {info.device.split(":")[0] for _, info in infos}
    if len(devices) > 1:
        raise LayoutError(f"KV cache layers on different devices ({sorted(devices)})")
    if infos[0][1].device.startswith("cuda"):
        return describe_cuda(req, infos, layout)
    return describe_cpu(req, infos, layout, staging_blocks=staging_blocks,
                        staging_dir=staging_dir, rank=rank)


def describe_cpu(req: pb.RegisterRequest, infos: Sequence[tuple[str, TensorInfo]],
                 layout: ModelLayout, *, staging_blocks: int, staging_dir: str,
                 rank: int) -> Registration:
    """CPU caches: in place when every layer lies in a shared file mapping
    the engine can open, else through a 2 x staging_blocks staging buffer
    (which req.num_blocks then counts)."""
    with open("/proc/self/maps") as f:
        maps = f.read()
    mappings = [find_file_mapping(info.ptr, info.span, maps) for _, info in infos]
    if all(m is not None for m in mappings):
        paths: dict[str, int] = {}
        for (name, _), m, layer in zip(infos, mappings, layout.layers, strict=False):
            assert m is not None
            if m.path not in paths:
                paths[m.path] = len(req.regions)
                req.regions.append(pb.MemoryRegion(shm_path=m.path, size=os.path.getsize(m.path)))
            req.layers.append(pb.LayerLayout(
                name=name, region_index=paths[m.path], group=layer.group,
                segments=[pb.Segment(offset=m.file_offset + s.offset, stride=s.stride,
                                     length=s.length) for s in layer.segments]))
        return Registration("shm")
    # Not in a file the engine can open (a real vLLM CPU worker):
    # register a staging buffer and bounce blocks through it.
    slots = staging_blocks
    st = StagingBuffer(layout, 2 * slots, staging_dir, f"{os.getpid()}-r{rank}")
    try:
        req.num_blocks = 2 * slots
        req.regions.append(pb.MemoryRegion(shm_path=st.path, size=st.size))
        for (name, _), layer, offs in zip(infos, layout.layers, st.slot_off, strict=False):
            req.layers.append(pb.LayerLayout(
                name=name, region_index=0, group=layer.group,
                segments=[pb.Segment(offset=o, stride=st.slot_bytes, length=s.length)
                          for s, o in zip(layer.segments, offs, strict=False)]))
    except BaseException:
        st.close()  # nobody else holds it yet
        raise
    log.info("pegaflow: rank %d KV caches are not in shared memory; using a %d-block staging "
             "buffer (%s)", rank, 2 * slots, st.path)
    return Registration("staging", staging=st)


def describe_cuda(req: pb.RegisterRequest, infos: Sequence[tuple[str, TensorInfo]],
                  layout: ModelLayout) -> Registration:
    """CUDA caches: one region per caching-allocator block (IPC handle),
    layers addressed by offset, plus the rank's interprocess event."""
    allocs: dict[bytes, int] = {}
    for (name, info), layer in zip(infos, layout.layers, strict=False):
        a: CudaAllocation = cuda_allocation(info.obj)
        if a.handle not in allocs:
            allocs[a.handle] = len(req.regions)
            req.regions.append(pb.MemoryRegion(cuda_ipc_handle=a.handle, size=a.size,
                                               device_uuid=a.device_uuid))
        else:
            region = req.regions[allocs[a.handle]]
            region.size = max(region.size, a.size)
        req.layers.append(pb.LayerLayout(
            name=name, region_index=allocs[a.handle], group=layer.group,
            segments=[pb.Segment(offset=a.offset + s.offset, stride=s.stride, length=s.length)
                      for s in layer.segments]))
    ipc_event, handle = interprocess_event(infos[0][1].obj)
    if handle:
        req.cuda_ipc_event = handle
    return Registration("cuda", ipc_event=ipc_event)


def interprocess_event(t: Any) -> tuple[Any, bytes]:
    """An interprocess CUDA event on the tensor's device and its
    cudaIpcEventHandle_t bytes, or (None, b"") where IPC events are not
    available (then saves fall back to a host-side sync on the save
    thread)."""
    try:
        import torch

        with torch.cuda.device(t.device):
            ev = torch.cuda.Event(interprocess=True)  # implies disable timing
            handle = bytes(ev.ipc_handle())  # creates the event on this device
        if len(handle) != 64:
            raise RuntimeError(f"cudaIpcEventHandle_t of {len(handle)} bytes")
        return ev, handle
    except Exception as e:  # noqa: BLE001 - any failure means: no IPC event
        log.info("pegaflow: no interprocess CUDA event (%s); saves sync on the save thread", e)
        return None, b""
