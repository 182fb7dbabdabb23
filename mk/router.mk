# Router benchmark: the router and the minimal httputil two-leg proxy
# (the baseline) in front of the same fast backends, each proxy pinned to
# its own core; ratios router / baseline (docs/router.md#benchmark). Then
# --lb kv's routing decision (hashes, lookups, picks; cold and warm
# prompts at 8K and 32K tokens, 8 and 64 backends; p50-us the median) and
# /tokenize apart (docs/router.md, "What --lb kv costs").
BENCH_TARGETS += bench-router
.PHONY: bench-router
bench-router: build
	$(GO) run ./benchmarks/router -pegaflow $(abspath $(BIN_DIR)/pegaflow)
	$(GO) test -run '^$$' -bench '^(BenchmarkKVRoute|BenchmarkKVTokenize|BenchmarkHashMemoWalk)$$' -benchtime 2000x ./router/
