# Native layer: copier throughput vs a plain memcpy of the same bytes
# and UCX transfer-agent GETs vs a plain ucp_get_nbx loop (ratio tables); the CUDA build's compile check (no GPU or toolkit needed:
# it pip-installs the CUDA runtime headers into a temp venv; skip with
# NATIVE_CUDA_CHECK=0); a rebuild of the library when its C test changes.
BENCH_TARGETS += bench-native
NATIVE_CUDA_CHECK ?= 1
ifeq ($(NATIVE_CUDA_CHECK),1)
TEST_EXTRA += check-native-cuda
endif
.PHONY: bench-native check-native-cuda
bench-native: native
	$(GO) run -tags '$(GO_TAGS)' ./benchmarks/native
	$(GO) run -tags '$(GO_TAGS)' ./benchmarks/native -xfer

check-native-cuda:
	GO=$(GO) scripts/native-cuda-compile-check.sh

$(NATIVE_LIB): $(wildcard native/tests/*.c native/tests/*.h)
