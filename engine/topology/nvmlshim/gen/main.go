// Command gen writes the NVML forwarders of package nvmlshim
// (zz_generated_forwarders.c): one C definition for each NVML function that
// go-nvml's cgo code calls, with the function's ABI-level signature.
//
// Its inputs are the go-nvml module this build resolves (`go list -m`): the
// C calls its pkg/nvml Go sources make, and the prototypes of pkg/nvml/nvml.h,
// preprocessed with the define go-nvml compiles with. Parameter and return
// types are classified by the C compiler itself (a probe program that
// includes nvml.h and prints each type's class, size and signedness), so a
// typedef is never guessed from its name. Pointers and go-nvml's one-pointer
// handle structs become void *, integers
// and enums the C integer type of the same size and signedness; anything
// else (a struct or floating-point value, a function pointer) is an error,
// because forwarding it would need the real type.
//
// Run it with `make nvml-shim` (go generate) after changing go-nvml's
// version; nvmlshim's tests fail while the committed file is stale.
package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"
)

const module = "github.com/NVIDIA/go-nvml"

func main() {
	out := flag.String("o", "zz_generated_forwarders.c", "output file")
	flag.Parse()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	src, err := generate(ctx)
	if err == nil {
		err = os.WriteFile(*out, src, 0o644)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "nvmlshim gen:", err)
		os.Exit(1)
	}
}

// function is one NVML prototype, its types as written in nvml.h.
type function struct {
	name   string
	ret    string
	params []string // parameter types, names dropped; empty for (void)
}

// abiType is how the C compiler classifies a type.
type abiType struct {
	pointer bool
	size    int
	signed  bool
}

var (
	cCall    = regexp.MustCompile(`\bC\.(nvml\w+)\(`)
	protoRE  = regexp.MustCompile(`([A-Za-z_][\w ]*?\**)\s*\b(nvml\w+)\s*\(([^;()]*)\)\s*;`)
	spacesRE = regexp.MustCompile(`\s+`)
)

func generate(ctx context.Context) ([]byte, error) {
	dir, version, err := goNVML(ctx)
	if err != nil {
		return nil, err
	}
	pkg := filepath.Join(dir, "pkg", "nvml")
	called, err := calledFunctions(pkg)
	if err != nil {
		return nil, err
	}
	cc, err := goEnv(ctx, "CC")
	if err != nil {
		return nil, err
	}
	// go-nvml compiles nvml.h with this define; without it some names are
	// macros for their versioned forms.
	cflags := []string{"-DNVML_NO_UNVERSIONED_FUNC_DEFS=1", "-I", pkg}
	pre, err := run(ctx, cc, append(cflags, "-E", "-P", filepath.Join(pkg, "nvml.h"))...)
	if err != nil {
		return nil, err
	}
	text := spacesRE.ReplaceAllString(string(pre), " ")
	protos := map[string]function{}
	for _, m := range protoRE.FindAllStringSubmatch(text, -1) {
		f := function{name: m[2], ret: strings.Join(strings.Fields(strings.ReplaceAll(m[1], "*", " * ")), " ")}
		if p := strings.TrimSpace(m[3]); p != "void" && p != "" {
			for _, a := range strings.Split(p, ",") {
				f.params = append(f.params, paramType(a))
			}
		}
		protos[f.name] = f
	}
	var fns []function
	for _, name := range called {
		f, ok := protos[name]
		if !ok {
			return nil, fmt.Errorf("go-nvml calls C.%s, which has no plain prototype in nvml.h", name)
		}
		fns = append(fns, f)
	}
	types, consts, err := probe(ctx, cc, cflags, text, fns)
	if err != nil {
		return nil, err
	}
	return render(version, fns, types, consts)
}

// goNVML returns the directory and version of the go-nvml module in use.
func goNVML(ctx context.Context) (string, string, error) {
	out, err := run(ctx, "go", "list", "-m", "-f", "{{.Dir}} {{.Version}}", module)
	if err != nil {
		return "", "", err
	}
	dir, version, ok := strings.Cut(strings.TrimSpace(string(out)), " ")
	if !ok || dir == "" {
		return "", "", fmt.Errorf("go list -m %s: %q (run go mod download)", module, out)
	}
	return dir, version, nil
}

func goEnv(ctx context.Context, key string) (string, error) {
	out, err := run(ctx, "go", "env", key)
	if err != nil {
		return "", err
	}
	if v := strings.TrimSpace(string(out)); v != "" {
		return v, nil
	}
	return "cc", nil
}

