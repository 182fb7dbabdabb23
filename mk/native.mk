# Native layer: copier throughput vs a plain memcpy of the same bytes
# (ratio table), and a rebuild of the library when its C test changes.
BENCH_TARGETS += bench-native
.PHONY: bench-native
bench-native: native
	$(GO) run -tags '$(GO_TAGS)' ./native/cmd/nativebench

$(NATIVE_LIB): $(wildcard native/tests/*.c)
