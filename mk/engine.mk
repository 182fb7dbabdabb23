# Engine benchmark: save+load through the API from a client process vs
# memcpy, query latency, RPC vs bare UNIX-socket ping-pong.
BENCH_TARGETS += bench-engine
.PHONY: bench-engine
bench-engine: native
	$(GO) run -tags '$(GO_TAGS)' ./benchmarks/engine
