package sim

import (
	"bytes"
	"net/http"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// POST /tokenize answers vLLM's shape with the ids the sim's own
// completions and chat completions see, and refuses what vLLM refuses.
func TestTokenize(t *testing.T) {
	r := startSim(t, fastConfig())
	tok := r.sim.tok
	msgs := []any{map[string]any{"role": "system", "content": "be brief"}, map[string]any{"role": "user", "content": []any{map[string]any{"type": "text", "text": "hello"}}}}
	chat := []uint32{tokSystem, tok.Word("be"), tok.Word("brief"), tokUser, tok.Word("hello")}
	for _, tc := range []struct {
		name string
		body map[string]any
		want []uint32
		strs []any
	}{
		{"prompt", map[string]any{"prompt": "a b  c", "add_special_tokens": true}, tok.Encode("a b c"), nil},
		{"empty prompt", map[string]any{"prompt": ""}, []uint32{}, nil},
		{"chat", map[string]any{"model": "pegaflow-sim", "messages": msgs}, append(chat, tokAssistant), nil},
		{"no generation prompt", map[string]any{"messages": msgs, "add_generation_prompt": false}, chat, nil},
		{"continue final message", map[string]any{"messages": msgs, "continue_final_message": true}, chat, nil},
		{"token strs", map[string]any{"messages": msgs[1:], "return_token_strs": true}, []uint32{tokUser, tok.Word("hello"), tokAssistant},
			[]any{"<|user|>", "hello", "<|assistant|>"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, out := post(t, r.url+"/tokenize", tc.body)
			require.Equal(t, 200, code, "%v", out)
			got := make([]uint32, 0)
			for _, v := range out["tokens"].([]any) {
				got = append(got, uint32(v.(float64)))
			}
			require.Equal(t, tc.want, got)
			require.EqualValues(t, len(tc.want), out["count"])
			require.EqualValues(t, 512, out["max_model_len"])
			require.Contains(t, out, "token_strs")
			if tc.strs == nil {
				require.Nil(t, out["token_strs"])
			} else {
				require.Equal(t, tc.strs, out["token_strs"])
			}
		})
	}

	// The chat ids are the prompt a chat completion computes.
	code, out := post(t, r.url+"/v1/chat/completions", map[string]any{"messages": msgs, "max_tokens": 1})
	require.Equal(t, 200, code)
	require.EqualValues(t, len(chat)+1, out["usage"].(map[string]any)["prompt_tokens"])
	code, out = post(t, r.url+"/v1/chat/completions", map[string]any{"messages": msgs, "max_tokens": 1, "add_generation_prompt": false})
	require.Equal(t, 200, code)
	require.EqualValues(t, len(chat), out["usage"].(map[string]any)["prompt_tokens"])
}

func TestTokenizeRefuses(t *testing.T) {
	r := startSim(t, fastConfig())
	for _, tc := range []struct {
		name string
		body string
		code int
		msg  string
	}{
		{"not JSON", `{"prompt":`, 400, "invalid JSON"},
		{"prompt not a string", `{"prompt":[1,2]}`, 400, "invalid JSON"},
		{"neither", `{}`, 400, "messages is missing"},
		{"both", `{"prompt":"a","messages":[{"role":"user","content":"x"}]}`, 400, "not both"},
		{"unknown role", `{"messages":[{"role":"wizard","content":"x"}]}`, 400, "unknown role"},
		{"image", `{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}]}`, 400, "only text"},
		{"both switches", `{"messages":[{"role":"user","content":"x"}],"add_generation_prompt":true,"continue_final_message":true}`, 400, "Cannot set both"},
		{"other model", `{"model":"gpt-9","prompt":"a"}`, 404, "does not exist"},
		{"too large", `{"prompt":"` + strings.Repeat("a ", maxBodyBytes/2+1) + `"}`, 413, "request body over"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, err := http.Post(r.url+"/tokenize", "application/json", bytes.NewReader([]byte(tc.body)))
			require.NoError(t, err)
			defer resp.Body.Close()
			require.Equal(t, tc.code, resp.StatusCode)
			var buf bytes.Buffer
			_, _ = buf.ReadFrom(resp.Body)
			require.Contains(t, buf.String(), tc.msg)
			require.Contains(t, buf.String(), `"error"`)
		})
	}
}
