# Cross-host KV fetch benchmark: engine B fetching engine A's blocks over
# the validated stream (--peer-transport=tcp, loopback) vs a bare transfer
# of the same bytes over loopback TCP in the same run (two processes of the
# benchmark itself, plain Go net, the fetch's chunks and parallelism); no
# UCX needed (docs/multi-host.md#benchmark). RDMA hosts (UCX one-sided
# reads vs bare UCX and ucx_perftest): scripts/bench-peer-rdma.
BENCH_TARGETS += bench-peer
.PHONY: bench-peer
bench-peer: build
	$(GO) run -tags '$(GO_TAGS)' ./benchmarks/peer -pegaflow $(abspath $(BIN_DIR)/pegaflow) -go $(GO) -go-tags '$(GO_TAGS)'
