package sim

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// A chat's next turn (the previous prompt, its answer and a new message)
// sent without kv_transfer_params, as a P/D bypass or an aggregated
// instance gets it, loads from its engine every block the previous turn
// sealed, the answer's included, when the roles save and load as vLLM's
// connector does in them; with the P/D legs alone (role "") it loads
// nothing.
func TestKVRoleMultiTurnReusesTheAnswer(t *testing.T) {
	for _, tc := range []struct {
		name         string
		first, next  string
		wantSaved    float64 // blocks the first turn's sim saves
		wantCached   int     // tokens the next turn loads
		wantComputed float64 // prompt tokens the next turn computes
	}{
		{"legs alone", "", "", 0, 0, 20},
		{"kv_both", KVBoth, KVBoth, 4, 16, 4},
		{"producer then consumer", KVProducer, KVConsumer, 4, 16, 4},
		{"consumer saves nothing", KVConsumer, KVBoth, 0, 0, 20},
	} {
		t.Run(tc.name, func(t *testing.T) {
			env := startEngine(t)
			a := env.startSim(t, "sim-a", func(c *Config) { c.KVRole = tc.first })
			b := env.startSim(t, "sim-b", func(c *Config) { c.KVRole = tc.next })
			// Block size 4: the first prompt is 11 tokens ([system] 5
			// words [user] 3 words [assistant]); with 6 generated tokens
			// 16 hold KV (the last is never fed back): 4 blocks.
			msgs := []map[string]any{
				{"role": "system", "content": "s1 s2 s3 s4 s5"},
				{"role": "user", "content": "u1 u2 u3"},
			}
			code, first := post(t, a.url+"/v1/chat/completions", map[string]any{"messages": msgs, "max_tokens": 6, "seed": 3})
			require.Equal(t, 200, code)
			if tc.wantSaved > 0 {
				require.Eventually(t, func() bool { return metricValue(t, a.reg, "sim_kv_blocks_saved_total") == tc.wantSaved },
					10*time.Second, 5*time.Millisecond, "the first turn's blocks are saved")
			}
			msgs = append(msgs, map[string]any{"role": "assistant", "content": completionText(t, first)},
				map[string]any{"role": "user", "content": "v1"})
			code, next := post(t, b.url+"/v1/chat/completions", map[string]any{"messages": msgs, "max_tokens": 2, "seed": 3})
			require.Equal(t, 200, code)
			u := next["usage"].(map[string]any)
			require.EqualValues(t, 20, u["prompt_tokens"])
			if tc.wantCached == 0 {
				require.Nil(t, u["prompt_tokens_details"])
			} else {
				require.EqualValues(t, tc.wantCached, u["prompt_tokens_details"].(map[string]any)["cached_tokens"])
			}
			require.EqualValues(t, tc.wantCached, metricValue(t, b.reg, "sim_kv_prefix_hit_tokens_total"))
			require.Equal(t, tc.wantComputed, metricValue(t, b.reg, "sim_prefill_tokens_computed_total"))
			require.Zero(t, metricValue(t, b.reg, "sim_kv_verify_failures_total"))
		})
	}
}

func TestKVRoleValidated(t *testing.T) {
	cfg := fastConfig()
	cfg.KVRole = "kv_everything"
	require.ErrorContains(t, cfg.Validate(), "kv role")
}
