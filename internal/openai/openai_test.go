package openai

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestErrorMessage(t *testing.T) {
	for _, tc := range []struct {
		name, body, want string
	}{
		{"OpenAI shape", `{"error":{"message":"CUDA out of memory","code":500}}`, "CUDA out of memory"},
		{"string error", `{"error":"no such model"}`, "no such model"},
		{"top-level message", `{"message":"overloaded"}`, "overloaded"},
		{"FastAPI detail string", `{"detail":"bad prompt"}`, "bad prompt"},
		{"FastAPI detail list", `{"detail":[{"msg":"field required"}]}`, `[{"msg":"field required"}]`},
		{"error object without message falls through", `{"error":{"code":1},"message":"outer"}`, "outer"},
		{"plain text", "overloaded\n", "overloaded"},
		{"surrounding space", "  \n{\"error\":\"x\"}\n", "x"},
		{"empty", "", ""},
		{"blank", " \n\t", ""},
		{"html", "<html>bad gateway</html>", ""},
		{"malformed JSON", `{"error":`, ""},
		{"JSON without a message", `{"status":"bad"}`, ""},
		{"not UTF-8", "\xff\xfe", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			require.Equal(t, tc.want, ErrorMessage([]byte(tc.body)))
		})
	}
}

func TestErrorMessageTruncates(t *testing.T) {
	for _, tc := range []struct {
		name, body string
	}{
		{"plain text", strings.Repeat("é", 600)},
		{"OpenAI shape", `{"error":{"message":"` + strings.Repeat("é", 600) + `"}}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			long := ErrorMessage([]byte(tc.body))
			require.LessOrEqual(t, len(long), MaxMessageLen+3)
			require.True(t, strings.HasSuffix(long, "..."))
			require.True(t, strings.HasPrefix(long, "é"))
			require.True(t, strings.HasSuffix(strings.TrimSuffix(long, "..."), "é"), "cut on a rune boundary")
		})
	}
	exact := strings.Repeat("a", MaxMessageLen)
	require.Equal(t, exact, ErrorMessage([]byte(exact)))
}

func TestErrorBody(t *testing.T) {
	data, err := json.Marshal(ErrorBody("no healthy decode backend", "service_unavailable", 503))
	require.NoError(t, err)
	require.JSONEq(t, `{"error":{"message":"no healthy decode backend","type":"service_unavailable","code":503}}`, string(data))
	require.Equal(t, "no healthy decode backend", ErrorMessage(data), "ErrorMessage reads what ErrorBody writes")
}
