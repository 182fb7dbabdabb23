package router

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// Tests of the router's HTTP port against hostile input (issue 12, items
// 8-11): each one failed on the code before its fix.

// postCtx posts body and returns the status and the body, failing the
// test when ctx ends first.
func postCtx(t *testing.T, ctx context.Context, url, body string) (int, string) {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, strings.NewReader(body))
	require.NoError(t, err)
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err, "no answer before the deadline")
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return resp.StatusCode, string(data)
}

// nestedPrompt is a body whose prompt is depth nested arrays around a
// string padded to about size bytes: the shape that made the old
// recursive check re-scan the rest of the body at every level.
func nestedPrompt(depth, size int) string {
	pad := max(size-2*depth-40, 1)
	return `{"model":"m","prompt":` + strings.Repeat("[", depth) + `"` + strings.Repeat("x", pad) + `"` +
		strings.Repeat("]", depth) + `}`
}

// A deeply nested prompt is answered 400 in the OpenAI shape at once: the
// check is one linear pass, not a recursion that re-parses every level
// (the old code took about a second per 20 KB level-scan and minutes for
// the 1 MB body, so the deadline below was never met).
func TestNestedPromptRejectedInLinearTime(t *testing.T) {
	h := startRouter(t, []*fakeVLLM{newFake(nil)}, []*fakeVLLM{newFake(nil)}, nil, nil)
	cases := []struct{ name, path, body string }{
		{"20KB of [[[[", "/v1/completions", `{"model":"m","prompt":` + strings.Repeat("[", 9_990) + strings.Repeat("]", 9_990) + `}`},
		{"1MB, 9000 levels", "/v1/completions", nestedPrompt(9000, 1<<20)},
		{"1MB of [[[[ past the JSON depth limit", "/v1/completions", `{"model":"m","prompt":` + strings.Repeat("[", 1<<19) + strings.Repeat("]", 1<<19) + `}`},
		{"nested messages", "/v1/chat/completions", `{"model":"m","messages":` + strings.Repeat("[", 9000) + strings.Repeat("]", 9000) + `}`},
		{"[[\"s\"]] is no OpenAI shape", "/v1/completions", `{"model":"m","prompt":[["s"]]}`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			status, answer := postCtx(t, ctx, h.url+tc.path, tc.body)
			require.Equal(t, http.StatusBadRequest, status, answer)
			var e struct {
				Error struct{ Message, Type string } `json:"error"`
			}
			require.NoError(t, json.Unmarshal([]byte(answer), &e), answer)
			require.Equal(t, "invalid_request_error", e.Error.Type)
			require.NotEmpty(t, e.Error.Message)
		})
	}
}

// BenchmarkCheckPromptNested shows the work per byte stays flat however
// deep the nesting (ns/op grows linearly with the body, not with its
// square).
func BenchmarkCheckPromptNested(b *testing.B) {
	for _, size := range []int{20 << 10, 1 << 20} {
		body := []byte(nestedPrompt(9000, size))
		b.Run(byteSizeFlag{p: ptr(int64(size))}.String(), func(b *testing.B) {
			b.SetBytes(int64(len(body)))
			for b.Loop() {
				if _, err := parseRequest(body, false); err == nil {
					b.Fatal("nested prompt accepted")
				}
			}
		})
	}
}

func ptr[T any](v T) *T { return &v }
