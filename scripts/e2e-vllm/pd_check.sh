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
#      from the engine again (a third prompt set); the engine's SSD tier
#      (--ssd-dir, kept across the restart) had written the blocks that
#      proved reuse before the kill -9, and the restarted engine recovered
#      them; no SSD I/O error or corrupt slot;
#   4. D restarted with a registration that fails for real (its staging_dir
#      is /dev/null, so no staging buffer can be made): D's connector disables itself, every case is still
#      answered token-identically (recomputed), vLLM's /metrics says so;
#   5. hybrid models (hybrid_check.sh's hybrid_phase): a tiny Gemma 3
#      (sliding window, three KV cache groups) and a tiny Qwen3.5 (Gated
#      DeltaNet state, four groups): every case token-identical to a plain
#      vLLM on the same model, and D's external hit tokens >= 50% of the
#      prompt tokens; Gemma 3 also with a poisoner P that stores one wrong
#      group (D refuses the hit or its outputs differ).
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
# P_ROLE [kv_both], D_ROLE [kv_both] (phases 1-4; phase 5's D is kv_consumer),
# E2E_HYBRID_MODELS [/tmp/tiny-hybrid] (phase 5's models, built on first
# use), E2E_HYBRID_MIN_HIT_PCT [50].
set -euo pipefail
E2E_TAG=pd
source "$(dirname "$0")/lib.sh"

OUT="${1:-$ROOT/build/e2e-vllm/pd}"
STOP_AFTER="${E2E_STOP_AFTER:-8}"
P_ROLE="${P_ROLE:-kv_both}"
D_ROLE="${D_ROLE:-kv_both}"  # kv_both: D saves its decode blocks (multiturn_check.py)

e2e_begin "$OUT"
pd_begin
evaluate() {  # NAME [--stopped]
  local name="$1"
  shift
  "$PY" "$HERE/pd_eval.py" check "$name" --before "$OUT/$name-before.json" \
    --after "$OUT/$name-after.json" --compare "$OUT/$name-compare.json" --model "$MODEL" \
    --kv-ready-timeout "$KV_READY_TIMEOUT" "$@" | tee "$OUT/$name-check.txt"
}

T0=$SECONDS
rc=0
start_engine
start_router
start_trio ""
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
SSD_SPILLED=$(engine_metric pegaflow_engine_ssd_spill_blocks_total)
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
# The SSD tier: what proved reuse (prefix hits) before the kill -9 was
# written, and the restarted engine recovered it from the directory.
SSD_RECOVERED=$(engine_metric pegaflow_engine_ssd_recovered_blocks)
if ((SSD_SPILLED > 0 && SSD_RECOVERED > 0)); then
  log "ok   SSD tier: $SSD_SPILLED blocks written before the kill -9, $SSD_RECOVERED recovered by the restarted engine"
else
  log "FAIL SSD tier: $SSD_SPILLED blocks written before the kill -9, $SSD_RECOVERED recovered"; rc=1
fi
snap restart-before
compare restart 2
wait "$CMP" || true
snap restart-after
log "phase 3 (engine restarted): $(tail -1 "$OUT/restart-compare.txt") in $((SECONDS - t)) s"
evaluate restart || rc=1
for m in pegaflow_engine_ssd_io_errors_total pegaflow_engine_ssd_corrupt_total; do
  n=$(engine_metric "$m")
  ((n == 0)) || { log "FAIL SSD tier: $m is $n"; rc=1; }
done

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

# ------------------------- 5. hybrid models: one sliding-window, one state
# The tiny Gemma 3 (sliding window + global: three KV cache groups) and
# Qwen3.5 (full attention + Gated DeltaNet state, bf16: four groups) of
# make_tiny_model.py --family, through the same engine and router with a
# fresh reference, P and D each (hybrid_check.sh runs all the families):
# outputs token-identical, D's external hit tokens >= 50% of the prompt
# tokens. Gemma 3 also gets the corruption case: a poisoner P whose last
# layer's KV differs (one group wrong) saves first; D must refuse the hit
# or give different outputs.
stop ref p d
for n in ref p d; do mv "$OUT/$n.log" "$OUT/$n-phases1-4.log"; done
D_ROLE=kv_consumer  # as hybrid_check.sh: D loads, P alone saves
hybrid_phase gemma3 4 --corrupt || rc=1
hybrid_phase qwen3.5 5 || rc=1
pd_leftovers || rc=1
log "total $((SECONDS - T0)) s (start ${T_UP} s), rc=$rc, logs in $OUT"
exit $rc
