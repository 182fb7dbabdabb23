# PegaFlow build. `make test` is what CI runs; `make demo` is the main job.
# Component fragments in mk/*.mk append to TEST_EXTRA, BENCH_TARGETS and
# define their own targets.
SHELL := /bin/bash
comma := ,
GO ?= go
PYTHON ?= python3
BUILD_DIR ?= build
BIN_DIR ?= bin
CUDA ?= 0
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)

ifeq ($(CUDA),1)
GO_TAGS := cuda
NATIVE_LIB := $(BUILD_DIR)/native-cuda/libpegaflow_native.a
NATIVE_CMAKE_FLAGS := -DPEGAFLOW_CUDA=ON
NATIVE_BUILD := $(BUILD_DIR)/native-cuda
else
GO_TAGS :=
NATIVE_LIB := $(BUILD_DIR)/native/libpegaflow_native.a
NATIVE_CMAKE_FLAGS := -DPEGAFLOW_CUDA=OFF
NATIVE_BUILD := $(BUILD_DIR)/native
endif

# go-nvml's cgo preamble uses NVML calls its headers mark deprecated; the
# warnings say nothing about our code.
export CGO_CFLAGS ?= -O2 -g -Wno-deprecated-declarations

# The UCX transfer layer (native/xfer.go, cross-host KV) links the system's
# UCX when pkg-config finds it (Debian libucx-dev, HPC-X, DOCA); without it
# the build takes the `noucx` stub, which answers "UCX not built", so a
# machine without UCX still builds, tests and demos everything else.
UCX ?= $(shell pkg-config --exists ucx 2>/dev/null && echo 1 || echo 0)
ifeq ($(UCX),0)
GO_TAGS := $(if $(GO_TAGS),$(GO_TAGS)$(comma))noucx
NATIVE_CMAKE_FLAGS += -DPEGAFLOW_UCX=OFF
$(info UCX not found by pkg-config: building without the cross-host transfer layer (apt-get install libucx-dev pkg-config))
endif

# The binary runs as root beside vLLM and parses peers' and clients' bytes:
# it is position-independent (ASLR for its code too) with full RELRO (every
# symbol bound at start, the GOT read-only after). BIND_NOW works because
# engine/topology/nvmlshim defines the NVML symbols go-nvml leaves to lazy
# binding. `make release` also strips it.
GO_HARDEN_LDFLAGS := -linkmode=external -extldflags '-Wl,-z,relro,-z,now'
GO_BUILD_FLAGS := -tags '$(GO_TAGS)' -buildmode=pie -ldflags "-X main.version=$(VERSION) $(GO_HARDEN_LDFLAGS)"
GO_RELEASE_FLAGS := -tags '$(GO_TAGS)' -buildmode=pie -trimpath -ldflags "-s -w -X main.version=$(VERSION) $(GO_HARDEN_LDFLAGS)"
TEST_EXTRA :=
BENCH_TARGETS :=
PROTO_EXTRA :=

.PHONY: all build release check-binary nvml-shim native test test-go test-fuzz bench run lint proto proto-go clean
all: build

