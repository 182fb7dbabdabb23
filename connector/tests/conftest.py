"""Fixtures: the real engine binary on a private socket, and the harness."""

from __future__ import annotations

import glob
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator

import pytest

# Test this checkout's sources even if another copy is pip-installed.
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))

from harness import SHM_PREFIX, Engine, ReadyServer  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def engine_binary() -> str:
    path = os.environ.get("PEGAFLOW_BIN") or os.path.join(REPO, "bin", "pegaflow")
    if not os.access(path, os.X_OK):
        pytest.fail(f"engine binary {path} not found: run `make build` (or set PEGAFLOW_BIN)")
    return path


@pytest.fixture
def workdir() -> Iterator[str]:
    # Short path: UNIX socket paths are limited to ~100 bytes.
    d = tempfile.mkdtemp(prefix="pfc-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def engine(workdir: str) -> Iterator[Engine]:
    e = Engine(engine_binary(), workdir)
    e.start()
    yield e
    e.stop()


@pytest.fixture
def ready_server() -> Iterator[ReadyServer]:
    s = ReadyServer()
    yield s
    s.close()


@pytest.fixture(autouse=True, scope="session")
def _private_tmp() -> Iterator[None]:
    """Namespace rendezvous files (and anything else under TMPDIR) of this
    session go to a private directory, removed at the end along with KV
    cache files that crashed workers left in /dev/shm."""
    d = tempfile.mkdtemp(prefix="pfc-tmp-", dir="/tmp")
    old = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = d
    tempfile.tempdir = None
    yield
    if old is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = old
    tempfile.tempdir = None
    shutil.rmtree(d, ignore_errors=True)
    for path in glob.glob(SHM_PREFIX + "-*"):
        os.unlink(path)
