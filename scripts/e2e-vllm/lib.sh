# The preamble the scripts of scripts/e2e-vllm share (setup.sh, smoke.sh,
# fileconn_check.sh, pd_check.sh). Sourced, never run:
#
#   set -euo pipefail
#   E2E_TAG=smoke
#   source "$(dirname "$0")/lib.sh"
#   e2e_begin "$OUT"          # the scripts that run vLLM, once OUT is known
#
# Sourcing sets the paths every script uses and defines the helpers; it
# starts nothing and touches no file. e2e_begin is where a run script's
# side effects start.
#
# Environment (defaults in brackets): E2E_VLLM_VENV [/tmp/vllm-venv],
# E2E_MODEL_DIR [/tmp/tiny-model], E2E_START_TIMEOUT [300] seconds for a
# vLLM server to become healthy.

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
VENV="${E2E_VLLM_VENV:-/tmp/vllm-venv}"
MODEL="${E2E_MODEL_DIR:-/tmp/tiny-model}"
START_TIMEOUT="${E2E_START_TIMEOUT:-300}"
PY="$VENV/bin/python"

# Every vLLM of a run gets these flags, so that outputs differ only by the
# connector. Block size 32: the CPU attention backend accepts only
# multiples of 32.
COMMON=(--host 127.0.0.1 --dtype float32 --max-model-len 2048 --block-size 32
        --enforce-eager --kv-cache-memory-bytes 134217728 --seed 0)

declare -A PID       # NAME -> process group of what the run started and still runs
ALL=()               # every process group started, to prove none is left
REMOVE_AT_EXIT=()    # paths the exit trap deletes

log() { printf '[%s] %s\n' "$E2E_TAG" "$*"; }

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

stop() {  # NAME...: SIGTERM the process groups, SIGKILL after 15 s
  for n in "$@"; do [[ -n "${PID[$n]:-}" ]] && kill -TERM -- "-${PID[$n]}" 2>/dev/null || true; done
  for n in "$@"; do
    [[ -n "${PID[$n]:-}" ]] || continue
    for _ in $(seq 1 60); do kill -0 -- "-${PID[$n]}" 2>/dev/null || break; sleep 0.25; done
    kill -KILL -- "-${PID[$n]}" 2>/dev/null || true
    unset "PID[$n]"
  done
}

e2e_cleanup() {  # the exit trap: every process group still running, then REMOVE_AT_EXIT
  stop "${!PID[@]}"
  ((${#REMOVE_AT_EXIT[@]} == 0)) || rm -rf -- "${REMOVE_AT_EXIT[@]}"
}

e2e_begin() {  # OUT: needs setup.sh's venv and model; empties OUT, arms the exit trap
  [[ -x "$PY" && -f "$MODEL/config.json" ]] || { echo "run scripts/e2e-vllm/setup.sh first" >&2; exit 2; }
  rm -rf "$1" && mkdir -p "$1"
  trap e2e_cleanup EXIT
  export PYTHONHASHSEED=0 HF_HUB_OFFLINE=1
}

start_vllm() {  # NAME PORT [vllm flags...]: in its own process group, log $OUT/NAME.log
  local name="$1" port="$2"
  shift 2
  setsid "$HERE/vllm-serve" "$MODEL" --port "$port" "${COMMON[@]}" "$@" >"$OUT/$name.log" 2>&1 &
  PID[$name]=$!
  ALL+=("$!")
}

wait_healthy() {  # NAME URL: until URL/health answers, START_TIMEOUT at most
  local deadline=$((SECONDS + START_TIMEOUT))
  until curl -sf "$2/health" >/dev/null; do
    kill -0 "${PID[$1]}" 2>/dev/null || { echo "$1 exited during start; tail of $OUT/$1.log:" >&2; tail -30 "$OUT/$1.log" >&2; return 1; }
    ((SECONDS < deadline)) || { echo "$1 not healthy after ${START_TIMEOUT}s" >&2; return 1; }
    sleep 1
  done
}
