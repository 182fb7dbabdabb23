package router

import (
	"os/exec"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// TestOpenAISDKThroughRouter streams a chat with the official OpenAI Python
// SDK through the router and directly to D: the text must be the same.
// CI installs the SDK (scripts/requirements-test.txt).
func TestOpenAISDKThroughRouter(t *testing.T) {
	if err := exec.Command("python3", "-c", "import openai").Run(); err != nil {
		t.Skip("python3 with the openai package is not installed (pip install openai)")
	}
	p, d := newFake(nil), newFake(nil)
	h := startRouter(t, []*fakeVLLM{p}, []*fakeVLLM{d}, nil, nil)
	run := func(base string) string {
		out, err := exec.Command("python3", "testdata/sdk_stream.py", base).CombinedOutput()
		require.NoError(t, err, string(out))
		return string(out)
	}
	viaRouter := run(h.url)
	direct := run(strings.TrimRight(d.srv.URL, "/"))
	require.Equal(t, "Hello, world!", viaRouter)
	require.Equal(t, direct, viaRouter)
	require.Len(t, p.requests(), 1, "the SDK request went through prefill")
}
