"""The connector refuses an engine socket whose directory another user
could change (they could swap the socket and receive our KV memory)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import pytest
from harness import Engine

from pegaflow_connector.client import EngineClient
from pegaflow_connector.config import UnsafeSocketDir, check_socket_dir

NOBODY = 65534


def _world_writable(d: str) -> str:
    os.chmod(d, 0o777)
    return d


def _group_writable(d: str) -> str:
    os.chmod(d, 0o770)
    return d


def _symlink(d: str) -> str:
    link = d.rstrip("/") + "-link"
    os.symlink(d, link)
    return link


def _nobodys(d: str) -> str:
    os.chown(d, NOBODY, NOBODY)
    return d


@pytest.mark.parametrize("make,why,root", [
    (_world_writable, "world-writable", False),
    (_group_writable, "group- or world-writable", False),
    (_symlink, "is a symlink", False),
    (_nobodys, "owned by uid 65534", True),
])
def test_check_socket_dir_refuses(workdir: str, make: Callable[[str], str], why: str, root: bool) -> None:
    if root and os.geteuid() != 0:
        pytest.skip("needs root: makes a directory owned by another user")
    d = make(workdir)
    with pytest.raises(UnsafeSocketDir, match=why) as e:
        check_socket_dir(os.path.join(d, "engine.sock"))
    assert d in str(e.value)


def test_check_socket_dir_accepts_a_private_dir(workdir: str) -> None:
    os.chmod(workdir, 0o700)
    check_socket_dir(os.path.join(workdir, "engine.sock"))
    os.chmod(workdir, 0o755)
    check_socket_dir(os.path.join(workdir, "engine.sock"))


@pytest.mark.parametrize("make", [_symlink, _world_writable], ids=["symlink", "world-writable"])
def test_client_does_not_connect_through_unsafe_dir(engine: Engine, make: Callable[[str], str],
                                                    caplog: pytest.LogCaptureFixture) -> None:
    # The engine checked its directory at start; it changes afterwards.
    d = make(engine.workdir)
    sock = os.path.join(d, "engine.sock")
    assert os.path.exists(sock)
    client = EngineClient(sock, "test-unsafe-dir", connect_timeout_s=0.5)
    caplog.set_level(logging.WARNING, logger="pegaflow_connector")
    client.start()
    try:
        assert not client.wait_connected(1.5), "connected through an unsafe socket directory"
    finally:
        client.close()
    assert any(d in r.getMessage() and "not connecting" in r.getMessage() for r in caplog.records), caplog.text


def test_socket_owner_trusts_the_engines_user(workdir: str) -> None:
    """A dedicated engine user (deploy/systemd) owns /run/pegaflow: trusted only when named."""
    if os.geteuid() != 0:
        pytest.skip("needs root: makes a directory owned by another user")
    d = _nobodys(workdir)
    os.chmod(d, 0o755)
    sock = os.path.join(d, "engine.sock")
    with pytest.raises(UnsafeSocketDir, match="owned by uid 65534"):
        check_socket_dir(sock)
    check_socket_dir(sock, str(NOBODY))
    with pytest.raises(UnsafeSocketDir, match="not a known user"):
        check_socket_dir(sock, "no-such-user-pegaflow")
