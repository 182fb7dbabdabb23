package deploy

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"
	"go.yaml.in/yaml/v3"
)

const (
	promConfigPath = "prometheus/prometheus.yml"
	rulesPath      = "prometheus/pegaflow-alerts.yml"
)

// ruleFile is a Prometheus rule file; rules keep every field they have so
// a rewritten copy (testRules) loses nothing.
type ruleFile struct {
	Groups []struct {
		Name  string           `yaml:"name"`
		Rules []map[string]any `yaml:"rules"`
	} `yaml:"groups"`
}

func loadRules(t *testing.T) ruleFile {
	t.Helper()
	raw, err := os.ReadFile(rulesPath)
	require.NoError(t, err)
	var rf ruleFile
	require.NoError(t, yaml.Unmarshal(raw, &rf))
	return rf
}

// alerts maps each alert's name to its expression.
func (rf ruleFile) alerts() map[string]string {
	out := map[string]string{}
	for _, g := range rf.Groups {
		for _, r := range g.Rules {
			if name, ok := r["alert"].(string); ok {
				out[name], _ = r["expr"].(string)
			}
		}
	}
	return out
}

// testHold replaces every rule's `for:` in the test's copy: long enough
// that one missed health poll on a loaded machine (the routers poll every
// 500 ms) does not fire an alert, short enough not to wait out the
// production hold times.
const testHold = "3s"

// writeTestRules writes the rules with testHold as every `for:`.
func writeTestRules(t *testing.T, dir string) string {
	t.Helper()
	rf := loadRules(t)
	for _, g := range rf.Groups {
		for _, r := range g.Rules {
			r["for"] = testHold
		}
	}
	raw, err := yaml.Marshal(rf)
	require.NoError(t, err)
	path := filepath.Join(dir, "pegaflow-alerts.test.yml")
	require.NoError(t, os.WriteFile(path, raw, 0o644))
	return path
}

// TestAlertRules checks the rules an operator relies on exist, each says
// how bad it is and what it means, and every metric it names is documented.
func TestAlertRules(t *testing.T) {
	rf := loadRules(t)
	alerts := rf.alerts()
	for _, name := range []string{
		"PegaflowNoHealthyPrefillBackend", "PegaflowNoHealthyDecodeBackend", "PegaflowKVReadyTimeouts",
		"PegaflowSaveFailures", "PegaflowPoolFullNothingEvictable", "PegaflowEngineDown",
	} {
		require.Contains(t, alerts, name)
	}
	seen := map[string]bool{}
	for _, g := range rf.Groups {
		for _, r := range g.Rules {
			name, _ := r["alert"].(string)
			require.NotEmpty(t, name, "group %s: only alerting rules here", g.Name)
			require.False(t, seen[name], "alert %s defined twice", name)
			seen[name] = true
			labels, _ := r["labels"].(map[string]any)
			require.Contains(t, []any{"critical", "warning"}, labels["severity"], "%s: severity", name)
			ann, _ := r["annotations"].(map[string]any)
			require.NotEmpty(t, ann["summary"], "%s: summary", name)
			require.NotEmpty(t, ann["description"], "%s: description", name)
		}
	}
	named := map[string]string{}
	for name, expr := range alerts {
		named["alert "+name] = expr
	}
	documented(t, named)
}

// TestPromtool runs promtool's own checks of the shipped config and rules
// (the config's rule_files resolve next to it).
func TestPromtool(t *testing.T) {
	promtool := lookPathOrSkip(t, "promtool", "apt-get install prometheus")
	for _, args := range [][]string{{"check", "config", promConfigPath}, {"check", "rules", rulesPath}} {
		out, err := exec.Command(promtool, args...).CombinedOutput()
		require.NoError(t, err, "promtool %v:\n%s", args, out)
	}
}
