"""Scheduler -> worker messages (pickled by vLLM once per step)."""

from __future__ import annotations

import dataclasses

from .compat import KVConnectorHandshakeMetadata, KVConnectorMetadata


@dataclasses.dataclass
class LoadSpec:
    """Copy `hashes[i]` from the engine into cache block `block_ids[i]`
    (of KV cache group `groups[i]`; `groups` empty: every block is group 0,
    a one-group model)."""

    req_id: str
    block_ids: list[int]
    hashes: list[bytes]
    lease_id: str = ""
    transfer_id: str = ""
    groups: list[int] = dataclasses.field(default_factory=list)

    def group(self, i: int) -> int:
        return self.groups[i] if self.groups else 0


@dataclasses.dataclass
class SaveSpec:
    """Store cache block `block_ids[i]` under `hashes[i]`.

    Only blocks whose tokens are all computed by the end of this step's
    forward pass are listed. With a transfer id the blocks are tagged for
    P/D; `transfer_last` marks this request's last save of the transfer.
    """

    req_id: str
    block_ids: list[int]
    hashes: list[bytes]
    transfer_id: str = ""
    transfer_last: bool = False
    ready_url: str = ""
    ready_token: str = ""
    # KV cache group of each block (empty: group 0 for all, one group).
    groups: list[int] = dataclasses.field(default_factory=list)

    def group(self, i: int) -> int:
        return self.groups[i] if self.groups else 0


@dataclasses.dataclass
class PegaConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = dataclasses.field(default_factory=list)
    saves: list[SaveSpec] = dataclasses.field(default_factory=list)
    # Requests whose blocks vLLM frees only after every worker reported
    # them in get_finished's first set (request_finished returned True).
    delayed_free: set[str] = dataclasses.field(default_factory=set)
    # Requests preempted this step: their blocks may be reused by this
    # very forward pass, so their in-flight saves must finish first.
    preempted: set[str] = dataclasses.field(default_factory=set)
    # Requests with saves planned from blocks vLLM freed early (sliding
    # window, chunked local, offered states) and hands out again this step:
    # as for `preempted`, their in-flight saves finish before the forward.
    fence: set[str] = dataclasses.field(default_factory=set)

    def empty(self) -> bool:
        return not (self.loads or self.saves or self.delayed_free or self.preempted or self.fence)


@dataclasses.dataclass
class PegaHandshake(KVConnectorHandshakeMetadata):
    """Worker -> scheduler, once after registration: the namespace the
    worker's KV memory lives in, so the scheduler queries the same one.
    A rank whose connector could not start sends no namespace and the
    reason in `disabled`: the scheduler then disables its side too."""

    namespace: bytes  # serialized pegaflow.v1.Namespace
    namespace_id: str
    rank: int
    disabled: str = ""
