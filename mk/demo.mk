# The main job: P/D (engine + router + 1P+1D simulators) against DP2 (two
# aggregated simulators behind the router, round-robin) on one workload.
# DEMO_FLAGS passes `pegaflow demo` flags, e.g. DEMO_FLAGS='--num-prompts 100'.
DEMO_FLAGS ?=
.PHONY: demo
demo: build
	$(BIN_DIR)/pegaflow demo --work-dir $(BUILD_DIR)/demo --json $(BUILD_DIR)/demo/report.json $(DEMO_FLAGS)
