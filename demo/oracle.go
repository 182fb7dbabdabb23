package demo

import (
	"hash/fnv"
	"sort"
	"time"

	"github.com/pegaflow/pegaflow/bench"
	"github.com/pegaflow/pegaflow/sim"
)

// oracleHitRatio is the hit ratio of a router that knows every host's
// content and may send each request anywhere: each request loads the
// longest prefix of full blocks that any request finished before it was
// sent left behind (its prompt and answer, as a kv_both sim saves them),
// at most the blocks before its last token (vLLM recomputes that one).
// No eviction, no load: an upper bound no policy can beat on the run's
// requests. Tokens are the sim's (vocabSize, blockSize: the demo's sims).
func oracleHitRatio(res *bench.Result, vocabSize, blockSize int) float64 {
	tok, err := sim.NewTokenizer(vocabSize)
	if err != nil || res == nil {
		return 0
	}
	type req struct {
		sent, done time.Duration
		tokens     []uint32 // prompt, then answer
		prompt     int      // prompt tokens
		sealed     int      // tokens whose KV is saved: the prompt and the answer but its last
	}
	var reqs []req
	for _, r := range res.Records {
		if !r.OK() || r.Messages == nil {
			continue
		}
		msgs := make([]sim.Message, len(r.Messages))
		for i, m := range r.Messages {
			msgs[i] = sim.Message{Role: m.Role, Content: m.Content}
		}
		p, err := tok.ApplyChatTemplate(msgs, true)
		if err != nil {
			continue
		}
		answer := tok.Encode(r.Text)
		reqs = append(reqs, req{sent: r.Sent, done: r.Sent + r.Latency, tokens: append(p, answer...),
			prompt: len(p), sealed: len(p) + max(len(answer)-1, 0)})
	}
	sort.Slice(reqs, func(i, j int) bool { return reqs[i].sent < reqs[j].sent })
	byDone := append([]req(nil), reqs...)
	sort.Slice(byDone, func(i, j int) bool { return byDone[i].done < byDone[j].done })
	held := map[uint64]bool{}
	next := 0
	var hits, prompts int
	for _, r := range reqs {
		for ; next < len(byDone) && byDone[next].done <= r.sent; next++ {
			d := byDone[next]
			for _, k := range blockKeys(d.tokens[:d.sealed], blockSize) {
				held[k] = true
			}
		}
		prompts += r.prompt
		for _, k := range blockKeys(r.tokens[:max(r.prompt-1, 0)], blockSize) {
			if !held[k] {
				break
			}
			hits += blockSize
		}
	}
	if prompts == 0 {
		return 0
	}
	return float64(hits) / float64(prompts)
}

// blockKeys are chained keys of tokens' full blocks: key i stands for
// tokens[:(i+1)*blockSize], as vLLM's block hash does.
func blockKeys(tokens []uint32, blockSize int) []uint64 {
	out := make([]uint64, len(tokens)/blockSize)
	h := fnv.New64a()
	var b [4]byte
	for i := range out {
		for _, t := range tokens[i*blockSize : (i+1)*blockSize] {
			b[0], b[1], b[2], b[3] = byte(t), byte(t>>8), byte(t>>16), byte(t>>24)
			h.Write(b[:])
		}
		out[i] = h.Sum64()
	}
	return out
}
