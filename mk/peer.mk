# Cross-host KV fetch benchmark: engine B fetching engine A's blocks over
# UCX (tcp on loopback) vs bare UCX in the same run: benchmarks/native's
# two-process ucp_get_nbx reader (the target's baseline) and, as a
# cache-hot reference, ucx_perftest from Debian ucx-utils; without UCX in
# the build it prints why and passes (docs/multi-host.md#benchmark).
# RDMA hosts: scripts/bench-peer-rdma.
BENCH_TARGETS += bench-peer
.PHONY: bench-peer
bench-peer: build
	$(GO) run -tags '$(GO_TAGS)' ./benchmarks/peer -pegaflow $(abspath $(BIN_DIR)/pegaflow) -go $(GO) -go-tags '$(GO_TAGS)'
