// Package nvmlfake builds a stand-in libnvidia-ml.so.1 for tests, so the
// NVML path (go-nvml, the nvmlshim forwarders, topology discovery) runs on
// hosts without a GPU, and the same way on hosts with one.
//
// The library (testdata/libnvidia-ml.c) lists GPUs GPU-fake-0 and
// GPU-fake-1, PCI buses 0000:f0:00.0 and 0000:f1:00.0, 1 and 2 GiB, NVLink 0
// active on each, driver Driver; it implements no other NVML function.
package nvmlfake

import (
	"bytes"
	_ "embed"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// Facts the fake library reports.
const (
	Driver = "999.88.77"
	GPUs   = 2
)

//go:embed testdata/libnvidia-ml.c
var source []byte

// Build compiles the fake into a new temporary directory, as
// libnvidia-ml.so.1 (its soname too), and returns the directory: put it
// first on LD_LIBRARY_PATH, or dlopen the file by path.
func Build(t testing.TB) string {
	t.Helper()
	dir := t.TempDir()
	src := filepath.Join(dir, "libnvidia-ml.c")
	if err := os.WriteFile(src, source, 0o600); err != nil {
		t.Fatalf("nvmlfake: %v", err)
	}
	cc := "cc"
	if out, err := exec.Command("go", "env", "CC").Output(); err == nil && len(bytes.TrimSpace(out)) > 0 {
		cc = strings.TrimSpace(string(out))
	}
	lib := filepath.Join(dir, "libnvidia-ml.so.1")
	cmd := exec.Command(cc, "-shared", "-fPIC", "-O1", "-Wl,-soname,libnvidia-ml.so.1", "-o", lib, src)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nvmlfake: %s: %v\n%s", cmd, err, out)
	}
	return dir
}
