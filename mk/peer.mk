# Cross-host KV fetch benchmark: engine B fetching engine A's blocks over
# UCX (tcp on loopback) vs bare UCX (ucx_perftest from Debian ucx-utils,
# else benchmarks/native's ucp_get_nbx loop) in the same run; without UCX
# in the build it prints why and passes (docs/multi-host.md#benchmark).
# RDMA hosts: scripts/bench-peer-rdma.
BENCH_TARGETS += bench-peer
.PHONY: bench-peer
bench-peer: build
	$(GO) run -tags '$(GO_TAGS)' ./benchmarks/peer -pegaflow $(abspath $(BIN_DIR)/pegaflow) -go $(GO) -go-tags '$(GO_TAGS)'
