"""Connector configuration: `kv_connector_extra_config` keys and env vars.

Precedence: extra-config key > environment variable > default. The socket
path shares `PEGAFLOW_SOCKET` (and its default) with `pegaflow serve`, so one
variable points both at the same engine; every other variable is prefixed
`PEGAFLOW_CONNECTOR_` so that it never collides with an engine flag (the
engine reads every `PEGAFLOW_<FLAG>` variable as its own flag).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
from collections.abc import Callable, Mapping
from typing import Any

from .compat import resolved_hash_seed
from .ready import ReadyAllow

_FALSE = {"0", "false", "no", "off", ""}


def default_socket_path() -> str:
    """The engine's default socket, computed exactly as `pegaflow serve` does."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "pegaflow", "engine.sock")
    return f"/tmp/pegaflow-{os.getuid()}/engine.sock"


class UnsafeSocketDir(ValueError):
    """The engine socket's directory could let another user swap the socket."""


def check_socket_dir(socket_path: str, trusted_owner: str | None = None) -> None:
    """Refuses a socket whose directory another user could change.

    Whoever can write the directory can rename the engine's socket away and
    bind their own, receiving this worker's registrations and KV bytes. The
    engine creates the directory 0700 (0750 with --socket-group) and refuses
    to start in an unsafe one; this is the same check on the client's side:
    not a symlink, owned by root, by us or by `trusted_owner` (a user name
    or uid: the engine's own user when it runs as a dedicated one, as the
    systemd unit in deploy/ does), not group- or world-writable.
    Raises UnsafeSocketDir naming the directory.
    """
    trusted = {0, os.geteuid()}
    if trusted_owner:
        trusted.add(_uid_of(trusted_owner))
    d = os.path.dirname(os.path.abspath(socket_path))
    try:
        st = os.lstat(d)
    except OSError as e:
        raise UnsafeSocketDir(f"engine socket directory {d}: {e.strerror}") from e
    why = ""
    if stat.S_ISLNK(st.st_mode):
        why = "is a symlink"
    elif not stat.S_ISDIR(st.st_mode):
        why = "is not a directory"
    elif st.st_uid not in trusted:
        why = (f"is owned by uid {st.st_uid}, not root, us (uid {os.geteuid()}) or the "
               f"socket_owner ({trusted_owner or 'unset'})")
    elif st.st_mode & 0o022:
        why = f"is group- or world-writable (mode {stat.S_IMODE(st.st_mode):04o})"
    if why:
        raise UnsafeSocketDir(f"engine socket directory {d} {why}: another user could replace the "
                              f"socket; not connecting (fix the directory or the socket_path)")


def _uid_of(owner: str) -> int:
    """A user name or numeric uid as a uid (UnsafeSocketDir for an unknown user)."""
    if owner.isdigit():
        return int(owner)
    import pwd
    try:
        return pwd.getpwnam(owner).pw_uid
    except KeyError as e:
        raise UnsafeSocketDir(f"socket_owner {owner!r} is not a known user") from e


def _as_bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    return str(v).strip().lower() not in _FALSE


def _as_dict(v: Any) -> dict[str, str]:
    if isinstance(v, Mapping):
        return {str(k): str(x) for k, x in v.items()}
    text = str(v).strip()
    if not text:
        return {}
    if text.startswith("{"):
        return {str(k): str(x) for k, x in json.loads(text).items()}
    out: dict[str, str] = {}
    for item in text.split(","):
        if item.strip():
            k, _, x = item.partition("=")
            out[k.strip()] = x.strip()
    return out


@dataclasses.dataclass(frozen=True)
class _Key:
    name: str
    env: str
    default: Any
    conv: Callable[[Any], Any]
    doc: str


