#!/usr/bin/env bash
# Compile check of the CUDA build of the native layer on a machine without
# a CUDA toolkit or GPU (CI). From scratch: a throwaway venv gets the CUDA
# runtime headers + libcudart_static.a (nvidia-cuda-runtime-cu12) and the
# crt/ headers they include (nvidia-cuda-nvcc-cu12; its wheel has no nvcc
# binary, and none is needed: the CUDA build is C against the runtime API).
# Then: CMake with -DPEGAFLOW_CUDA=ON into build/native-cuda (-Werror),
# the C boundary test (device checks skip without a GPU), and the Go
# binding with -tags cuda: vet, build of every package, native's tests, and
# the binary built and checked as `make check-binary` does (PIE, BIND_NOW).
# First, the library and C test against CUDA 13's headers too (torch's
# cu13 wheels; some runtime APIs changed signature there), into
# build/native-cuda13, which nothing links (PEGAFLOW_CUDA13_CHECK=0 skips).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
runtime_pkg=${PEGAFLOW_CUDA_RUNTIME_WHEEL:-nvidia-cuda-runtime-cu12==12.9.79}
nvcc_pkg=${PEGAFLOW_CUDA_NVCC_WHEEL:-nvidia-cuda-nvcc-cu12==12.9.86}
go=${GO:-go}
cuda13_pkgs=${PEGAFLOW_CUDA13_WHEELS:-nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88}

work=$(mktemp -d "${TMPDIR:-/tmp}/pegaflow-cuda-check.XXXXXX")
trap 'rm -rf "$work"' EXIT

echo "== CUDA wheels into $work/venv: $runtime_pkg $nvcc_pkg"
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet --disable-pip-version-check "$runtime_pkg" "$nvcc_pkg"
site=$("$work/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
root="$site/nvidia/cuda_runtime"

if [[ ${PEGAFLOW_CUDA13_CHECK:-1} == 1 ]]; then
  echo "== CUDA 13 headers: $cuda13_pkgs"
  python3 -m venv "$work/venv13"
  # shellcheck disable=SC2086 # a list of requirement specifiers
  "$work/venv13/bin/pip" install --quiet --disable-pip-version-check $cuda13_pkgs
  site13=$("$work/venv13/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  cmake -S . -B build/native-cuda13 -DCMAKE_BUILD_TYPE=Release -DPEGAFLOW_CUDA=ON \
    -DCUDAToolkit_ROOT="$site13/nvidia/cu13" -UPF_CUDA_INCLUDE_DIR -UPF_CUDART_STATIC -UPF_CUDA_CRT_INCLUDE_DIR >/dev/null
  cmake --build build/native-cuda13 -j
  (cd build/native-cuda13 && ctest --output-on-failure)
  # (Its library stamp is overwritten by the build below, which Go links.)
fi

echo "== cmake -DPEGAFLOW_CUDA=ON -DCUDAToolkit_ROOT=$root"
cmake -S . -B build/native-cuda -DCMAKE_BUILD_TYPE=Release -DPEGAFLOW_CUDA=ON \
  -DCUDAToolkit_ROOT="$root" -UPF_CUDA_INCLUDE_DIR -UPF_CUDART_STATIC -UPF_CUDA_CRT_INCLUDE_DIR >/dev/null
cmake --build build/native-cuda -j
# libcudart_static.a was copied into build/native-cuda, so the Go link
# below does not need the venv (nor does any later cuda-tagged build).

echo "== C boundary test (CUDA build)"
(cd build/native-cuda && ctest --output-on-failure)

echo "== Go binding, -tags cuda"
"$go" vet -tags cuda ./native/...
"$go" build -tags cuda ./...
"$go" test -count=1 -tags cuda ./native/...

# The CUDA binary links libcudart_static.a: hardened as make builds it
# (PIE, full RELRO: every symbol bound at start), it must still start.
echo "== hardened CUDA binary (make check-binary CUDA=1)"
${MAKE:-make} --no-print-directory check-binary CUDA=1 GO="$go" BIN_DIR="$work/bin"
echo "native CUDA compile check: OK"
