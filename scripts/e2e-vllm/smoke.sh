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

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
VENV="${E2E_VLLM_VENV:-/tmp/vllm-venv}"
MODEL="${E2E_MODEL_DIR:-/tmp/tiny-model}"
OUT="${1:-$ROOT/build/e2e-vllm/smoke}"
START_TIMEOUT="${E2E_START_TIMEOUT:-300}"
PY="$VENV/bin/python"

[[ -x "$PY" && -f "$MODEL/config.json" ]] || { echo "run scripts/e2e-vllm/setup.sh first" >&2; exit 2; }
rm -rf "$OUT" && mkdir -p "$OUT"

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
REF_PORT=$(free_port)
PROBE_PORT=$(free_port)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 1 60); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.25; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  done
}
trap cleanup EXIT

# Same flags for both: only the connector differs. Block size 32: the CPU
# attention backend accepts only multiples of 32.
COMMON=(--host 127.0.0.1 --dtype float32 --max-model-len 2048 --block-size 32
        --enforce-eager --kv-cache-memory-bytes 134217728 --seed 0)
export PYTHONHASHSEED=0 HF_HUB_OFFLINE=1

t0=$(date +%s.%N)
setsid "$HERE/vllm-serve" "$MODEL" --port "$REF_PORT" "${COMMON[@]}" >"$OUT/ref.log" 2>&1 &
PIDS+=($!)
PROBE_LOG="$OUT/probe.jsonl" PROBE_DUMP_DIR="$OUT/kv-dump" PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}" \
  setsid "$HERE/vllm-serve" "$MODEL" --port "$PROBE_PORT" "${COMMON[@]}" \
  --kv-transfer-config '{"kv_connector":"ProbeConnector","kv_role":"kv_both","kv_connector_module_path":"probe_connector"}' \
  >"$OUT/probe.log" 2>&1 &
PIDS+=($!)

wait_healthy() {  # PORT PID NAME
  local deadline=$((SECONDS + START_TIMEOUT))
  until curl -sf "http://127.0.0.1:$1/health" >/dev/null; do
    kill -0 "$2" 2>/dev/null || { echo "$3 exited during start; tail of $OUT/$3.log:" >&2; tail -30 "$OUT/$3.log" >&2; return 1; }
    ((SECONDS < deadline)) || { echo "$3 not healthy after ${START_TIMEOUT}s" >&2; return 1; }
    sleep 1
  done
}
wait_healthy "$REF_PORT" "${PIDS[0]}" ref
wait_healthy "$PROBE_PORT" "${PIDS[1]}" probe
echo "[smoke] both servers healthy after $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s"

rc=0
t1=$(date +%s.%N)
"$PY" "$HERE/compare_outputs.py" --ref "http://127.0.0.1:$REF_PORT" --cand "http://127.0.0.1:$PROBE_PORT" \
  --model "$MODEL" --json "$OUT/compare.json" || rc=1
echo "[smoke] compare: $(awk -v a="$t1" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s"

cleanup
PIDS=()
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
echo "[smoke] total $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s, rc=$rc, logs in $OUT"
exit $rc
