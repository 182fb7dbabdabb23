from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BlockStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BLOCK_STATUS_UNSPECIFIED: _ClassVar[BlockStatus]
    BLOCK_STATUS_OK: _ClassVar[BlockStatus]
    BLOCK_STATUS_MISSING: _ClassVar[BlockStatus]
    BLOCK_STATUS_FAILED: _ClassVar[BlockStatus]

class BlockEventKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BLOCK_EVENT_KIND_UNSPECIFIED: _ClassVar[BlockEventKind]
    BLOCK_EVENT_KIND_STORED: _ClassVar[BlockEventKind]
    BLOCK_EVENT_KIND_PRESENT: _ClassVar[BlockEventKind]
    BLOCK_EVENT_KIND_REMOVED: _ClassVar[BlockEventKind]
BLOCK_STATUS_UNSPECIFIED: BlockStatus
BLOCK_STATUS_OK: BlockStatus
BLOCK_STATUS_MISSING: BlockStatus
BLOCK_STATUS_FAILED: BlockStatus
BLOCK_EVENT_KIND_UNSPECIFIED: BlockEventKind
BLOCK_EVENT_KIND_STORED: BlockEventKind
BLOCK_EVENT_KIND_PRESENT: BlockEventKind
BLOCK_EVENT_KIND_REMOVED: BlockEventKind

class AttachRequest(_message.Message):
    __slots__ = ("client_name",)
    CLIENT_NAME_FIELD_NUMBER: _ClassVar[int]
    client_name: str
    def __init__(self, client_name: _Optional[str] = ...) -> None: ...

class SessionEvent(_message.Message):
    __slots__ = ("session_id", "engine_version", "backend", "peer_address")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ENGINE_VERSION_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    PEER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    engine_version: str
    backend: str
    peer_address: str
    def __init__(self, session_id: _Optional[str] = ..., engine_version: _Optional[str] = ..., backend: _Optional[str] = ..., peer_address: _Optional[str] = ...) -> None: ...

class Namespace(_message.Message):
    __slots__ = ("model", "model_revision", "dtype", "kv_layout", "block_size", "tp_size", "num_layers", "num_kv_heads", "head_size", "hash_algo", "hash_seed_fingerprint", "extra", "groups")
    class ExtraEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_REVISION_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    KV_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    TP_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_SIZE_FIELD_NUMBER: _ClassVar[int]
    HASH_ALGO_FIELD_NUMBER: _ClassVar[int]
    HASH_SEED_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    EXTRA_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_revision: str
    dtype: str
    kv_layout: str
    block_size: int
    tp_size: int
    num_layers: int
    num_kv_heads: int
    head_size: int
    hash_algo: str
    hash_seed_fingerprint: bytes
    extra: _containers.ScalarMap[str, str]
    groups: _containers.RepeatedCompositeFieldContainer[KVGroup]
    def __init__(self, model: _Optional[str] = ..., model_revision: _Optional[str] = ..., dtype: _Optional[str] = ..., kv_layout: _Optional[str] = ..., block_size: _Optional[int] = ..., tp_size: _Optional[int] = ..., num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_size: _Optional[int] = ..., hash_algo: _Optional[str] = ..., hash_seed_fingerprint: _Optional[bytes] = ..., extra: _Optional[_Mapping[str, str]] = ..., groups: _Optional[_Iterable[_Union[KVGroup, _Mapping]]] = ...) -> None: ...

class KVGroup(_message.Message):
    __slots__ = ("index", "kind", "window_tokens")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    WINDOW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    index: int
    kind: str
    window_tokens: int
    def __init__(self, index: _Optional[int] = ..., kind: _Optional[str] = ..., window_tokens: _Optional[int] = ...) -> None: ...

class OpenNamespaceRequest(_message.Message):
    __slots__ = ("session_id", "namespace")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    namespace: Namespace
    def __init__(self, session_id: _Optional[str] = ..., namespace: _Optional[_Union[Namespace, _Mapping]] = ...) -> None: ...

class OpenNamespaceResponse(_message.Message):
    __slots__ = ("namespace_id",)
    NAMESPACE_ID_FIELD_NUMBER: _ClassVar[int]
    namespace_id: str
    def __init__(self, namespace_id: _Optional[str] = ...) -> None: ...

class MemoryRegion(_message.Message):
    __slots__ = ("shm_path", "cuda_ipc_handle", "size", "device_uuid")
    SHM_PATH_FIELD_NUMBER: _ClassVar[int]
    CUDA_IPC_HANDLE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    shm_path: str
    cuda_ipc_handle: bytes
    size: int
    device_uuid: str
    def __init__(self, shm_path: _Optional[str] = ..., cuda_ipc_handle: _Optional[bytes] = ..., size: _Optional[int] = ..., device_uuid: _Optional[str] = ...) -> None: ...