// calledFunctions lists, sorted, the C.nvml* functions go-nvml's package
// calls: exactly the symbols its object file leaves undefined.
func calledFunctions(pkg string) ([]string, error) {
	files, err := filepath.Glob(filepath.Join(pkg, "*.go"))
	if err != nil {
		return nil, fmt.Errorf("list %s: %w", pkg, err)
	}
	seen := map[string]bool{}
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		b, err := os.ReadFile(f)
		if err != nil {
			return nil, fmt.Errorf("read go-nvml source: %w", err)
		}
		for _, m := range cCall.FindAllSubmatch(b, -1) {
			seen[string(m[1])] = true
		}
	}
	if len(seen) == 0 {
		return nil, fmt.Errorf("no C.nvml* calls in %s", pkg)
	}
	names := make([]string, 0, len(seen))
	for n := range seen {
		names = append(names, n)
	}
	slices.Sort(names)
	return names, nil
}

// paramType drops a parameter's name: "const char *pciBusId" -> "const
// char *", "nvmlDevice_t device" -> "nvmlDevice_t".
func paramType(decl string) string {
	decl = strings.ReplaceAll(strings.TrimSpace(decl), "*", " * ")
	toks := strings.Fields(decl)
	if len(toks) > 1 && toks[len(toks)-1] != "*" && !isTypeWord(toks[len(toks)-1]) {
		toks = toks[:len(toks)-1]
	}
	return strings.Join(toks, " ")
}

func isTypeWord(s string) bool {
	switch s {
	case "int", "char", "short", "long", "unsigned", "signed", "float", "double":
		return true
	}
	return strings.HasSuffix(s, "_t")
}

// probe compiles and runs a program that includes nvml.h and prints how the
// compiler sees each scalar type, and the two NVML error codes the
// forwarders return when NVML or the function is absent.
func probe(ctx context.Context, cc string, cflags []string, pre string, fns []function) (map[string]abiType, [2]int, error) {
	var consts [2]int
	seen := map[string]bool{}
	var names []string
	for _, f := range fns {
		for _, t := range append([]string{f.ret}, f.params...) {
			if !strings.Contains(t, "*") && !strings.Contains(t, "[") && !seen[t] {
				seen[t] = true
				names = append(names, t)
			}
		}
	}
	var c bytes.Buffer
	c.WriteString("#include <stdio.h>\n#include \"nvml.h\"\n")
	c.WriteString("#define P(T) { static T v; printf(\"%d %d %d\\n\", __builtin_classify_type(v), (int)sizeof(v), " +
		"_Generic(v, signed char: 1, short: 1, int: 1, long: 1, long long: 1, default: 0)); }\n")
	c.WriteString("int main(void) {\n\tprintf(\"%d %d\\n\", (int)NVML_ERROR_LIBRARY_NOT_FOUND, (int)NVML_ERROR_FUNCTION_NOT_FOUND);\n")
	for _, n := range names {
		fmt.Fprintf(&c, "\tP(%s);\n", n)
	}
	c.WriteString("\treturn 0;\n}\n")
	dir, err := os.MkdirTemp("", "nvmlshim-probe")
	if err != nil {
		return nil, consts, fmt.Errorf("probe dir: %w", err)
	}
	defer os.RemoveAll(dir)
	if err := os.WriteFile(filepath.Join(dir, "probe.c"), c.Bytes(), 0o644); err != nil {
		return nil, consts, fmt.Errorf("write probe: %w", err)
	}
	exe := filepath.Join(dir, "probe")
	if _, err := run(ctx, cc, append(cflags, "-w", "-o", exe, filepath.Join(dir, "probe.c"))...); err != nil {
		return nil, consts, fmt.Errorf("a type cannot be classified (a struct or union passed by value?): %w", err)
	}
	out, err := run(ctx, exe)
	if err != nil {
		return nil, consts, err
	}
	sc := bufio.NewScanner(bytes.NewReader(out))
	if !sc.Scan() {
		return nil, consts, errors.New("probe printed nothing")
	}
	if _, err := fmt.Sscan(sc.Text(), &consts[0], &consts[1]); err != nil {
		return nil, consts, fmt.Errorf("probe: error codes %q: %w", sc.Text(), err)
	}
	types := map[string]abiType{}
	for _, n := range names {
		if !sc.Scan() {
			return nil, consts, fmt.Errorf("probe: no line for %s", n)
		}
		var class, size, signed int
		if _, err := fmt.Sscan(sc.Text(), &class, &size, &signed); err != nil {
			return nil, consts, fmt.Errorf("probe: %s: %q: %w", n, sc.Text(), err)
		}
		// GCC's type classes (typeclass.h), which clang shares.
		switch class {
		case 5: // pointer
			types[n] = abiType{pointer: true}
		case 1, 2, 3, 4: // integer, char, enum, boolean
			types[n] = abiType{size: size, signed: signed == 1}
		case 12: // record: go-nvml's handle types
			if size != 8 || !handleStruct(pre, n) {
				return nil, consts, fmt.Errorf("%s is a %d-byte struct passed by value: only one-pointer handle structs are forwarded", n, size)
			}
			types[n] = abiType{pointer: true}
		default:
			return nil, consts, fmt.Errorf("%s has type class %d: only integers, enums and pointers are forwarded", n, class)
		}
	}
	return types, consts, nil
}

