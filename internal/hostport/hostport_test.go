package hostport

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestCheck(t *testing.T) {
	for _, tc := range []struct {
		in, err string // err: "" accepted, else a part of the message
	}{
		{"engine-a:7400", ""},
		{"10.0.0.7:7400", ""},
		{"[fd00::7]:7400", ""},
		{"my_host.svc.cluster.local:1", ""},
		{"a:65535", ""},
		{"nonsense", "want host:port"},
		{"10.0.0.7", "want host:port"},
		{"fd00::7:7400", "want host:port"},
		{":7400", "the host is empty"},
		{"a:0", "want 1..65535"},
		{"a:65536", "want 1..65535"},
		{"a:+1", "want 1..65535"},
		{"a:http", "want 1..65535"},
		{"a b:1", "want a DNS name"},
		{"a/b:1", "want a DNS name"},
		{"a@b:1", "want a DNS name"},
		{"a%0d%0a:1", "want a DNS name"},
		{strings.Repeat("a", MaxLen-1) + ":1", "longer than"},
	} {
		t.Run(tc.in, func(t *testing.T) {
			err := Check(tc.in)
			if tc.err == "" {
				require.NoError(t, err)
				return
			}
			require.ErrorContains(t, err, tc.err)
		})
	}
}

func TestCanonicalPort(t *testing.T) {
	for p, ok := range map[string]bool{"1": true, "7400": true, "65535": true, "0": false, "65536": false,
		"07400": false, "+1": false, "-1": false, "http": false, "": false} {
		require.Equal(t, ok, CanonicalPort(p), p)
	}
}
