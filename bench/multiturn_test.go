package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// chatServer answers every chat with a text naming the conversation's
// length and its last message, and usage that reports as cached every
// prompt token but the last message's words; fail makes a request whose
// last message starts with it fail with HTTP 500.
type chatServer struct {
	*httptest.Server
	mu     sync.Mutex
	bodies [][]ChatMessage
	fail   string
}

func newChatServer(t *testing.T) *chatServer {
	s := &chatServer{}
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var body struct {
			Messages []ChatMessage `json:"messages"`
		}
		require.NoError(t, json.NewDecoder(r.Body).Decode(&body))
		s.mu.Lock()
		s.bodies = append(s.bodies, body.Messages)
		s.mu.Unlock()
		last := body.Messages[len(body.Messages)-1].Content
		if s.fail != "" && strings.HasPrefix(last, s.fail) {
			http.Error(w, `{"error":{"message":"boom"}}`, http.StatusInternalServerError)
			return
		}
		prompt := nominalLen(body.Messages)
		cached := prompt - len(strings.Fields(last)) - 2
		answer := fmt.Sprintf("answer-%d to %s", len(body.Messages), strings.Fields(last)[0])
		w.Header().Set("Content-Type", "text/event-stream")
		fmt.Fprintf(w, "data: {\"choices\":[{\"delta\":{\"content\":%q}}]}\n\n", answer)
		fmt.Fprintf(w, "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":%d,\"completion_tokens\":3,\"prompt_tokens_details\":{\"cached_tokens\":%d}}}\n\n", prompt, cached)
		fmt.Fprint(w, "data: [DONE]\n\n")
	}))
	t.Cleanup(s.Close)
	return s
}

func multiTurnConfig(base string) Config {
	cfg := DefaultConfig()
	cfg.BaseURL, cfg.Endpoint, cfg.Model = base, EndpointChat, "m"
	cfg.Users, cfg.Turns, cfg.SystemPromptLen, cfg.InputLen, cfg.OutputLen = 3, 4, 20, 5, 3
	cfg.ThinkTime = time.Millisecond
	cfg.Seed = 7
	return cfg
}

// Each turn sends the conversation so far: the shared system prompt, the
// previous user messages and the server's answers, and a new message.
func TestMultiTurnFeedsAnswersBack(t *testing.T) {
	s := newChatServer(t)
	cfg := multiTurnConfig(s.URL)
	res, err := Run(context.Background(), cfg, nil)
	require.NoError(t, err)
	require.Equal(t, 12, res.NumPrompts)
	require.Equal(t, 12, res.Completed)
	require.Zero(t, res.NotSent)

	system := s.bodies[0][0]
	require.Equal(t, "system", system.Role)
	require.Len(t, strings.Fields(system.Content), 20)
	for _, msgs := range s.bodies {
		require.Equal(t, system, msgs[0], "every conversation shares the system prompt")
		require.Equal(t, 0, len(msgs)%2, "system, then user/assistant pairs, then a user message")
		for i := 1; i < len(msgs); i++ {
			want := "user"
			if i%2 == 0 {
				want = "assistant"
				require.Equal(t, fmt.Sprintf("answer-%d to %s", i, strings.Fields(msgs[i-1].Content)[0]), msgs[i].Content,
					"the answer to the previous turn, as the server gave it")
			}
			require.Equal(t, want, msgs[i].Role)
		}
	}
	perUser := map[int][]Record{}
	for _, r := range res.Records {
		perUser[r.User] = append(perUser[r.User], r)
	}
	require.Len(t, perUser, 3)
	for _, recs := range perUser {
		for i, r := range recs {
			require.Equal(t, i+1, r.Turn)
			require.Equal(t, 22+10*i+6, r.PromptTokens, "system (marker and 20 words), a pair of 6 and 4 per turn before, the new message, the generation prompt")
		}
	}
	require.Len(t, res.Turns, 4)
	for i, ts := range res.Turns {
		require.Equal(t, i+1, ts.Turn)
		require.Equal(t, 3, ts.Requests)
		require.Equal(t, 3*(ts.PromptTokens/3-7), ts.CachedTokens)
	}
	require.Equal(t, 9, res.FollowUps.Requests)
	require.Equal(t, res.Turns[1].CachedTokens+res.Turns[2].CachedTokens+res.Turns[3].CachedTokens, res.FollowUps.CachedTokens)
	require.InDelta(t, float64(res.FollowUps.CachedTokens)/float64(res.FollowUps.PromptTokens), res.FollowUps.CachedRatio(), 1e-9)

	var table strings.Builder
	require.NoError(t, res.WriteTable(&table))
	require.Contains(t, table.String(), "turns >= 2")
	var js strings.Builder
	require.NoError(t, res.WriteJSON(&js))
	require.Contains(t, js.String(), `"follow_ups"`)
	require.Contains(t, js.String(), `"turn": 4`)
}

// The same seed sends the same requests; another seed other ones.
func TestMultiTurnSameSeedSameWorkload(t *testing.T) {
	sent := func(seed int64) []string {
		s := newChatServer(t)
		cfg := multiTurnConfig(s.URL)
		cfg.Seed = seed
		_, err := Run(context.Background(), cfg, nil)
		require.NoError(t, err)
		var out []string
		for _, b := range s.bodies {
			j, _ := json.Marshal(b)
			out = append(out, string(j))
		}
		sort.Strings(out)
		return out
	}
	a := sent(7)
	require.Equal(t, a, sent(7))
	require.NotEqual(t, a, sent(8))
}

// A failed turn ends its conversation: the turns after it are not sent,
// and counted.
func TestMultiTurnFailureCutsTheConversation(t *testing.T) {
	s := newChatServer(t)
	cfg := multiTurnConfig(s.URL)
	cfg.Users = 1
	_, convs := plan(&cfg)
	s.fail = convs[0].messages[1] // the second turn fails
	res, err := Run(context.Background(), cfg, nil)
	require.NoError(t, err)
	require.Equal(t, 1, res.Completed)
	require.Equal(t, 1, res.Failed)
	require.Equal(t, 2, res.NotSent)
	require.Len(t, s.bodies, 2)
}

func TestMultiTurnValidate(t *testing.T) {
	for _, tc := range []struct {
		name   string
		mutate func(*Config)
		want   string
	}{
		{"completions endpoint", func(c *Config) { c.Endpoint = EndpointCompletions }, "use --endpoint"},
		{"no turns", func(c *Config) { c.Turns = 0 }, "turns"},
		{"too many users", func(c *Config) { c.Users = maxUsers + 1 }, "users"},
		{"negative system prompt", func(c *Config) { c.SystemPromptLen = -1 }, "system prompt"},
		{"huge system prompt", func(c *Config) { c.SystemPromptLen = maxWords + 1 }, "system prompt"},
		{"negative think time", func(c *Config) { c.ThinkTime = -time.Second }, "think time"},
		{"prompt list", func(c *Config) { c.Prompts = []Prompt{{Text: "x"}} }, "prompt list"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := multiTurnConfig("http://127.0.0.1:1")
			tc.mutate(&cfg)
			require.ErrorContains(t, cfg.Validate(), tc.want)
		})
	}
}
