// Package archtest holds the repository's map checks: every package with
// more than a few files keeps a file index in its package doc that names
// each of its files, and imports only flow the way docs/design.md draws
// them. They read the source tree; nothing here is imported.
package archtest

import (
	"go/parser"
	"go/token"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

const module = "github.com/pegaflow/pegaflow"

// indexedFrom is the number of (non-test, non-generated) Go files from
// which a package must carry a file index.
const indexedFrom = 4

// generated packages are exempt: their files are named by their generator.
var generated = map[string]bool{"engine/api/pegaflowv1": true}

func repoRoot(t *testing.T) string {
	t.Helper()
	root, err := filepath.Abs("../..")
	require.NoError(t, err)
	_, err = os.Stat(filepath.Join(root, "go.mod"))
	require.NoError(t, err)
	return root
}

// packages maps each package directory (relative to the root) to its
// non-test Go files, without generated ones (zz_* and *.pb.go).
func packages(t *testing.T, root string) map[string][]string {
	t.Helper()
	out := map[string][]string{}
	err := filepath.WalkDir(root, func(path string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		name := d.Name()
		if d.IsDir() {
			if path != root && (strings.HasPrefix(name, ".") || name == "testdata" || name == "build" || name == "bin" || name == "node_modules") {
				return filepath.SkipDir
			}
			return nil
		}
		if !strings.HasSuffix(name, ".go") || strings.HasSuffix(name, "_test.go") || strings.HasPrefix(name, "zz_") || strings.HasSuffix(name, ".pb.go") {
			return nil
		}
		rel, _ := filepath.Rel(root, filepath.Dir(path))
		out[rel] = append(out[rel], name)
		return nil
	})
	require.NoError(t, err)
	return out
}

// packageDoc is the package's doc comment (of whichever file has one).
func packageDoc(t *testing.T, dir string, files []string) string {
	t.Helper()
	var doc strings.Builder
	fset := token.NewFileSet()
	for _, f := range files {
		af, err := parser.ParseFile(fset, filepath.Join(dir, f), nil, parser.ParseComments|parser.PackageClauseOnly)
		require.NoError(t, err)
		if af.Doc != nil {
			doc.WriteString(af.Doc.Text())
		}
	}
	return doc.String()
}

// Every package of indexedFrom or more files names each of them in its
// package doc: a file added without a line there fails here.
func TestFileIndexesNameEveryFile(t *testing.T) {
	root := repoRoot(t)
	var missing []string
	for dir, files := range packages(t, root) {
		if len(files) < indexedFrom || generated[filepath.ToSlash(dir)] {
			continue
		}
		doc := packageDoc(t, filepath.Join(root, dir), files)
		for _, f := range files {
			if !strings.Contains(doc, f) {
				missing = append(missing, filepath.ToSlash(filepath.Join(dir, f)))
			}
		}
	}
	sort.Strings(missing)
	require.Empty(t, missing, "files missing from their package's file index (the package doc comment)")
}

// Imports flow one way (docs/design.md): internal/ packages import no
// package above them (the generated API contract aside); the engine knows
// nothing of the router, the router nothing of the engine.
func TestImportsFlowOneWay(t *testing.T) {
	root := repoRoot(t)
	out, err := exec.Command("go", "list", "-f", `{{.ImportPath}}{{range .Imports}} {{.}}{{end}}`, module+"/...").Output()
	require.NoError(t, err)
	var bad []string
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		fields := strings.Fields(line)
		pkg := strings.TrimPrefix(fields[0], module+"/")
		for _, imp := range fields[1:] {
			if !strings.HasPrefix(imp, module+"/") {
				continue
			}
			dep := strings.TrimPrefix(imp, module+"/")
			switch {
			case strings.HasPrefix(pkg, "internal/") && !strings.HasPrefix(dep, "internal/") && dep != "engine/api/pegaflowv1":
				bad = append(bad, pkg+" -> "+dep+" (internal/ imports upward)")
			case strings.HasPrefix(pkg, "engine") && strings.HasPrefix(dep, "router"):
				bad = append(bad, pkg+" -> "+dep+" (the engine knows no router)")
			case strings.HasPrefix(pkg, "router") && strings.HasPrefix(dep, "engine"):
				bad = append(bad, pkg+" -> "+dep+" (the router reaches the engine only through the interfaces it defines, KVReadySource and KVIndex, which cmd/pegaflow fills)")
			}
		}
	}
	_ = root
	require.Empty(t, bad)
}