native: $(NATIVE_LIB)
$(NATIVE_LIB): CMakeLists.txt $(wildcard native/src/*.c native/src/*.h native/src/*.cu native/include/*.h)
	cmake -S . -B $(NATIVE_BUILD) -DCMAKE_BUILD_TYPE=Release $(NATIVE_CMAKE_FLAGS) >/dev/null
	cmake --build $(NATIVE_BUILD) -j >/dev/null

build: native
	$(GO) build $(GO_BUILD_FLAGS) -o $(BIN_DIR)/pegaflow ./cmd/pegaflow

# A stripped release binary (bin/release/pegaflow), checked like the build.
release: native
	$(GO) build $(GO_RELEASE_FLAGS) -o $(BIN_DIR)/release/pegaflow ./cmd/pegaflow
	scripts/check-binary.sh --stripped $(BIN_DIR)/release/pegaflow

# PIE and full RELRO, read from the ELF headers, and the binary starts
# (part of `make test`).
check-binary: build
	scripts/check-binary.sh $(BIN_DIR)/pegaflow

-include mk/*.mk

test: build check-binary lint test-go test-fuzz $(TEST_EXTRA)

test-go: native
	$(GO) vet -tags '$(GO_TAGS)' ./...
	$(GO) test -race -count=1 -tags '$(GO_TAGS)' ./...
	# The router's tests once more on its net/http leg client (--upstream-client).
	$(GO) test -race -count=1 -tags '$(GO_TAGS)' ./router/ -args -upstream-client=nethttp

# Short fuzz runs of request validation and of the live gRPC server (a
# regression net, not a campaign). Budgets are execution counts (-fuzztime Nx,
# about 10 s each here), not durations: with a duration, Go 1.26's fuzz
# coordinator can fail a clean run with "context deadline exceeded" when a
# starved worker misses the deadline (go.dev/issue/75804, fixed in Go 1.27).
# FUZZ_TIME=5m make test-fuzz runs a longer, duration-bound campaign.
FUZZ_TIME ?=
fuzz_budget = $(if $(FUZZ_TIME),$(FUZZ_TIME),$(1)x)
test-fuzz: native
	$(GO) test -run '^$$' -fuzz '^FuzzServer$$' -fuzztime $(call fuzz_budget,20000) ./engine/server/
	$(GO) test -run '^$$' -fuzz '^FuzzValidateRegister$$' -fuzztime $(call fuzz_budget,100000) ./engine/
	$(GO) test -run '^$$' -fuzz '^FuzzValidateBlocks$$' -fuzztime $(call fuzz_budget,100000) ./engine/
	$(GO) test -run '^$$' -fuzz '^FuzzParseRequest$$' -fuzztime $(call fuzz_budget,100000) ./router/
	$(GO) test -run '^$$' -fuzz '^FuzzRelayChunking$$' -fuzztime $(call fuzz_budget,100000) ./router/
	$(GO) test -run '^$$' -fuzz '^FuzzCheckPrompt$$' -fuzztime $(call fuzz_budget,100000) ./router/
	$(GO) test -run '^$$' -fuzz '^FuzzUpstreamResponse$$' -fuzztime $(call fuzz_budget,100000) ./router/upstream/

bench: build $(BENCH_TARGETS)

run: build
	$(BIN_DIR)/pegaflow serve

# Static checks, clean on every commit (part of `make test`): go vet, gofmt,
# staticcheck and ruff (rules pinned in ruff.toml), both at pinned versions.
STATICCHECK ?= $(GO) run honnef.co/go/tools/cmd/staticcheck@v0.8.2
RUFF_VERSION ?= 0.17.6
lint: native
	$(GO) vet -tags '$(GO_TAGS)' ./...
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); exit 1; }
	$(STATICCHECK) -tags '$(GO_TAGS)' ./...
	@$(PYTHON) -m ruff --version 2>/dev/null | grep -qx 'ruff $(RUFF_VERSION)' || \
	  $(PYTHON) -m pip install -q --disable-pip-version-check --root-user-action=ignore 'ruff==$(RUFF_VERSION)'
	$(PYTHON) -m ruff check .

# Regenerates the committed API code from the .proto (Go here; fragments add
# the Python stubs through PROTO_EXTRA).
proto: proto-go $(PROTO_EXTRA)
proto-go:
	$(PYTHON) -m grpc_tools.protoc -I engine/api/proto \
	  --plugin=protoc-gen-go=$$($(GO) env GOPATH)/bin/protoc-gen-go \
	  --plugin=protoc-gen-go-grpc=$$($(GO) env GOPATH)/bin/protoc-gen-go-grpc \
	  --go_out=. --go_opt=module=github.com/pegaflow/pegaflow \
	  --go-grpc_out=. --go-grpc_opt=module=github.com/pegaflow/pegaflow \
	  engine/api/proto/pegaflow/v1/engine.proto engine/api/proto/pegaflow/v1/peer.proto

# Regenerates engine/topology/nvmlshim's NVML forwarders from go-nvml's
# nvml.h (committed); run after changing go-nvml's version.
nvml-shim:
	$(GO) generate ./engine/topology/nvmlshim/

clean:
	rm -rf $(BUILD_DIR) $(BIN_DIR)
