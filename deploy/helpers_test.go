package deploy

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"
)

// pegaflowBinary is $PEGAFLOW_BIN, or a pegaflow built once per test run
// into build/deploy-test (the native library must be built: `make native`).
var pegaflowBinary = func() func(t *testing.T) string {
	var once sync.Once
	var bin string
	var err error
	return func(t *testing.T) string {
		t.Helper()
		once.Do(func() {
			if bin = os.Getenv("PEGAFLOW_BIN"); bin != "" {
				return
			}
			// Under the ignored build/, rebuilt (incrementally) per run.
			bin, err = filepath.Abs(filepath.Join("..", "build", "deploy-test", "pegaflow"))
			if err != nil {
				return
			}
			if out, berr := exec.Command("go", "build", "-o", bin, "../cmd/pegaflow").CombinedOutput(); berr != nil {
				err = fmt.Errorf("go build: %w\n%s", berr, out)
			}
		})
		require.NoError(t, err)
		return bin
	}
}()

// lookPathOrSkip finds a tool the test needs, or skips the test saying how
// to get it (CI installs them: .ci/run).
func lookPathOrSkip(t *testing.T, tool, hint string) string {
	t.Helper()
	path, err := exec.LookPath(tool)
	if err != nil {
		t.Skipf("%s not installed (%s); .ci/run installs it", tool, hint)
	}
	return path
}

// metricRef matches a PegaFlow metric name in a query.
var metricRef = regexp.MustCompile(`\bpegaflow_[a-z_]+\b`)

// metricNames lists the PegaFlow metric names the queries use, sorted.
func metricNames(queries []string) []string {
	set := map[string]bool{}
	for _, q := range queries {
		for _, m := range metricRef.FindAllString(q, -1) {
			set[m] = true
		}
	}
	names := make([]string, 0, len(set))
	for m := range set {
		names = append(names, m)
	}
	sort.Strings(names)
	return names
}

// baseMetric strips the series suffix a histogram's samples carry.
func baseMetric(name string) string {
	for _, s := range []string{"_bucket", "_sum", "_count"} {
		if trimmed, ok := strings.CutSuffix(name, s); ok {
			return trimmed
		}
	}
	return name
}
