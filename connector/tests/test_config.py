"""Configuration: extra-config keys, env vars, defaults, fingerprints."""

from __future__ import annotations

import pytest

from pegaflow_connector.config import KEYS, ConnectorConfig, default_socket_path, hash_seed_fingerprint


def test_defaults_follow_the_engine_socket() -> None:
    cfg = ConnectorConfig.load({}, env={})
    assert cfg.socket_path == default_socket_path()
    assert cfg.query_wait_ms == 5000 and cfg.async_query is True


def test_precedence_extra_over_env_over_default() -> None:
    env = {"PEGAFLOW_SOCKET": "/env.sock", "PEGAFLOW_CONNECTOR_QUERY_WAIT_MS": "250",
           "PEGAFLOW_CONNECTOR_ASYNC_QUERY": "false", "PEGAFLOW_CONNECTOR_NAMESPACE_EXTRA": "a=1,b=2"}
    cfg = ConnectorConfig.load({"socket_path": "/extra.sock"}, env=env)
    assert cfg.socket_path == "/extra.sock"
    assert cfg.query_wait_ms == 250 and cfg.async_query is False
    assert cfg.namespace_extra == {"a": "1", "b": "2"}
    cfg = ConnectorConfig.load({"namespace_extra": {"lora": "x"}}, env=env)
    assert cfg.namespace_extra == {"lora": "x"}


def test_connector_env_vars_never_collide_with_engine_flags() -> None:
    # The engine reads PEGAFLOW_<FLAG> for every flag; ours are namespaced,
    # except the socket and the ready allow list, which mean the same thing
    # to both.
    for k in KEYS:
        assert k.env in ("PEGAFLOW_SOCKET", "PEGAFLOW_KV_READY_ALLOW") or k.env.startswith("PEGAFLOW_CONNECTOR_"), k.env


@pytest.mark.parametrize("extra,msg", [
    ({"query_wait_ms": "soon"}, "query_wait_ms"),
    ({"lease_ttl_ms": 0}, "positive"),
    ({"rpc_timeout_ms": -5}, "positive"),
])
def test_bad_values_name_the_key(extra: dict, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        ConnectorConfig.load(extra, env={})


def test_unknown_keys_are_reported() -> None:
    cfg = ConnectorConfig.load({"sokcet_path": "/x"}, env={})
    assert cfg.unknown_keys == ["sokcet_path"]  # type: ignore[attr-defined]


def test_hash_seed_fingerprint() -> None:
    a = hash_seed_fingerprint("sha256", {"PYTHONHASHSEED": "0"})
    assert a == hash_seed_fingerprint("sha256", {"PYTHONHASHSEED": "0"}) and len(a) == 16
    assert a != hash_seed_fingerprint("sha256", {"PYTHONHASHSEED": "1"})
    assert a != hash_seed_fingerprint("sha256_cbor", {"PYTHONHASHSEED": "0"})
    # Unset: vLLM's fixed default seed for sha256/sha256_cbor (issue 17,
    # item 4), a random one for xxhash (nothing shareable: empty).
    unset = hash_seed_fingerprint("sha256", {})
    assert unset and unset == hash_seed_fingerprint("sha256", {"PYTHONHASHSEED": "vllm-none-hash"})
    assert unset != a and hash_seed_fingerprint("sha256_cbor", {})
    assert hash_seed_fingerprint("xxhash", {}) == b""
    assert hash_seed_fingerprint("xxhash", {"PYTHONHASHSEED": "0"})