# The documented configuration surface (README's table is generated from
# the same words). Keys are `kv_connector_extra_config` names.
KEYS: tuple[_Key, ...] = (
    _Key("socket_path", "PEGAFLOW_SOCKET", None, str,
         "engine API UNIX socket (default: the engine's default socket)"),
    _Key("socket_owner", "PEGAFLOW_CONNECTOR_SOCKET_OWNER", None, str,
         "user (name or uid) trusted to own the socket's directory besides root and "
         "vLLM's own user: the engine's user when it runs as a dedicated one"),
    _Key("instance_id", "PEGAFLOW_CONNECTOR_INSTANCE_ID", None, str,
         "stable name of this vLLM instance (default: `vllm-<engine_id>`)"),
    _Key("model_name", "PEGAFLOW_CONNECTOR_MODEL_NAME", None, str,
         "model name in the namespace key (default: vLLM's model); set it when "
         "P and D load the same model from different paths"),
    _Key("namespace_extra", "PEGAFLOW_CONNECTOR_NAMESPACE_EXTRA", {}, _as_dict,
         "extra namespace key entries, `k=v,k2=v2` or JSON"),
    _Key("query_wait_ms", "PEGAFLOW_CONNECTOR_QUERY_WAIT_MS", 5000, int,
         "decode side: how long a P/D query waits for the prefill's transfer"),
    _Key("query_timeout_ms", "PEGAFLOW_CONNECTOR_QUERY_TIMEOUT_MS", 1000, int,
         "deadline of a plain (non-waiting) query RPC"),
    _Key("lease_ttl_ms", "PEGAFLOW_CONNECTOR_LEASE_TTL_MS", 30000, int,
         "how long a query hit stays pinned for the load that follows"),
    _Key("rpc_timeout_ms", "PEGAFLOW_CONNECTOR_RPC_TIMEOUT_MS", 30000, int,
         "deadline of Save/Load/Register RPCs"),
    _Key("connect_timeout_ms", "PEGAFLOW_CONNECTOR_CONNECT_TIMEOUT_MS", 2000, int,
         "deadline of one connection attempt (Attach)"),
    _Key("reconnect_min_ms", "PEGAFLOW_CONNECTOR_RECONNECT_MIN_MS", 50, int,
         "first reconnect backoff"),
    _Key("reconnect_max_ms", "PEGAFLOW_CONNECTOR_RECONNECT_MAX_MS", 5000, int,
         "largest reconnect backoff"),
    _Key("async_query", "PEGAFLOW_CONNECTOR_ASYNC_QUERY", True, _as_bool,
         "run every cache query off vLLM's scheduler thread and answer `None` "
         "(\"ask again next step\") meanwhile; false queries on the scheduler "
         "thread (the synchronous behaviour, kept for benchmarks)"),
    _Key("save_decode_blocks", "PEGAFLOW_CONNECTOR_SAVE_DECODE_BLOCKS", True, _as_bool,
         "also save full blocks of generated tokens (multi-turn reuse)"),
    _Key("staging_blocks", "PEGAFLOW_CONNECTOR_STAGING_BLOCKS", 128, int,
         "CPU caches outside shared memory: blocks per staging buffer"),
    _Key("staging_dir", "PEGAFLOW_CONNECTOR_STAGING_DIR", "/dev/shm", str,
         "where CPU staging buffers are created"),
    _Key("preemption_wait_ms", "PEGAFLOW_CONNECTOR_PREEMPTION_WAIT_MS", 30000, int,
         "longest a preempted request's in-flight save may delay the next forward"),
    _Key("tp_rank", "PEGAFLOW_CONNECTOR_TP_RANK", None, int,
         "override of the worker's TP rank (normally taken from vLLM)"),
    # The engine's own variable, on purpose: one list, one meaning, for the
    # engine's report and the connector's.
    _Key("kv_ready_allow", "PEGAFLOW_KV_READY_ALLOW", ReadyAllow.parse(""), ReadyAllow.parse,
         "where the connector may POST a failed transfer's report (the request's "
         "`pegaflow_ready_url`): the engine's `--kv-ready-allow` syntax (`host:port`, URL "
         "prefix, `CIDR:port`, `loopback`, `none`); default `loopback`; redirects never followed"),
)


