#!/usr/bin/env bash
# Smoke run of real vLLM on CPU (after setup.sh): starts two vLLM servers on
# the tiny model, a plain reference and one that loads ProbeConnector from
# this directory by module path, then
#   1. compare_outputs.py: every prompt (completions + chat, streaming or
#      not, 5 to ~1400 tokens) gives token-identical greedy output on both;
#   2. verify_kv_layout.py: the KV bytes the probe dumped right after each
#      prefill equal Hugging Face's K/V under the documented layout;
#   3. verify_block_hashes.py: request.block_hashes as vLLM logged them equal
#      the hashes recomputed from the prompt ids (sha256 + pickle, seed
#      PYTHONHASHSEED=0);
#   4. a summary of the connector calls vLLM made (probe log).
#
#   scripts/e2e-vllm/smoke.sh [OUT_DIR]     (default: build/e2e-vllm/smoke)
#
# Environment: E2E_VLLM_VENV [/tmp/vllm-venv], E2E_MODEL_DIR [/tmp/tiny-model],
# E2E_START_TIMEOUT [300] seconds for a server to become healthy.
set -euo pipefail
E2E_TAG=smoke
source "$(dirname "$0")/lib.sh"

OUT="${1:-$ROOT/build/e2e-vllm/smoke}"
e2e_begin "$OUT"
REF_PORT=$(free_port)
PROBE_PORT=$(free_port)

t0=$(date +%s.%N)
# Both get lib.sh's COMMON flags: only the connector differs.
start_vllm ref "$REF_PORT"
PROBE_LOG="$OUT/probe.jsonl" PROBE_DUMP_DIR="$OUT/kv-dump" PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}" \
  start_vllm probe "$PROBE_PORT" \
  --kv-transfer-config '{"kv_connector":"ProbeConnector","kv_role":"kv_both","kv_connector_module_path":"probe_connector"}'
wait_healthy ref "http://127.0.0.1:$REF_PORT"
wait_healthy probe "http://127.0.0.1:$PROBE_PORT"
log "both servers healthy after $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s"

rc=0
t1=$(date +%s.%N)
"$PY" "$HERE/compare_outputs.py" --ref "http://127.0.0.1:$REF_PORT" --cand "http://127.0.0.1:$PROBE_PORT" \
  --model "$MODEL" --json "$OUT/compare.json" || rc=1
log "compare: $(awk -v a="$t1" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s"

stop "${!PID[@]}"
"$PY" "$HERE/verify_kv_layout.py" "$MODEL" "$OUT/kv-dump" 2>/dev/null | tail -1
[[ ${PIPESTATUS[0]} -eq 0 ]] || rc=1
"$PY" "$HERE/verify_block_hashes.py" "$OUT/probe.jsonl" "$OUT/kv-dump" --seed "$PYTHONHASHSEED" || rc=1
"$PY" - "$OUT/probe.jsonl" <<'EOF'
import collections, json, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
calls = collections.Counter((r["role"].split(".")[-1], r["method"]) for r in recs)
print("[smoke] connector calls:", ", ".join(f"{r}.{m}={n}" for (r, m), n in sorted(calls.items())))
reg = next(r for r in recs if r["method"] == "register_kv_caches")
lay = next(iter(reg["layers"].values()))
print(f"[smoke] register_kv_caches: {reg['num_layers']} layers, shape {lay['shape']} {lay['dtype']} "
      f"stride {lay['stride']} device {lay['device']}, one storage: {reg['one_storage_for_all_layers']}")
EOF
log "total $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s, rc=$rc, logs in $OUT"
exit $rc
