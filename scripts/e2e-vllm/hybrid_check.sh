#!/usr/bin/env bash
# P/D with hybrid models (several KV cache groups) on the real vLLM engine:
# the tiny real-weight families of make_tiny_model.py --family, each through
# the same engine + router + P + D + reference as pd_check.sh:
#
#   gemma3   sliding window 64 + global + sliding window: 3 groups
#   gpt-oss  sliding window 64 + full, attention sinks, MoE: 2 groups
#   llama4   chunked local attention (chunk 64) + global NoPE, MoE: 2 groups
#   qwen3.5  gated full attention + 3 Gated DeltaNet layers (bf16; vLLM
#            makes every block 96 tokens, state in "align" mode): 4 groups
#
# Per model: a plain vLLM reference, vLLM P (kv_both) and D (kv_consumer)
# with PegaFlowConnector, 14 cases (completions + chat, stream or not,
# ~200-900 prompt tokens, every prompt distinct) through the router. Each
# output must be token-identical to the reference, and D's external hit
# tokens (vLLM's vllm:prompt_tokens_by_source_total, source
# external_kv_transfer) must be >= E2E_HYBRID_MIN_HIT_PCT [50] % of all
# prompt tokens, with no failed load. One line per model:
#
#   [hybrid:gemma3] model gemma3: 14/14 identical, D external hit tokens H of P prompt tokens (R%)
#
# With --corrupt, each model then gets a poisoner P: the same model with its
# last layer's KV inputs re-drawn (make_tiny_model.py --poison: wrong blocks
# in exactly one KV cache group), serving under the real model's name, so its
# blocks land in P's namespace under the same hashes. It prefills a fresh
# prompt set, then D gets the same prompts directly: D must refuse the hit
# or every output must differ from the reference.
#
#   scripts/e2e-vllm/hybrid_check.sh [--models a,b] [--corrupt] [OUT_DIR]
#                                    (default build/e2e-vllm/hybrid, all models)
#
# Environment: as pd_check.sh, and E2E_HYBRID_MODELS [/tmp/tiny-hybrid]
# (where the models are built on first use), E2E_HYBRID_MIN_HIT_PCT [50].
set -euo pipefail
E2E_TAG=hybrid
source "$(dirname "$0")/lib.sh"

models=("${HYBRID_ALL[@]}")
corrupt=""
OUT="$ROOT/build/e2e-vllm/hybrid"
while (($#)); do
  case "$1" in
    --models) [[ $# -ge 2 ]] || { echo "--models needs a list" >&2; exit 2; }
      IFS=, read -r -a models <<<"$2"; shift 2 ;;
    --models=*) IFS=, read -r -a models <<<"${1#--models=}"; shift ;;
    --corrupt) corrupt=--corrupt; shift ;;
    -h | --help) sed -n '2,33p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) OUT="$1"; shift ;;
  esac
done
((${#models[@]})) || { echo "--models: empty list" >&2; exit 2; }
for m in "${models[@]}"; do hybrid_flags "$m" >/dev/null || exit 2; done
P_ROLE="${P_ROLE:-kv_both}"

e2e_begin "$OUT"
pd_begin
T0=$SECONDS
rc=0
start_engine
start_router
declare -A took
variant=10
for m in "${models[@]}"; do
  t=$SECONDS
  hybrid_phase "$m" "$variant" $corrupt || rc=1
  took[$m]=$((SECONDS - t))
  variant=$((variant + 1))
done
pd_leftovers || rc=1
for m in "${models[@]}"; do
  log "$(grep -h "model $m:" "$OUT/$m-check.txt" 2>/dev/null || echo "model $m: no result") [${took[$m]} s]"
done
log "total $((SECONDS - T0)) s, rc=$rc, logs in $OUT"
exit $rc
