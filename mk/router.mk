# Router benchmark: the router and the minimal httputil two-leg proxy
# (the baseline) in front of the same fast backends, each proxy pinned to
# its own core; ratios router / baseline (docs/router.md#benchmark).
BENCH_TARGETS += bench-router
.PHONY: bench-router
bench-router: build
	$(GO) run ./benchmarks/router -pegaflow $(abspath $(BIN_DIR)/pegaflow)
