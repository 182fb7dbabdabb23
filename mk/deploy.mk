# Operator kit (deploy/): the demo topology on fixed ports with steady load,
# for a local Prometheus + Grafana (docs/operations.md). The kit's checks
# are Go tests in deploy/ (part of test-go; the Prometheus one skips where
# prometheus is not installed; .ci/run installs it).
.PHONY: demo-stack
demo-stack: build
	deploy/demo-stack.sh --bin $(BIN_DIR)/pegaflow --work-dir $(BUILD_DIR)/demo-stack
