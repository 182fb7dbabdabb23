"""vLLM's Request and SchedulerOutput: block hashes, P/D parameters,
resumed and preempted requests, as each release shapes them."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Any


def hash_bytes(h: Any) -> bytes:
    """One block hash as bytes.

    vLLM's BlockHash is bytes since vllm PR #23673 (0.10.2/0.11, Sep 2025);
    earlier releases used the BlockHashType named tuple with an int
    `hash_value` (V1 before that), or plain ints; ints become 32 big-endian
    bytes so that the engine sees one width.
    """
    if isinstance(h, bytes):
        return h
    if isinstance(h, (bytearray, memoryview)):
        return bytes(h)
    v = getattr(h, "hash_value", h)
    if isinstance(v, bytes):
        return v
    if isinstance(v, int):
        return (v & ((1 << 256) - 1)).to_bytes(32, "big")
    raise TypeError(f"unsupported block hash {type(h).__name__}")


def request_block_hashes(request: Any) -> list[Any]:
    """Request.block_hashes (one per full block). vLLM moved them from the
    KV cache manager onto Request in vllm PR #19728 (0.10, mid 2025); on
    earlier releases a connector cannot see them, so nothing is queried or
    saved."""
    hs = getattr(request, "block_hashes", None)
    return hs if hs is not None else []


def kv_transfer_params(request: Any) -> dict[str, Any]:
    """Request.kv_transfer_params, the client's P/D parameters; requests of
    releases before P/D support (vLLM < 0.9) have no such attribute, and
    requests without parameters carry None."""
    return getattr(request, "kv_transfer_params", None) or {}


def num_prompt_tokens(request: Any) -> int:
    """Request.num_prompt_tokens, else len(prompt_token_ids) for request
    objects without the property (early V1 requests and stand-ins)."""
    n = getattr(request, "num_prompt_tokens", None)
    if n is None:
        n = len(getattr(request, "prompt_token_ids", None) or [])
    return int(n)


def num_publishable_block_hashes(request: Any) -> int | None:
    """Request.num_publishable_block_hashes, the cap on blocks a connector
    may publish, which only recent vLLM (2026) has; None where absent (no
    cap beyond the computed tokens)."""
    publishable = getattr(request, "num_publishable_block_hashes", None)
    return publishable if isinstance(publishable, int) else None


# ---------------------------------------------------------------- scheduler output


def resumed_req_ids(cached: Any) -> set[str]:
    """Cached requests resumed from preemption this step (their block ids
    are replaced, not extended). CachedRequestData.resumed_req_ids (a set)
    replaced the per-request resumed_from_preemption flags in late 2025
    (0.11.1); both are read."""
    r = getattr(cached, "resumed_req_ids", None)
    if r is not None:
        return set(r)
    flags: Iterable[bool] = getattr(cached, "resumed_from_preemption", None) or ()
    return {rid for rid, f in zip(cached.req_ids, flags, strict=False) if f}


def preempted_req_ids(scheduler_output: Any) -> Iterable[str] | None:
    """SchedulerOutput.preempted_req_ids, or None on releases that do not
    list preemptions (before late 2025): the scheduler then treats tracked
    requests missing from the step as possibly preempted."""
    preempted: Iterable[str] | None = getattr(scheduler_output, "preempted_req_ids", None)
    return preempted


def preemption_ids_arg(arg: Any) -> Collection[str] | None:
    """handle_preemptions' argument when it is the set of preempted request
    ids (some releases) rather than the step's connector metadata (vLLM
    0.33); None otherwise."""
    if isinstance(arg, (set, frozenset, list, tuple)):
        return arg
    return None
