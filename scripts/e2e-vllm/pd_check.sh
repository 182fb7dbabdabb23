#!/usr/bin/env bash
# P/D disaggregation end to end with the real vLLM engine on CPU:
#
#   engine  `pegaflow serve` (engine only) on its own socket; P and D use it
#   router  `pegaflow serve --engine=false --prefill P --decode D`: a second
#           process (no engine, no pool), so the
#           engine can be killed while the router keeps routing; the engine
#           reaches it through the /kv_ready callback URL that P's connector
#           gets in kv_transfer_params
#   P       vLLM + PegaKVConnector, kv_role $P_ROLE (kv_both)
#   D       vLLM + PegaKVConnector, kv_role $D_ROLE (kv_both: it saves the
#           blocks it decodes, which the next turn of a chat loads)
#   ref     plain vLLM, the reference
#
# All vLLMs: same PYTHONHASHSEED, --block-size 32 --dtype float32
# --enforce-eager, 128 MiB KV cache, kv_load_failure_policy recompute.
#
# Phases (compare_outputs.py: 34 cases, completions + chat, stream or not,
# 6-1419 prompt tokens; greedy; token ids compared):
#   1. normal: outputs identical; D computed only the prompt tails, the rest
#      came from the engine (vLLM's and the engine's metrics); one transfer
#      ready and one /kv_ready callback per decode leg; then a two-turn
#      chat (multiturn_check.py): turn 2 (turn 1 + its answer + a new
#      message) loads the answer's blocks, saved by D;
#   2. engine killed (SIGKILL) after the first cases of a new prompt set:
#      outputs still identical, every request answered, the later cases
#      recomputed by D, each bounded by the router's KV-ready timeout;
#   3. engine restarted on the same socket: connectors reconnect and D loads
#      from the engine again (a third prompt set);
#   4. D restarted with a registration that fails for real (its staging_dir
#      is /dev/null, so no staging buffer can be made): D's connector disables itself, every case is still
#      answered token-identically (recomputed), vLLM's /metrics says so;
#   5. a hybrid model (the tiny model with a sliding-window second layer):
#      vLLM keeps its hybrid allocator (two KV cache groups), P saves the
#      full-attention group, D claims no hit and recomputes, and every case
#      is token-identical to a plain vLLM on the same hybrid model.
#
# The connector is this tree's, installed (pip --target, the venv is left as
# it is) with its vllm.general_plugins entry point on PYTHONPATH: P and D
# name "PegaFlowConnector" without kv_connector_module_path. Phase 1 also
# checks the connector's stats in vLLM's own /metrics (vllm:pegaflow_*).
#
#   scripts/e2e-vllm/pd_check.sh [OUT_DIR]   (default build/e2e-vllm/pd)
#
# Environment (defaults in brackets): E2E_VLLM_VENV [/tmp/vllm-venv],
# E2E_MODEL_DIR [/tmp/tiny-model], PEGAFLOW_BIN [bin/pegaflow],
# E2E_START_TIMEOUT [300] (s, per vLLM start), E2E_KV_READY_TIMEOUT [5]
# (s, router), E2E_STOP_AFTER [8] (cases of phase 2 before the kill),
# P_ROLE [kv_both], D_ROLE [kv_both].
set -euo pipefail
E2E_TAG=pd
source "$(dirname "$0")/lib.sh"

OUT="${1:-$ROOT/build/e2e-vllm/pd}"
BIN="${PEGAFLOW_BIN:-$ROOT/bin/pegaflow}"
KV_READY_TIMEOUT="${E2E_KV_READY_TIMEOUT:-5}"
STOP_AFTER="${E2E_STOP_AFTER:-8}"
P_ROLE="${P_ROLE:-kv_both}"
D_ROLE="${D_ROLE:-kv_both}"  # kv_both: D saves its decode blocks (multiturn_check.py)
PASS_TIMEOUT=900  # one compare pass (34 cases); a normal one takes ~1 min

