"""The CPU-runnable parts of scripts/gpu-check, so it does not rot between
GPU runs: planning, the report, metric parsing, the build discovery and
the dry run of both the driver and the shell script."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from types import ModuleType

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SCRIPT = os.path.join(REPO, "scripts", "gpu-check")
DRIVER = os.path.join(REPO, "scripts", "gpu", "gpu_check.py")


def load_driver() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", DRIVER)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_plans_cover_the_issue_sizes() -> None:
    g = load_driver()
    plans = g.make_plans(1 << 30, 4, g.RUN_SIZES)
    assert [p.run for p in plans] == [16 << 10, 64 << 10, 256 << 10, 1 << 20, 2 << 20]
    for p in plans:
        assert p.block_size * g.TOKEN_BYTES == p.run
        assert p.rep_bytes == p.blocks * p.layers * 2 * p.run
        assert p.rep_bytes <= 1 << 30 and p.pad >= 1
    with pytest.raises(ValueError):
        g.make_plans(1 << 30, 4, [1000])


def test_report_marks_the_target() -> None:
    g = load_driver()
    plans = g.make_plans(64 << 20, 2, [64 << 10, 256 << 10, 1 << 20])
    rows = [g.Row(plans[0], 10.0, 9.0, 10.0, 9.0, True),   # below 0.9 but under 256 KiB: no target
            g.Row(plans[1], 46.0, 40.0, 47.0, 41.0, True),  # 0.92, 0.94: ok
            g.Row(plans[2], 44.0, 40.0, 49.0, 41.0, False)]  # save 0.88: BELOW; bytes MISMATCH
    text, below = g.table(rows, 50.0, 50.0)
    lines = text.splitlines()
    assert below
    assert lines[2].split("|")[-1].split() == ["-", "ok"]
    assert lines[3].split("|")[-1].split() == ["ok", "ok"]
    assert lines[4].split("|")[-1].split() == ["BELOW", "MISMATCH"]
    assert "cudaMemcpyAsync" in lines[-1]
    _, below = g.table(rows[:2], 50.0, 50.0)
    assert not below


def test_engine_rate_and_helpers() -> None:
    g = load_driver()
    before = {"pegaflow_engine_save_duration_seconds_sum": 1.0, "pegaflow_engine_save_bytes_sum": 1e9}
    after = {"pegaflow_engine_save_duration_seconds_sum": 1.5, "pegaflow_engine_save_bytes_sum": 26e9}
    assert g.engine_rate(before, after, "save") == pytest.approx(50.0)
    assert g.engine_rate(before, before, "save") == 0.0
    assert g.parse_cpulist("0-3,8,10-11\n") == {0, 1, 2, 3, 8, 10, 11}
    assert g.human(256 << 10) == "256 KiB" and g.human(3 << 29) == "1.5 GiB"
    assert len(set(g.block_hashes("t", 100))) == 100


def test_driver_dry_run() -> None:
    out = subprocess.run([sys.executable, DRIVER, "--dry-run", "--sizes", "16,2048", "--bytes-per-size", "64"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "example report" in out.stdout and "connector modules import: ok" in out.stdout


def test_script_help_and_dry_run() -> None:
    out = subprocess.run(["bash", "-n", SCRIPT], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    env = dict(os.environ, PYTHON=sys.executable)
    out = subprocess.run([SCRIPT, "--help"], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0 and "--skip-build" in out.stdout and "--bytes-per-size" in out.stdout
    out = subprocess.run([SCRIPT, "--dry-run", "--skip-build"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "gpu-check dry run" in out.stdout


def test_find_cuda_reports_or_explains() -> None:
    out = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "gpu", "find_cuda.py")],
                         capture_output=True, text=True, timeout=120)
    if out.returncode == 0:
        keys = dict(line.split("=", 1) for line in out.stdout.splitlines())
        assert set(keys) == {"major", "include", "cudart_static", "crt"}
        assert os.path.isfile(os.path.join(keys["include"], "cuda_runtime_api.h"))
    else:
        assert out.returncode == 1 and out.stderr.strip()
