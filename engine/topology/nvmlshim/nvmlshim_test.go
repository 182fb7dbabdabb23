package nvmlshim_test

import (
	"bytes"
	"debug/elf"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/stretchr/testify/require"

	_ "github.com/pegaflow/pegaflow/engine/topology/nvmlshim"
	"github.com/pegaflow/pegaflow/engine/topology/nvmlshim/nvmlfake"
)

// This test binary links go-nvml like the real one. Every NVML symbol
// go-nvml calls must be defined in it (else BIND_NOW builds cannot start:
// go-nvml gained a function, run `make nvml-shim`), and none exported (an
// exported forwarder would interpose on NVML's calls to itself).
func TestNoNVMLDynamicSymbols(t *testing.T) {
	exe, err := os.Executable()
	require.NoError(t, err)
	f, err := elf.Open(exe)
	require.NoError(t, err)
	defer f.Close()
	syms, err := f.DynamicSymbols()
	require.NoError(t, err)
	var undefined, exported []string
	for _, s := range syms {
		if !strings.HasPrefix(s.Name, "nvml") {
			continue
		}
		if s.Section == elf.SHN_UNDEF {
			undefined = append(undefined, s.Name)
		} else {
			exported = append(exported, s.Name)
		}
	}
	require.Zero(t, len(undefined), "NVML symbols left to lazy binding (run make nvml-shim): %v", head(undefined))
	require.Zero(t, len(exported), "NVML symbols the binary exports: %v", head(exported))
}

func head(names []string) []string {
	return names[:min(len(names), 8)]
}

// The committed forwarders are what the generator writes for the go-nvml
// this module uses: the same functions and signatures.
func TestGeneratedForwardersCurrent(t *testing.T) {
	if testing.Short() {
		t.Skip("runs the generator")
	}
	out := filepath.Join(t.TempDir(), "forwarders.c")
	gen := exec.Command("go", "run", "./gen", "-o", out)
	var logs bytes.Buffer
	gen.Stdout, gen.Stderr = &logs, &logs
	require.NoError(t, gen.Run(), logs.String())
	want, err := os.ReadFile(out)
	require.NoError(t, err)
	got, err := os.ReadFile("zz_generated_forwarders.c")
	require.NoError(t, err)
	require.Equal(t, string(want), string(got), "zz_generated_forwarders.c is stale: run make nvml-shim")
}

// go-nvml through the forwarders, in the order a process meets NVML: calls
// before Init, a missing library, the fake library (its functions, one it
// lacks, error strings), calls after Shutdown unloaded it, and a second
// Init. Without the
// forwarders the first call kills the process (symbol lookup error).
func TestForwarding(t *testing.T) {
	fake := filepath.Join(nvmlfake.Build(t), "libnvidia-ml.so.1")
	lib := nvml.New(nvml.WithLibraryPath(fake))

	_, ret := lib.DeviceGetCount()
	require.Equal(t, nvml.ERROR_LIBRARY_NOT_FOUND, ret, "before Init")

	require.Equal(t, nvml.ERROR_LIBRARY_NOT_FOUND, nvml.New(nvml.WithLibraryPath(filepath.Join(t.TempDir(), "libnvidia-ml.so.1"))).Init(), "no library")

	require.Equal(t, nvml.SUCCESS, lib.Init())
	driver, ret := lib.SystemGetDriverVersion()
	require.Equal(t, nvml.SUCCESS, ret)
	require.Equal(t, nvmlfake.Driver, driver)
	count, ret := lib.DeviceGetCount()
	require.Equal(t, nvml.SUCCESS, ret)
	require.Equal(t, nvmlfake.GPUs, count)
	for i := range count {
		dev, ret := lib.DeviceGetHandleByIndex(i)
		require.Equal(t, nvml.SUCCESS, ret)
		uuid, ret := dev.GetUUID()
		require.Equal(t, nvml.SUCCESS, ret)
		require.Equal(t, fmt.Sprintf("GPU-fake-%d", i), uuid)
		state, ret := dev.GetNvLinkState(0)
		require.Equal(t, nvml.SUCCESS, ret)
		require.Equal(t, nvml.FEATURE_ENABLED, state)
		_, ret = dev.GetNvLinkState(7)
		require.Equal(t, nvml.ERROR_NOT_SUPPORTED, ret)
		_, ret = dev.GetNumaNodeId()
		require.Equal(t, nvml.ERROR_FUNCTION_NOT_FOUND, ret, "a function this NVML lacks")
	}
	require.Equal(t, "fake: error", nvml.ERROR_UNKNOWN.Error(), "nvmlErrorString, a pointer result")
	require.Equal(t, nvml.SUCCESS, lib.Shutdown())

	_, ret = lib.DeviceGetCount()
	require.Equal(t, nvml.ERROR_LIBRARY_NOT_FOUND, ret, "after Shutdown")

	// Loaded again (maybe elsewhere): nothing bound to the old mapping.
	require.Equal(t, nvml.SUCCESS, lib.Init())
	count, ret = lib.DeviceGetCount()
	require.Equal(t, nvml.SUCCESS, ret)
	require.Equal(t, nvmlfake.GPUs, count)
	require.Equal(t, nvml.SUCCESS, lib.Shutdown())
}

// BenchmarkForwardedCall is one go-nvml call through a forwarder (cgo,
// dlopen RTLD_NOLOAD, dlsym, the call, dlclose) into the fake library.
func BenchmarkForwardedCall(b *testing.B) {
	lib := nvml.New(nvml.WithLibraryPath(filepath.Join(nvmlfake.Build(b), "libnvidia-ml.so.1")))
	require.Equal(b, nvml.SUCCESS, lib.Init())
	defer lib.Shutdown()
	for b.Loop() {
		if _, ret := lib.DeviceGetCount(); ret != nvml.SUCCESS {
			b.Fatal(ret)
		}
	}
}