[[ -x "$BIN" ]] || { echo "no pegaflow binary at $BIN (make build)" >&2; exit 2; }
e2e_begin "$OUT"
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
# on the path: ahead of any editable install the venv has.
"$VENV/bin/pip" install -q --disable-pip-version-check --no-input --no-deps --no-build-isolation \
  --target "$RUN/site" "$ROOT/connector" >"$OUT/pip.log" 2>&1 || { cat "$OUT/pip.log" >&2; exit 1; }
export PYTHONPATH="$RUN/site${PYTHONPATH:+:$PYTHONPATH}"

start_engine() {  # the engine the vLLMs use; nothing else listens there
  # It POSTs transfer readiness to the router's /kv_ready (P's ready_url),
  # which runs in another process: allow exactly that address.
  setsid "$BIN" serve --socket "$SOCK" --http-addr "127.0.0.1:$EP" --pool-size 256MiB \
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
kvc() {  # ROLE INSTANCE [STAGING_DIR]: the plugin's name, no module path
  printf '{"kv_connector":"PegaFlowConnector","kv_role":"%s","kv_load_failure_policy":"recompute","kv_connector_extra_config":{"socket_path":"%s","instance_id":"%s","staging_dir":"%s"}}' \
    "$1" "$SOCK" "$2" "${3:-$SHM}"
}
start_trio() {  # INSTANCE_SUFFIX: the reference vLLM, P and D of $MODEL, each until healthy
  start_vllm ref "$REF"
  start_vllm p "$PP" --kv-transfer-config "$(kvc "$P_ROLE" "e2e-prefill$1")"
  start_vllm d "$DP" --kv-transfer-config "$(kvc "$D_ROLE" "e2e-decode$1")"
  local n port
  for n in ref p d; do
    case $n in ref) port=$REF ;; p) port=$PP ;; d) port=$DP ;; esac
    wait_healthy "$n" "http://127.0.0.1:$port"
  done
}
snap() { "$PY" "$HERE/pd_eval.py" snap "$OUT/$1.json" engine="$ENGINE_URL" router="$ROUTER_URL" \
  p="http://127.0.0.1:$PP" d="http://127.0.0.1:$DP"; }
compare() {  # NAME VARIANT: a compare pass against the router, in the background
  timeout "$PASS_TIMEOUT" "$PY" "$HERE/compare_outputs.py" --ref "http://127.0.0.1:$REF" \
    --cand "$ROUTER_URL" --model "$MODEL" --variant "$2" --json "$OUT/$1-compare.json" \
    >"$OUT/$1-compare.txt" 2>&1 &
  CMP=$!
}
evaluate() {  # NAME [--stopped]
  local name="$1"
  shift
  "$PY" "$HERE/pd_eval.py" check "$name" --before "$OUT/$name-before.json" \
    --after "$OUT/$name-after.json" --compare "$OUT/$name-compare.json" --model "$MODEL" \
    --kv-ready-timeout "$KV_READY_TIMEOUT" "$@" | tee "$OUT/$name-check.txt"
}
connector_messages() {  # what our connector logged (warnings and errors reach vLLM's stderr)
  for n in p d; do
    { grep -ho 'pegaflow: .*' "$OUT/$n.log" || true; } | sed -E 's/pid=[0-9]+/pid=N/; s/[0-9a-f]{16,}/X/g' |
      sort | uniq -c | sed "s/^ */$n: /" | cut -c1-200
  done
}

