# Router overhead benchmark against the same backends called directly.
BENCH_TARGETS += bench-router
.PHONY: bench-router
bench-router:
	$(GO) run ./scripts/bench/router