class Segment(_message.Message):
    __slots__ = ("offset", "stride", "length")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    offset: int
    stride: int
    length: int
    def __init__(self, offset: _Optional[int] = ..., stride: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class LayerLayout(_message.Message):
    __slots__ = ("name", "region_index", "segments", "group")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REGION_INDEX_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    name: str
    region_index: int
    segments: _containers.RepeatedCompositeFieldContainer[Segment]
    group: int
    def __init__(self, name: _Optional[str] = ..., region_index: _Optional[int] = ..., segments: _Optional[_Iterable[_Union[Segment, _Mapping]]] = ..., group: _Optional[int] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("session_id", "instance_id", "rank", "namespace", "num_blocks", "regions", "layers", "cuda_ipc_event")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    CUDA_IPC_EVENT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    instance_id: str
    rank: int
    namespace: Namespace
    num_blocks: int
    regions: _containers.RepeatedCompositeFieldContainer[MemoryRegion]
    layers: _containers.RepeatedCompositeFieldContainer[LayerLayout]
    cuda_ipc_event: bytes
    def __init__(self, session_id: _Optional[str] = ..., instance_id: _Optional[str] = ..., rank: _Optional[int] = ..., namespace: _Optional[_Union[Namespace, _Mapping]] = ..., num_blocks: _Optional[int] = ..., regions: _Optional[_Iterable[_Union[MemoryRegion, _Mapping]]] = ..., layers: _Optional[_Iterable[_Union[LayerLayout, _Mapping]]] = ..., cuda_ipc_event: _Optional[bytes] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("namespace_id", "bytes_per_block", "cuda_event")
    NAMESPACE_ID_FIELD_NUMBER: _ClassVar[int]
    BYTES_PER_BLOCK_FIELD_NUMBER: _ClassVar[int]
    CUDA_EVENT_FIELD_NUMBER: _ClassVar[int]
    namespace_id: str
    bytes_per_block: int
    cuda_event: bool
    def __init__(self, namespace_id: _Optional[str] = ..., bytes_per_block: _Optional[int] = ..., cuda_event: bool = ...) -> None: ...

class UnregisterRequest(_message.Message):
    __slots__ = ("session_id", "instance_id", "rank")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    instance_id: str
    rank: int
    def __init__(self, session_id: _Optional[str] = ..., instance_id: _Optional[str] = ..., rank: _Optional[int] = ...) -> None: ...

class UnregisterResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BlockRef(_message.Message):
    __slots__ = ("block_id", "hash", "group")
    BLOCK_ID_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    block_id: int
    hash: bytes
    group: int
    def __init__(self, block_id: _Optional[int] = ..., hash: _Optional[bytes] = ..., group: _Optional[int] = ...) -> None: ...

class SaveRequest(_message.Message):
    __slots__ = ("session_id", "instance_id", "rank", "blocks", "transfer_id", "transfer_last", "ready_url", "ready_token", "wait_event")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_LAST_FIELD_NUMBER: _ClassVar[int]
    READY_URL_FIELD_NUMBER: _ClassVar[int]
    READY_TOKEN_FIELD_NUMBER: _ClassVar[int]
    WAIT_EVENT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    instance_id: str
    rank: int
    blocks: _containers.RepeatedCompositeFieldContainer[BlockRef]
    transfer_id: str
    transfer_last: bool
    ready_url: str
    ready_token: str
    wait_event: bool
    def __init__(self, session_id: _Optional[str] = ..., instance_id: _Optional[str] = ..., rank: _Optional[int] = ..., blocks: _Optional[_Iterable[_Union[BlockRef, _Mapping]]] = ..., transfer_id: _Optional[str] = ..., transfer_last: bool = ..., ready_url: _Optional[str] = ..., ready_token: _Optional[str] = ..., wait_event: bool = ...) -> None: ...

class SaveResponse(_message.Message):
    __slots__ = ("saved", "skipped", "failed")
    SAVED_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    saved: int
    skipped: int
    failed: int
    def __init__(self, saved: _Optional[int] = ..., skipped: _Optional[int] = ..., failed: _Optional[int] = ...) -> None: ...

class LoadRequest(_message.Message):
    __slots__ = ("session_id", "instance_id", "rank", "blocks", "lease_id", "transfer_id", "wait_event")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    WAIT_EVENT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    instance_id: str
    rank: int
    blocks: _containers.RepeatedCompositeFieldContainer[BlockRef]
    lease_id: str
    transfer_id: str
    wait_event: bool
    def __init__(self, session_id: _Optional[str] = ..., instance_id: _Optional[str] = ..., rank: _Optional[int] = ..., blocks: _Optional[_Iterable[_Union[BlockRef, _Mapping]]] = ..., lease_id: _Optional[str] = ..., transfer_id: _Optional[str] = ..., wait_event: bool = ...) -> None: ...

class LoadResponse(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: _containers.RepeatedScalarFieldContainer[BlockStatus]
    def __init__(self, status: _Optional[_Iterable[_Union[BlockStatus, str]]] = ...) -> None: ...

class QueryRequest(_message.Message):
    __slots__ = ("session_id", "namespace_id", "hashes", "wait_ms", "lease", "lease_ttl_ms", "transfer_id", "packed_hashes", "hash_len", "source_engine", "first_block")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_ID_FIELD_NUMBER: _ClassVar[int]
    HASHES_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_MS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    PACKED_HASHES_FIELD_NUMBER: _ClassVar[int]
    HASH_LEN_FIELD_NUMBER: _ClassVar[int]
    SOURCE_ENGINE_FIELD_NUMBER: _ClassVar[int]
    FIRST_BLOCK_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    namespace_id: str
    hashes: _containers.RepeatedScalarFieldContainer[bytes]
    wait_ms: int
    lease: bool
    lease_ttl_ms: int
    transfer_id: str
    packed_hashes: bytes
    hash_len: int
    source_engine: str
    first_block: int
    def __init__(self, session_id: _Optional[str] = ..., namespace_id: _Optional[str] = ..., hashes: _Optional[_Iterable[bytes]] = ..., wait_ms: _Optional[int] = ..., lease: bool = ..., lease_ttl_ms: _Optional[int] = ..., transfer_id: _Optional[str] = ..., packed_hashes: _Optional[bytes] = ..., hash_len: _Optional[int] = ..., source_engine: _Optional[str] = ..., first_block: _Optional[int] = ...) -> None: ...

class QueryResponse(_message.Message):
    __slots__ = ("num_hit", "lease_id", "num_inflight")
    NUM_HIT_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    num_hit: int
    lease_id: str
    num_inflight: int
    def __init__(self, num_hit: _Optional[int] = ..., lease_id: _Optional[str] = ..., num_inflight: _Optional[int] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("session_id", "lease_id", "transfer_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    lease_id: str
    transfer_id: str
    def __init__(self, session_id: _Optional[str] = ..., lease_id: _Optional[str] = ..., transfer_id: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BlockEvent(_message.Message):
    __slots__ = ("seq", "kind", "group", "hash")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    seq: int
    kind: BlockEventKind
    group: int
    hash: bytes
    def __init__(self, seq: _Optional[int] = ..., kind: _Optional[_Union[BlockEventKind, str]] = ..., group: _Optional[int] = ..., hash: _Optional[bytes] = ...) -> None: ...

class BlockEventsRequest(_message.Message):
    __slots__ = ("session_id", "namespace_id", "after", "max_events", "epoch")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    MAX_EVENTS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    namespace_id: str
    after: int
    max_events: int
    epoch: str
    def __init__(self, session_id: _Optional[str] = ..., namespace_id: _Optional[str] = ..., after: _Optional[int] = ..., max_events: _Optional[int] = ..., epoch: _Optional[str] = ...) -> None: ...

class BlockEventsResponse(_message.Message):
    __slots__ = ("events", "next", "gap", "epoch", "restarted")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_FIELD_NUMBER: _ClassVar[int]
    GAP_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    RESTARTED_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[BlockEvent]
    next: int
    gap: bool
    epoch: str
    restarted: bool
    def __init__(self, events: _Optional[_Iterable[_Union[BlockEvent, _Mapping]]] = ..., next: _Optional[int] = ..., gap: bool = ..., epoch: _Optional[str] = ..., restarted: bool = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("status", "backend", "version")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    status: str
    backend: str
    version: str
    def __init__(self, status: _Optional[str] = ..., backend: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("pool_capacity_bytes", "pool_used_bytes", "resident_blocks", "pinned_blocks", "inflight_blocks", "hits", "misses", "saves", "loads", "evictions", "save_failures", "namespaces", "instances", "sessions", "bytes_saved", "bytes_loaded")
    POOL_CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    POOL_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PINNED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    SAVES_FIELD_NUMBER: _ClassVar[int]
    LOADS_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    SAVE_FAILURES_FIELD_NUMBER: _ClassVar[int]
    NAMESPACES_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    BYTES_SAVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_LOADED_FIELD_NUMBER: _ClassVar[int]
    pool_capacity_bytes: int
    pool_used_bytes: int
    resident_blocks: int
    pinned_blocks: int
    inflight_blocks: int
    hits: int
    misses: int
    saves: int
    loads: int
    evictions: int
    save_failures: int
    namespaces: int
    instances: int
    sessions: int
    bytes_saved: int
    bytes_loaded: int
    def __init__(self, pool_capacity_bytes: _Optional[int] = ..., pool_used_bytes: _Optional[int] = ..., resident_blocks: _Optional[int] = ..., pinned_blocks: _Optional[int] = ..., inflight_blocks: _Optional[int] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., saves: _Optional[int] = ..., loads: _Optional[int] = ..., evictions: _Optional[int] = ..., save_failures: _Optional[int] = ..., namespaces: _Optional[int] = ..., instances: _Optional[int] = ..., sessions: _Optional[int] = ..., bytes_saved: _Optional[int] = ..., bytes_loaded: _Optional[int] = ...) -> None: ...