// handleStruct reports whether nvml.h defines name as a struct of one
// pointer. go-nvml declares the handles (nvmlDevice_t, ...) so, where
// NVIDIA's header has the bare pointer; the x86-64 SysV and AAPCS64 calling
// conventions pass and return such a struct exactly as the pointer, which
// go-nvml itself relies on, so the forwarder declares it void *.
func handleStruct(pre, name string) bool {
	re := regexp.MustCompile(`typedef struct (\w+ )?\{ ?struct \w+ ?\* ?\w+ ?; ?\} ?` + regexp.QuoteMeta(name) + ` ?;`)
	return re.MatchString(pre)
}

// cType is the ABI-level C spelling of an nvml.h type.
func cType(t string, types map[string]abiType) (string, error) {
	if strings.Contains(t, "*") || strings.Contains(t, "[") {
		return "void *", nil
	}
	a := types[t]
	if a.pointer {
		return "void *", nil
	}
	base := map[int]string{1: "char", 2: "short", 4: "int", 8: "long long"}[a.size]
	if base == "" {
		return "", fmt.Errorf("%s is a %d-byte integer", t, a.size)
	}
	if a.signed {
		return "signed " + base, nil
	}
	return "unsigned " + base, nil
}

func render(version string, fns []function, types map[string]abiType, consts [2]int) ([]byte, error) {
	var b bytes.Buffer
	fmt.Fprintf(&b, "// Code generated by nvmlshim/gen from %s %s (pkg/nvml/nvml.h); DO NOT EDIT.\n", module, version)
	b.WriteString("// Regenerate with `make nvml-shim`.\n\n#include \"forward.h\"\n\n")
	fmt.Fprintf(&b, "// NVML_ERROR_LIBRARY_NOT_FOUND and NVML_ERROR_FUNCTION_NOT_FOUND.\n#define PF_NVML_NO_LIBRARY %d\n#define PF_NVML_NO_FUNCTION %d\n\n", consts[0], consts[1])
	for _, f := range fns {
		var params, args []string
		for i, p := range f.params {
			t, err := cType(p, types)
			if err != nil {
				return nil, fmt.Errorf("%s parameter %d: %w", f.name, i, err)
			}
			arg := "a" + strconv.Itoa(i)
			if strings.HasSuffix(t, "*") {
				params = append(params, t+arg)
			} else {
				params = append(params, t+" "+arg)
			}
			args = append(args, arg)
		}
		if len(params) == 0 {
			params = []string{"void"}
		}
		ret, err := cType(f.ret, types)
		if err != nil {
			return nil, fmt.Errorf("%s result: %w", f.name, err)
		}
		absent, missing := "PF_NVML_NO_LIBRARY", "PF_NVML_NO_FUNCTION"
		if ret == "void *" {
			if f.ret != "const char *" {
				return nil, fmt.Errorf("%s returns %s: only const char * results are forwarded", f.name, f.ret)
			}
			// nvmlErrorString: go-nvml reads the result as a C string.
			ret, absent, missing = "const char *", `"NVML is not loaded"`, `"NVML lacks nvmlErrorString"`
		}
		fmt.Fprintf(&b, "PF_NVML_FORWARD(%s, %s, (%s), (%s), %s, %s)\n", ret, f.name,
			strings.Join(params, ", "), strings.Join(args, ", "), absent, missing)
	}
	return b.Bytes(), nil
}

func run(ctx context.Context, name string, args ...string) ([]byte, error) {
	var stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return out, nil
}
