"""vLLM's KV event classes (vllm.distributed.kv_events) and its hash
conversion for events, or stand-ins with the same fields.

BlockStored/BlockRemoved/AllBlocksCleared exist since vLLM 0.9 (msgspec
structs, tagged); `medium` came in 0.10, `lora_name` in 0.11 and
`group_idx` in 2026 (0.2x): fields a release lacks are left out of the
constructor call. Event hashes go through vLLM's maybe_convert_block_hash
(0.11+: the low 64 bits as an int unless VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES
is 0), so they equal the hashes of vLLM's own GPU events; without it, the
raw bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

MEDIUM_CPU = "CPU"

try:  # pragma: no cover - exercised only where vLLM is installed
    from vllm.distributed.kv_events import (  # type: ignore
        AllBlocksCleared,
        BlockRemoved,
        BlockStored,
    )
except Exception:  # noqa: BLE001 - no vLLM (tests, tools), or a broken install

    @dataclass
    class BlockStored:  # type: ignore[no-redef]
        block_hashes: list[Any]
        parent_block_hash: Any
        token_ids: list[int]
        block_size: int
        lora_id: int | None
        medium: str | None
        lora_name: str | None = None
        group_idx: int | None = None

    @dataclass
    class BlockRemoved:  # type: ignore[no-redef]
        block_hashes: list[Any]
        medium: str | None
        group_idx: int | None = None

    @dataclass
    class AllBlocksCleared:  # type: ignore[no-redef]
        pass

try:  # pragma: no cover - exercised only where vLLM is installed
    from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash as _convert  # type: ignore
except Exception:  # noqa: BLE001
    def _convert(h: Any) -> Any:
        return h


def _fields(cls: type) -> frozenset[str]:
    names = getattr(cls, "__struct_fields__", None)
    if names is None:
        names = tuple(getattr(cls, "__dataclass_fields__", {}))
    return frozenset(names)


_STORED_FIELDS = _fields(BlockStored)
_REMOVED_FIELDS = _fields(BlockRemoved)


def _make(cls: type, known: frozenset[str], **kw: Any) -> Any:
    return cls(**{k: v for k, v in kw.items() if k in known})


def kv_events_enabled(vllm_config: Any) -> bool:
    """vLLM publishes KV events (--kv-events-config enable_kv_cache_events)."""
    kec = getattr(vllm_config, "kv_events_config", None)
    return bool(getattr(kec, "enable_kv_cache_events", False))


def vllm_kv_events(events: Iterable[Any], block_size: int,
                   convert: Callable[[Any], Any] = _convert) -> list[Any]:
    """The connector's events (kv_events.Stored/Removed/Cleared, read by
    attribute) as vLLM's classes, medium CPU."""
    out: list[Any] = []
    for ev in events:
        hashes = getattr(ev, "hashes", None)
        if hashes is None:
            out.append(AllBlocksCleared())
        elif hasattr(ev, "token_ids"):
            out.append(_make(BlockStored, _STORED_FIELDS,
                             block_hashes=[convert(h) for h in hashes],
                             parent_block_hash=None if ev.parent is None else convert(ev.parent),
                             token_ids=list(ev.token_ids), block_size=block_size, lora_id=None,
                             medium=MEDIUM_CPU, lora_name=None, group_idx=ev.group))
        else:
            out.append(_make(BlockRemoved, _REMOVED_FIELDS, block_hashes=[convert(h) for h in hashes],
                             medium=MEDIUM_CPU, group_idx=ev.group))
    return out