@dataclasses.dataclass
class ConnectorConfig:
    socket_path: str
    socket_owner: str | None = None
    instance_id: str | None = None
    model_name: str | None = None
    namespace_extra: dict[str, str] = dataclasses.field(default_factory=dict)
    query_wait_ms: int = 5000
    query_timeout_ms: int = 1000
    lease_ttl_ms: int = 30000
    rpc_timeout_ms: int = 30000
    connect_timeout_ms: int = 2000
    reconnect_min_ms: int = 50
    reconnect_max_ms: int = 5000
    async_query: bool = True
    save_decode_blocks: bool = True
    staging_blocks: int = 128
    staging_dir: str = "/dev/shm"
    preemption_wait_ms: int = 30000
    tp_rank: int | None = None
    kv_ready_allow: ReadyAllow = dataclasses.field(default_factory=lambda: ReadyAllow.parse(""))

    @classmethod
    def load(cls, extra: Mapping[str, Any] | None = None,
             env: Mapping[str, str] | None = None) -> ConnectorConfig:
        """Builds the config; raises ValueError naming the bad key."""
        extra = dict(extra or {})
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for key in KEYS:
            raw: Any = None
            source = ""
            if key.name in extra and extra[key.name] is not None:
                raw, source = extra[key.name], f"kv_connector_extra_config[{key.name!r}]"
            elif env.get(key.env) not in (None, ""):
                raw, source = env[key.env], key.env
            if raw is None:
                value = key.default
            else:
                try:
                    value = key.conv(raw)
                except (TypeError, ValueError) as e:
                    raise ValueError(f"pegaflow connector: {source}={raw!r}: {e}") from e
            values[key.name] = value
        if values["socket_path"] is None:
            values["socket_path"] = default_socket_path()
        for name in ("query_wait_ms", "query_timeout_ms", "lease_ttl_ms", "rpc_timeout_ms",
                     "connect_timeout_ms", "reconnect_min_ms", "reconnect_max_ms",
                     "staging_blocks", "preemption_wait_ms"):
            if values[name] < 0 or (name != "query_wait_ms" and values[name] == 0):
                raise ValueError(f"pegaflow connector: {name}={values[name]} must be positive")
        if values["reconnect_max_ms"] < values["reconnect_min_ms"]:
            values["reconnect_max_ms"] = values["reconnect_min_ms"]
        unknown = sorted(k for k in extra if k not in {key.name for key in KEYS})
        cfg = cls(**values)
        cfg.unknown_keys = unknown  # type: ignore[attr-defined]
        return cfg


def hash_seed_fingerprint(hash_algo: str, env: Mapping[str, str] | None = None) -> bytes:
    """Fingerprint of the seed vLLM roots its block-hash chain in (NONE_HASH).

    Two instances produce equal block hashes only when both the hash
    algorithm and that seed agree. The seed is resolved the way vLLM does
    (compat.resolved_hash_seed: PYTHONHASHSEED, else vLLM's fixed default
    for sha256/sha256_cbor), so scheduler and workers of one instance, and
    instances started with or without PYTHONHASHSEED, agree exactly when
    their hashes do. Empty when vLLM seeds randomly per process (xxhash
    without PYTHONHASHSEED): nothing is shareable, the caller keeps the
    instance's blocks private.
    """
    seed = resolved_hash_seed(hash_algo, env)
    if seed is None:
        return b""
    h = hashlib.sha256(b"pegaflow-hash-seed/v1\0" + hash_algo.encode() + b"\0" + seed.encode())
    return h.digest()[:16]


def private_hash_seed_fingerprint(hash_algo: str, instance_id: str) -> bytes:
    """For a randomly seeded instance: a fingerprint (and namespace key)
    no other instance has, so its blocks are reused only by itself."""
    h = hashlib.sha256(b"pegaflow-hash-seed/v1\0" + hash_algo.encode() + b"\0random\0" +
                       instance_id.encode())
    return h.digest()[:16]