T0=$SECONDS
rc=0
log "bin $BIN ($("$BIN" version 2>/dev/null || echo '?')), vllm $("$PY" -c 'import vllm; print(vllm.__version__)' 2>/dev/null)"
start_engine
start_router
start_trio ""
wait_router() {  # until the router sees a healthy P and D (its /health is 200 then)
  local deadline=$((SECONDS + 30))
  until curl -sf "$ROUTER_URL/health" >/dev/null; do
    ((SECONDS < deadline)) || { echo "router not healthy after 30 s" >&2; tail -20 "$OUT/router.log" >&2; exit 1; }
    sleep 0.5
  done
}
wait_router
T_UP=$((SECONDS - T0))
log "engine, router, P, D and reference up in ${T_UP} s"
# blocks=256: the workers registered a 2 x 128-block staging buffer, not
# vLLM's KV memory (private to the worker process).
grep -h 'instance registered' "$OUT/engine.log" | sed -E 's/^.*msg="instance registered" component=engine /[pd]   engine: registered /' || true
grep -hi 'connector disabled\|cannot register' "$OUT/p.log" "$OUT/d.log" | sed 's/^/[pd]   FAIL /' && rc=1
"$PY" -c 'import pegaflow_connector, sys; sys.exit(0 if pegaflow_connector.__file__.startswith(sys.argv[1]) else 1)' "$RUN/site" ||
  { log "FAIL vLLM would not import this tree's connector"; rc=1; }

# ------------------------------------------------------------ 1. normal
t=$SECONDS
snap normal-before
compare normal 0
wait "$CMP" || true
snap normal-after
log "phase 1 (normal): $(tail -1 "$OUT/normal-compare.txt") in $((SECONDS - t)) s"
evaluate normal || rc=1
"$PY" "$HERE/multiturn_check.py" --router "$ROUTER_URL" --ref "http://127.0.0.1:$REF" --p "http://127.0.0.1:$PP" --model "$MODEL" || rc=1

# ------------------------------------------------ 2. engine killed mid-run
t=$SECONDS
snap stop-before
compare stop 1
deadline=$((SECONDS + PASS_TIMEOUT))
until (($(grep -c '^ok\|^FAIL' "$OUT/stop-compare.txt" || true) >= STOP_AFTER)); do
  kill -0 "$CMP" 2>/dev/null || break
  ((SECONDS < deadline)) || break
  sleep 0.2
done
kill -KILL -- "-${PID[engine]}" 2>/dev/null || true
wait "${PID[engine]}" 2>/dev/null || true  # reaped here: no job notice in the log
unset "PID[engine]"
log "engine killed (SIGKILL) after $(grep -c '^ok\|^FAIL' "$OUT/stop-compare.txt" || true) cases"
wait "$CMP" || true
snap stop-after
log "phase 2 (engine stopped): $(tail -1 "$OUT/stop-compare.txt") in $((SECONDS - t)) s"
evaluate stop --stopped || rc=1
# Why each not-ready wait ended (router log): "timed out after ..." or the
# failure P's connector reported to /kv_ready.
grep -i 'kv not ready' "$OUT/router.log" | sed -E 's/.*reason="([^"]*)".*/\1/' | sort | uniq -c |
  sed 's/^ */[pd]   router: not ready x/' || true
for n in p d; do
  port=$PP; [[ $n == d ]] && port=$DP
  curl -sf "http://127.0.0.1:$port/health" >/dev/null || { log "FAIL $n is not healthy after the engine stop"; rc=1; }
done

# ------------------------------------------------ 3. engine restarted
t=$SECONDS
start_engine
# Each connector process (P and D: scheduler + worker) reconnects with
# backoff (<= 5 s) and re-registers; wait for both workers.
deadline=$((SECONDS + 60))
until "$PY" - "$ENGINE_URL" <<'EOF'
import sys, urllib.request
try:
    t = urllib.request.urlopen(sys.argv[1] + "/metrics", timeout=5).read().decode()
except OSError:
    sys.exit(1)  # not up yet
g = {l.split()[0]: float(l.split()[-1]) for l in t.splitlines() if l and not l.startswith("#")}
# P and D: a scheduler and a worker session each, and the two workers registered.
sys.exit(0 if g.get("pegaflow_engine_sessions", 0) >= 4 and g.get("pegaflow_engine_instances", 0) >= 2 else 1)
EOF
do
  ((SECONDS < deadline)) || { log "FAIL connectors did not reconnect within 60 s"; rc=1; break; }
  sleep 0.5
