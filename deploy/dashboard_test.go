package deploy

import (
	"encoding/json"
	"fmt"
	"os"
	"regexp"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

const dashboardPath = "grafana/pegaflow.json"

// dashboard is the part of Grafana's dashboard model the checks read.
type dashboard struct {
	Title         string  `json:"title"`
	UID           string  `json:"uid"`
	SchemaVersion int     `json:"schemaVersion"`
	Panels        []panel `json:"panels"`
	Templating    struct {
		List []variable `json:"list"`
	} `json:"templating"`
}

type panel struct {
	ID         int                      `json:"id"`
	Type       string                   `json:"type"`
	Title      string                   `json:"title"`
	Datasource *datasourceRef           `json:"datasource"`
	GridPos    struct{ X, Y, W, H int } `json:"gridPos"`
	Targets    []target                 `json:"targets"`
	Panels     []panel                  `json:"panels"` // a collapsed row's panels
}

type target struct {
	RefID      string         `json:"refId"`
	Expr       string         `json:"expr"`
	Datasource *datasourceRef `json:"datasource"`
}

type datasourceRef struct {
	Type string `json:"type"`
	UID  string `json:"uid"`
}

type variable struct {
	Name       string          `json:"name"`
	Type       string          `json:"type"`
	Query      json.RawMessage `json:"query"`
	Datasource *datasourceRef  `json:"datasource"`
	Multi      bool            `json:"multi"`
	IncludeAll bool            `json:"includeAll"`
}

// queryString is a query variable's PromQL (Grafana stores a string or
// {"query": ...}).
func (v variable) queryString() string {
	var s string
	if json.Unmarshal(v.Query, &s) == nil {
		return s
	}
	var q struct {
		Query string `json:"query"`
	}
	_ = json.Unmarshal(v.Query, &q)
	return q.Query
}

func loadDashboard(t *testing.T) dashboard {
	t.Helper()
	raw, err := os.ReadFile(dashboardPath)
	require.NoError(t, err)
	var d dashboard
	require.NoError(t, json.Unmarshal(raw, &d), "%s is not valid JSON", dashboardPath)
	return d
}

// allPanels flattens rows (collapsed rows nest their panels).
func (d dashboard) allPanels() []panel {
	var out []panel
	var walk func([]panel)
	walk = func(ps []panel) {
		for _, p := range ps {
			out = append(out, p)
			walk(p.Panels)
		}
	}
	walk(d.Panels)
	return out
}

// queries is every panel target's expression, named for messages.
func (d dashboard) queries() map[string]string {
	q := map[string]string{}
	for _, p := range d.allPanels() {
		for _, tg := range p.Targets {
			q[fmt.Sprintf("panel %d %q target %s", p.ID, p.Title, tg.RefID)] = tg.Expr
		}
	}
	return q
}

const datasourceVar = "${datasource}"

// varRef matches a dashboard variable reference: $name, ${name}, [[name]].
var varRef = regexp.MustCompile(`\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]`)

// TestDashboardSchema checks what Grafana's import needs and what keeps the
// dashboard portable: valid JSON, a uid and schema version, unique panel
// ids, sane grid positions, every panel and query on the templated data
// source, every variable a query uses defined, and every metric it names
// documented (README.md, docs/router.md).
func TestDashboardSchema(t *testing.T) {
	d := loadDashboard(t)
	require.NotEmpty(t, d.Title)
	require.Regexp(t, `^[A-Za-z0-9_-]{1,40}$`, d.UID, "uid: what Grafana's URLs and provisioning key on")
	require.GreaterOrEqual(t, d.SchemaVersion, 36, "schemaVersion: Grafana 9+ datasource references")

	vars := map[string]variable{}
	for _, v := range d.Templating.List {
		require.NotContains(t, vars, v.Name, "variable %q defined twice", v.Name)
		vars[v.Name] = v
	}
	require.Contains(t, vars, "datasource")
	require.Equal(t, "datasource", vars["datasource"].Type)
	for _, name := range []string{"instance", "mode"} {
		v, ok := vars[name]
		require.True(t, ok, "variable %q", name)
		require.Equal(t, "query", v.Type, name)
		require.True(t, v.Multi && v.IncludeAll, "%s: multi-value with All, so both routers show at once", name)
		require.Equal(t, datasourceVar, v.Datasource.UID, "%s: on the templated data source", name)
		require.Contains(t, v.queryString(), "label_values(", name)
	}

	builtin := map[string]bool{"__rate_interval": true, "__interval": true, "__range": true}
	ids := map[int]string{}
	for _, p := range d.allPanels() {
		require.Positive(t, p.ID, "panel %q", p.Title)
		require.NotContains(t, ids, p.ID, "panel id %d used by %q and %q", p.ID, ids[p.ID], p.Title)
		ids[p.ID] = p.Title
		require.NotEmpty(t, p.Title, "panel %d", p.ID)
		g := p.GridPos
		require.True(t, g.W > 0 && g.H > 0 && g.X >= 0 && g.Y >= 0 && g.X+g.W <= 24, "panel %d %q gridPos %+v", p.ID, p.Title, g)
		if p.Type == "row" {
			continue
		}
		require.NotNil(t, p.Datasource, "panel %d %q has no datasource", p.ID, p.Title)
		require.Equal(t, datasourceVar, p.Datasource.UID, "panel %d %q: datasource must be templated", p.ID, p.Title)
		require.NotEmpty(t, p.Targets, "panel %d %q has no queries", p.ID, p.Title)
		refs := map[string]bool{}
		for _, tg := range p.Targets {
			require.NotEmpty(t, tg.RefID, "panel %d %q", p.ID, p.Title)
			require.False(t, refs[tg.RefID], "panel %d %q: refId %s twice", p.ID, p.Title, tg.RefID)
			refs[tg.RefID] = true
			require.NotEmpty(t, strings.TrimSpace(tg.Expr), "panel %d %q target %s", p.ID, p.Title, tg.RefID)
			require.NotNil(t, tg.Datasource, "panel %d %q target %s", p.ID, p.Title, tg.RefID)
			require.Equal(t, datasourceVar, tg.Datasource.UID, "panel %d %q target %s: datasource must be templated", p.ID, p.Title, tg.RefID)
			for _, m := range varRef.FindAllStringSubmatch(tg.Expr, -1) {
				name := m[1] + m[2] + m[3]
				require.True(t, builtin[name] || vars[name].Name != "", "panel %d %q uses undefined variable $%s", p.ID, p.Title, name)
			}
		}
	}
	overlapFree(t, d.Panels)
	documented(t, d.queries())
}

// overlapFree fails when two top-level panels share a grid cell (Grafana
// would shove one aside, breaking the rows' layout).
func overlapFree(t *testing.T, ps []panel) {
	t.Helper()
	cells := map[[2]int]int{}
	for _, p := range ps {
		g := p.GridPos
		for y := g.Y; y < g.Y+g.H; y++ {
			for x := g.X; x < g.X+g.W; x++ {
				other, taken := cells[[2]int{x, y}]
				require.False(t, taken, "panels %d and %d overlap at x=%d y=%d", other, p.ID, x, y)
				cells[[2]int{x, y}] = p.ID
			}
		}
	}
}

// documented fails on a metric name no metrics table lists: a typo, or a
// metric the binaries do not export.
func documented(t *testing.T, queries map[string]string) {
	t.Helper()
	var docs strings.Builder
	for _, f := range []string{"../README.md", "../docs/router.md"} {
		raw, err := os.ReadFile(f)
		require.NoError(t, err)
		docs.Write(raw)
	}
	for where, q := range queries {
		for _, m := range metricNames([]string{q}) {
			listed := regexp.MustCompile("`" + baseMetric(m) + "[`{]")
			require.Regexp(t, listed, docs.String(), "%s: metric %s is not in README.md or docs/router.md", where, m)
		}
	}
}
