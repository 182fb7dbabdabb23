#!/usr/bin/env python3
"""Finds a CUDA runtime to build the native layer against, from Python
wheels: prints `include=...`, `cudart_static=...` and `crt=...` lines (the
three CMake cache values PF_CUDA_INCLUDE_DIR, PF_CUDART_STATIC and
PF_CUDA_CRT_INCLUDE_DIR), or exits 1 with the reason on stderr.

torch's CUDA wheels depend on the CUDA runtime wheel, which ships the
runtime headers and libcudart_static.a: `nvidia/cuda_runtime/` (CUDA 12
wheels, nvidia-cuda-runtime-cu12) or `nvidia/cu13/` (CUDA 13). The crt/
headers those include come with the nvcc wheel (nvidia-cuda-nvcc-cu12) or
with triton, which torch also installs. The toolkit whose major version is
torch's is preferred, so the engine's runtime matches what the driver
already runs for torch.
"""

from __future__ import annotations

import os
import site
import sys
import sysconfig


def roots() -> list[str]:
    seen: list[str] = []
    for p in [sysconfig.get_paths().get("purelib", ""), sysconfig.get_paths().get("platlib", ""),
              *getattr(site, "getsitepackages", lambda: [])(), *sys.path]:
        if p and os.path.isdir(p) and p not in seen:
            seen.append(p)
    return seen


def torch_cuda_major() -> str:
    try:
        import torch

        return (torch.version.cuda or "").split(".")[0]
    except Exception:  # noqa: BLE001 - no torch: no preference
        return ""


def main() -> int:
    candidates = []  # (major, include, static lib)
    crt_dirs = []
    for r in roots():
        for sub, major in (("nvidia/cuda_runtime", "12"), ("nvidia/cu13", "13"), ("nvidia/cu12", "12")):
            inc = os.path.join(r, sub, "include")
            lib = os.path.join(r, sub, "lib", "libcudart_static.a")
            if os.path.isfile(os.path.join(inc, "cuda_runtime_api.h")):
                candidates.append((major, inc, lib if os.path.isfile(lib) else ""))
        for sub in ("nvidia/cuda_nvcc/include", "nvidia/cu13/include", "nvidia/cu12/include",
                    "triton/backends/nvidia/include"):
            d = os.path.join(r, sub)
            if os.path.isfile(os.path.join(d, "crt", "host_defines.h")):
                crt_dirs.append(d)
    if not candidates:
        print("no CUDA runtime wheel (nvidia/cuda_runtime or nvidia/cu13) on this Python's path",
              file=sys.stderr)
        return 1
    usable = [c for c in candidates if c[2]]
    if not usable:
        print(f"CUDA runtime headers at {candidates[0][1]} but no libcudart_static.a next to them",
              file=sys.stderr)
        return 1
    want = torch_cuda_major()
    usable.sort(key=lambda c: c[0] != want)
    major, inc, lib = usable[0]
    # crt/ of the same toolkit first (inside the include dir or its nvcc
    # wheel), then anything else (triton's copy).
    crt_dirs.sort(key=lambda d: (not d.startswith(os.path.dirname(os.path.dirname(inc))), "triton" in d))
    crt = inc if os.path.isfile(os.path.join(inc, "crt", "host_defines.h")) else (crt_dirs[0] if crt_dirs else "")
    if not crt:
        print(f"CUDA {major} runtime at {inc}, but no crt/host_defines.h (install nvidia-cuda-nvcc-cu{major} "
              "or triton)", file=sys.stderr)
        return 1
    print(f"major={major}")
    print(f"include={inc}")
    print(f"cudart_static={lib}")
    print(f"crt={crt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
