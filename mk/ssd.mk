# SSD tier: promote (reads) and spill (writes) GB/s of the native SSD
# engine vs fio (when on PATH) and O_DIRECT pread/pwrite loops on the same
# file, 16 KiB-2 MiB blocks, and the store's recovery time for 1M slots
# (docs: native/README.md#benchmarks). PEGAFLOW_BENCH_SSD_DIR picks the
# device (default a temp dir under /var/tmp); BENCH_SSD_FLAGS passes flags
# (-file-mib, -seconds, -recovery-slots, -no-fio, ...).
BENCH_TARGETS += bench-ssd
BENCH_SSD_FLAGS ?=
.PHONY: bench-ssd
bench-ssd: native
	$(GO) run -tags '$(GO_TAGS)' ./benchmarks/ssd $(BENCH_SSD_FLAGS)
