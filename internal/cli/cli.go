// Package cli holds the flag conventions shared by every pegaflow
// subcommand: each flag may also be set by a PEGAFLOW_* environment variable,
// list flags repeat, and sizes accept binary units.
package cli

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"strconv"
	"strings"
	"unicode"
)

// ExitUsage is the exit code for command-line errors.
const ExitUsage = 2

// EnvName returns the environment variable that sets flag name, e.g.
// "pool-size" -> "PEGAFLOW_POOL_SIZE".
func EnvName(flagName string) string {
	return "PEGAFLOW_" + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

// Parse parses args into fs, then fills every flag not given on the command
// line from its PEGAFLOW_* environment variable (lookup is os.LookupEnv when
// nil). Command-line values win over the environment.
func Parse(fs *flag.FlagSet, args []string, lookup func(string) (string, bool)) error {
	if lookup == nil {
		lookup = os.LookupEnv
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	given := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { given[f.Name] = true })
	var errs []error
	fs.VisitAll(func(f *flag.Flag) {
		if given[f.Name] {
			return
		}
		v, ok := lookup(EnvName(f.Name))
		if !ok {
			return
		}
		if list, isList := f.Value.(*StringList); isList {
			*list = nil
			for _, item := range strings.Split(v, ",") {
				if item = strings.TrimSpace(item); item != "" {
					*list = append(*list, item)
				}
			}
			return
		}
		if err := f.Value.Set(v); err != nil {
			errs = append(errs, fmt.Errorf("%s=%q: %w", EnvName(f.Name), v, err))
		}
	})
	return errors.Join(errs...)
}

// StringList is a repeatable string flag. From the environment it takes a
// comma-separated list.
type StringList []string

func (l *StringList) String() string { return strings.Join(*l, ",") }

// Set appends one value.
func (l *StringList) Set(v string) error {
	if v == "" {
		return errors.New("empty value")
	}
	*l = append(*l, v)
	return nil
}

// ByteSize is a flag holding a byte count written like 512MiB, 8GiB, 1.5GB,
// 4096 or 64k.
type ByteSize uint64

func (b *ByteSize) String() string { return FormatBytes(uint64(*b)) }

// Set parses a size.
func (b *ByteSize) Set(v string) error {
	n, err := ParseBytes(v)
	if err != nil {
		return err
	}
	*b = ByteSize(n)
	return nil
}

var byteUnits = map[string]float64{
	"": 1, "b": 1,
	"k": 1 << 10, "kb": 1e3, "kib": 1 << 10,
	"m": 1 << 20, "mb": 1e6, "mib": 1 << 20,
	"g": 1 << 30, "gb": 1e9, "gib": 1 << 30,
	"t": 1 << 40, "tb": 1e12, "tib": 1 << 40,
}

// ParseBytes parses a human byte size. Bare k/m/g/t are binary units.
func ParseBytes(v string) (uint64, error) {
	s := strings.TrimSpace(v)
	i := strings.IndexFunc(s, func(r rune) bool { return !(unicode.IsDigit(r) || r == '.') })
	num, unit := s, ""
	if i >= 0 {
		num, unit = s[:i], strings.ToLower(strings.TrimSpace(s[i:]))
	}
	mult, ok := byteUnits[unit]
	if !ok || num == "" {
		return 0, fmt.Errorf("invalid size %q (want e.g. 512MiB, 8GiB)", v)
	}
	f, err := strconv.ParseFloat(num, 64)
	if err != nil || f < 0 {
		return 0, fmt.Errorf("invalid size %q (want e.g. 512MiB, 8GiB)", v)
	}
	total := f * mult
	if total >= 1<<64 {
		return 0, fmt.Errorf("size %q overflows", v)
	}
	return uint64(total), nil
}

// FormatBytes renders n with a binary unit.
func FormatBytes(n uint64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%dB", n)
	}
	div, exp := uint64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	v := float64(n) / float64(div)
	s := strconv.FormatFloat(v, 'f', 2, 64)
	s = strings.TrimRight(strings.TrimRight(s, "0"), ".")
	return s + string("KMGTPE"[exp]) + "iB"
}
