package cli

import (
	"flag"
	"io"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestParseBytes(t *testing.T) {
	cases := []struct {
		in      string
		want    uint64
		wantErr bool
	}{
		{"4096", 4096, false},
		{"64k", 64 << 10, false},
		{"512MiB", 512 << 20, false},
		{"8GiB", 8 << 30, false},
		{"1.5GB", 1_500_000_000, false},
		{"", 0, true},
		{"GiB", 0, true},
		{"12 parsecs", 0, true},
		{"-1GiB", 0, true},
		{"99999999999TiB", 0, true},
	}
	for _, tc := range cases {
		t.Run(tc.in, func(t *testing.T) {
			got, err := ParseBytes(tc.in)
			if tc.wantErr {
				require.Error(t, err)
				return
			}
			require.NoError(t, err)
			require.Equal(t, tc.want, got)
		})
	}
}

func TestFormatBytes(t *testing.T) {
	require.Equal(t, "512B", FormatBytes(512))
	require.Equal(t, "8GiB", FormatBytes(8<<30))
	require.Equal(t, "1.5KiB", FormatBytes(1536))
}

func TestParseEnvFallback(t *testing.T) {
	env := map[string]string{
		"PEGAFLOW_POOL_SIZE": "1GiB",
		"PEGAFLOW_SOCKET":    "/from/env",
		"PEGAFLOW_PREFILL":   "http://a, http://b",
	}
	lookup := func(k string) (string, bool) { v, ok := env[k]; return v, ok }
	fs := flag.NewFlagSet("t", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	var size ByteSize = 1 << 20
	var prefill StringList
	socket := fs.String("socket", "/default", "")
	fs.Var(&size, "pool-size", "")
	fs.Var(&prefill, "prefill", "")
	require.NoError(t, Parse(fs, []string{"--socket", "/from/flag"}, lookup))
	require.Equal(t, "/from/flag", *socket, "command line wins over env")
	require.Equal(t, ByteSize(1<<30), size)
	require.Equal(t, StringList{"http://a", "http://b"}, prefill)

	env["PEGAFLOW_POOL_SIZE"] = "lots"
	fs2 := flag.NewFlagSet("t", flag.ContinueOnError)
	fs2.Var(&size, "pool-size", "")
	require.ErrorContains(t, Parse(fs2, nil, lookup), "PEGAFLOW_POOL_SIZE")
}