done
sleep 1  # a scheduler re-opens its namespace right after its session is up
log "engine restarted; connectors re-registered after $((SECONDS - t)) s"
snap restart-before
compare restart 2
wait "$CMP" || true
snap restart-after
log "phase 3 (engine restarted): $(tail -1 "$OUT/restart-compare.txt") in $((SECONDS - t)) s"
evaluate restart || rc=1

# ------------------------------------ 4. D's connector cannot register
t=$SECONDS
connector_messages | sed 's/^/[pd] connector said (phases 1-3): /'
stop d
mv "$OUT/d.log" "$OUT/d-phases1-3.log"
start_vllm d "$DP" --kv-transfer-config "$(kvc kv_consumer e2e-decode /dev/null)"
wait_healthy d "http://127.0.0.1:$DP"
wait_router  # the router's health poll must have seen the new D, or the first case gets 503
compare broken 3
wait "$CMP" || true
log "phase 4 (D's registration fails): $(tail -1 "$OUT/broken-compare.txt") in $((SECONDS - t)) s"
grep -q ' 0 failed$' "$OUT/broken-compare.txt" || { log "FAIL phase 4: not every case answered identically"; rc=1; }
grep -h 'CONNECTOR DISABLED' "$OUT/d.log" | head -1 | sed -E 's/.*(pegaflow: )/\1/' | cut -c1-240 | sed 's/^/[pd]   D: /'
grep -q 'CONNECTOR DISABLED on worker' "$OUT/d.log" || { log "FAIL phase 4: D did not report its connector disabled"; rc=1; }
"$PY" "$HERE/pd_eval.py" disabled "http://127.0.0.1:$DP" || rc=1
connector_messages | sed 's/^/[pd] connector said (phase 4): /'

# ------------- 5. a hybrid model: full + sliding-window attention layers
# The tiny model with its second layer made sliding-window (64 tokens):
# vLLM runs it with two KV cache groups (the hybrid allocator, which our
# SupportsHMA keeps on). P saves the full-attention group; D may claim no
# hit (vLLM would need the window's KV too), so it recomputes: outputs
# must still equal the reference's on the same hybrid model.
t=$SECONDS
stop ref p d
for n in ref p d; do mv "$OUT/$n.log" "$OUT/$n-phases1-4.log"; done
HYBRID="$RUN/tiny-hybrid"
cp -r "$MODEL" "$HYBRID"
"$PY" - "$HYBRID/config.json" <<'EOF'
import json
import sys

c = json.load(open(sys.argv[1], encoding="utf-8"))
c["layer_types"] = ["full_attention"] + ["sliding_attention"] * (c["num_hidden_layers"] - 1)
c["sliding_window"] = 64
json.dump(c, open(sys.argv[1], "w", encoding="utf-8"), indent=2)
EOF
MODEL="$HYBRID"
start_trio -hybrid
wait_router
compare hybrid 4
wait "$CMP" || true
log "phase 5 (hybrid: full + sliding-window layers): $(tail -1 "$OUT/hybrid-compare.txt") in $((SECONDS - t)) s"
grep -q ' 0 failed$' "$OUT/hybrid-compare.txt" || { log "FAIL phase 5: not every case answered identically"; rc=1; }
grep -q 'kv cache group sizes (32, 32)' "$OUT/p.log" ||
  { log "FAIL phase 5: P did not run vLLM's hybrid allocator (two KV cache groups)"; rc=1; }
grep -q 'hybrid KV cache groups' "$OUT/p.log" || { log "FAIL phase 5: P's connector did not see the groups"; rc=1; }
"$PY" "$HERE/pd_eval.py" hybrid "http://127.0.0.1:$PP" "http://127.0.0.1:$DP" || rc=1
connector_messages | sed 's/^/[pd] connector said (phase 5): /'
stop "${!PID[@]}"
left=""
for g in "${ALL[@]}"; do kill -0 -- "-$g" 2>/dev/null && left+=" $g"; done
[[ -z "$left" ]] || { log "FAIL process groups left:$left"; rc=1; }
log "total $((SECONDS - T0)) s (start ${T_UP} s), rc=$rc, logs in $OUT"
exit $rc
