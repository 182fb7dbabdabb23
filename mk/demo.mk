# The main job: P/D (engine + router + 1P+1D simulators) against DP2 (two
# aggregated simulators behind the router, round-robin) on one workload.
# DEMO_FLAGS passes `pegaflow demo` flags, e.g. DEMO_FLAGS='--num-prompts 100'.
DEMO_FLAGS ?=
# The KV routing comparison needs root, so it is its own target, named at
# the end.
.PHONY: demo
demo: build
	$(BIN_DIR)/pegaflow demo --work-dir $(BUILD_DIR)/demo --json $(BUILD_DIR)/demo/report.json $(DEMO_FLAGS)
	@echo "Next: KV-aware routing against round robin, least in-flight and an oracle on two hosts: sudo make demo-kv (docs/router.md)"

# P/D on one host against P/D across two "hosts" (two network namespaces
# joined by a veth pair, D's engine fetching P's KV over UCX tcp). Needs
# root and a build with UCX; DEMO_FLAGS as for `make demo`.
.PHONY: demo-multihost
demo-multihost: build
	$(BIN_DIR)/pegaflow demo --hosts 2 --work-dir $(BUILD_DIR)/demo-multihost --json $(BUILD_DIR)/demo-multihost/report.json $(DEMO_FLAGS)

# Routing policies compared on the two-host lab (2 P + 2 D kv_both sims,
# a multi-turn chat workload, one run per policy with the same seed):
# hit ratio, TTFT over turns >= 2, bypasses, cross-host bytes, and an
# oracle's hit ratio (docs/router.md, "KV-aware routing: measured").
# Needs root, as demo-multihost; ~4 min. DEMO_FLAGS: --seed, --users,
# --turns.
.PHONY: demo-kv
demo-kv: build
	$(BIN_DIR)/pegaflow demo --kv --work-dir $(BUILD_DIR)/demo-kv --json $(BUILD_DIR)/demo-kv/report.json $(DEMO_FLAGS)

# The SSD tier (docs/ssd.md): a multi-turn workload on an engine pool
# several times smaller than its KV, without and with --ssd-dir (a
# directory under the work dir), then the engine killed with SIGKILL and
# restarted mid-run: hit ratios and TTFT side by side, recovery, the hit
# ratio per 2 s window. No root; ~1 min. DEMO_FLAGS: --users, --turns,
# --seed, --pool-size, --kill-after.
.PHONY: demo-ssd
demo-ssd: build
	$(BIN_DIR)/pegaflow demo --ssd --work-dir $(BUILD_DIR)/demo-ssd --json $(BUILD_DIR)/demo-ssd/report.json $(DEMO_FLAGS)
