#!/usr/bin/env bash
# Launches a one-host P/D deployment: the PegaFlow engine + router
# (`pegaflow serve`) and two vLLM servers, a prefill (P) and a decode (D),
# both loading PegaFlowConnector (the plugin name). Clients talk to the router's OpenAI API.
#
#   scripts/vllm-pd-launch.sh MODEL [--dry-run]
#
# Everything else comes from the environment (defaults in brackets):
#   P_GPUS [0]  D_GPUS [1]       CUDA_VISIBLE_DEVICES of P and D
#   P_TP [1]    D_TP [1]         tensor parallel size of P and D
#   P_PORT [8100] D_PORT [8200]  vLLM ports (127.0.0.1)
#   P_ROLE [kv_both] D_ROLE [kv_consumer]  kv_role: P also loads prefixes
#                                other prompts left in the engine; a kv_both D
#                                would also save generated blocks (multi-turn)
#   ROUTER_ADDR [0.0.0.0:8000]   the router's OpenAI endpoint (and /metrics)
#   POOL_SIZE [32GiB]            engine pool (pinned host memory)
#   SOCKET [$XDG_RUNTIME_DIR/pegaflow/engine.sock or /tmp/pegaflow-$UID/engine.sock]
#   PEGAFLOW_BIN [bin/pegaflow]  build it with `make CUDA=1 build` on GPU hosts
#   VLLM [vllm]                  the vllm CLI
#   PYTHONHASHSEED [0]           must be equal on P and D (block hashes)
#   LOG_DIR [./pd-logs]          one log file per process
#   VLLM_ARGS                    extra arguments for both vLLM servers
#
# P and D must run on the same host as the engine: it stores the KV in host
# memory and copies it to and from the GPUs over CUDA IPC. Ctrl-C stops all.
set -euo pipefail

usage() { sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; }

MODEL="${1:-}"
DRY_RUN=0
[[ "${2:-}" == "--dry-run" || "${1:-}" == "--dry-run" ]] && DRY_RUN=1
if [[ -z "$MODEL" || "$MODEL" == "-h" || "$MODEL" == "--help" || "$MODEL" == "--dry-run" ]]; then
  usage >&2
  exit 2
fi

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
P_GPUS="${P_GPUS:-0}"
D_GPUS="${D_GPUS:-1}"
P_TP="${P_TP:-1}"
D_TP="${D_TP:-1}"
P_PORT="${P_PORT:-8100}"
D_PORT="${D_PORT:-8200}"
P_ROLE="${P_ROLE:-kv_both}"
D_ROLE="${D_ROLE:-kv_consumer}"
ROUTER_ADDR="${ROUTER_ADDR:-0.0.0.0:8000}"
POOL_SIZE="${POOL_SIZE:-32GiB}"
if [[ -n "${XDG_RUNTIME_DIR:-}" ]]; then
  SOCKET="${SOCKET:-$XDG_RUNTIME_DIR/pegaflow/engine.sock}"
else
  SOCKET="${SOCKET:-/tmp/pegaflow-$(id -u)/engine.sock}"
fi
PEGAFLOW_BIN="${PEGAFLOW_BIN:-$ROOT/bin/pegaflow}"
VLLM="${VLLM:-vllm}"
export PYTHONHASHSEED="${PYTHONHASHSEED:-0}"
LOG_DIR="${LOG_DIR:-./pd-logs}"
VLLM_ARGS="${VLLM_ARGS:-}"

kv_config() { # role instance
  # recompute: a block the engine cannot deliver is recomputed, not an error.
  printf '{"kv_connector":"PegaFlowConnector","kv_role":"%s","kv_load_failure_policy":"recompute","kv_connector_extra_config":{"socket_path":"%s","instance_id":"%s"}}' \
    "$1" "$SOCKET" "$2"
}

ENGINE_CMD=("$PEGAFLOW_BIN" serve --socket "$SOCKET" --pool-size "$POOL_SIZE"
  --http-addr "$ROUTER_ADDR" --prefill "http://127.0.0.1:$P_PORT" --decode "http://127.0.0.1:$D_PORT")
# shellcheck disable=SC2206 # VLLM_ARGS is split on purpose
P_CMD=("$VLLM" serve "$MODEL" --host 127.0.0.1 --port "$P_PORT" --tensor-parallel-size "$P_TP"
  --kv-transfer-config "$(kv_config "$P_ROLE" "pd-prefill-$P_PORT")" $VLLM_ARGS)
# shellcheck disable=SC2206
D_CMD=("$VLLM" serve "$MODEL" --host 127.0.0.1 --port "$D_PORT" --tensor-parallel-size "$D_TP"
  --kv-transfer-config "$(kv_config "$D_ROLE" "pd-decode-$D_PORT")" $VLLM_ARGS)

if [[ "$DRY_RUN" == 1 ]]; then
  printf 'PYTHONHASHSEED=%s\n' "$PYTHONHASHSEED"
  printf '%q ' "${ENGINE_CMD[@]}"; echo
  printf 'CUDA_VISIBLE_DEVICES=%s ' "$P_GPUS"; printf '%q ' "${P_CMD[@]}"; echo
  printf 'CUDA_VISIBLE_DEVICES=%s ' "$D_GPUS"; printf '%q ' "${D_CMD[@]}"; echo
  exit 0
fi

[[ -x "$PEGAFLOW_BIN" ]] || { echo "no engine binary at $PEGAFLOW_BIN (make CUDA=1 build)" >&2; exit 1; }
command -v "$VLLM" >/dev/null || { echo "vllm CLI '$VLLM' not found" >&2; exit 1; }
python3 -c 'import pegaflow_connector' 2>/dev/null ||
  { echo "pegaflow_connector is not importable: pip install $ROOT/connector" >&2; exit 1; }
mkdir -p "$LOG_DIR" "$(dirname "$SOCKET")"

PIDS=()
cleanup() {
  trap - EXIT INT TERM
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT INT TERM

wait_http() { # url seconds name
  local deadline=$((SECONDS + $2))
  until curl -fsS -o /dev/null "$1"; do
    if ((SECONDS > deadline)); then echo "$3 not healthy after $2s (see $LOG_DIR)" >&2; exit 1; fi
    sleep 2
  done
}

"${ENGINE_CMD[@]}" >"$LOG_DIR/pegaflow.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do [[ -S "$SOCKET" ]] && break; sleep 0.1; done
[[ -S "$SOCKET" ]] || { echo "engine did not start (see $LOG_DIR/pegaflow.log)" >&2; exit 1; }

CUDA_VISIBLE_DEVICES="$P_GPUS" "${P_CMD[@]}" >"$LOG_DIR/prefill.log" 2>&1 &
PIDS+=($!)
CUDA_VISIBLE_DEVICES="$D_GPUS" "${D_CMD[@]}" >"$LOG_DIR/decode.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$P_PORT/health" 900 prefill
wait_http "http://127.0.0.1:$D_PORT/health" 900 decode

echo "P/D ready: OpenAI API at http://${ROUTER_ADDR/0.0.0.0/127.0.0.1}/v1 (logs in $LOG_DIR). Ctrl-C stops."
wait -n "${PIDS[@]}"
echo "a process exited; stopping the rest (see $LOG_DIR)" >&2
exit 1
