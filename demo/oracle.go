package demo

import (
	"hash/fnv"
	"sort"
	"time"

	"github.com/pegaflow/pegaflow/bench"
	"github.com/pegaflow/pegaflow/sim"
)

// oracleHitRatio is the hit ratio of a router that knows every host's
// content and may send each request anywhere, ignoring load, on a
// prefill that takes no time: each request loads the longest prefix of
// full blocks that the requests sent before it computed (their prompts,
// from their send) and that the requests finished before it was sent
// left behind (their prompts and answers but the answer's last token, as
// a kv_both sim saves them when it finishes). A hit counts as the sims
// count it: the loaded blocks' tokens, at most all but the prompt's last
// token (vLLM recomputes that one). Chained blocks start at the first,
// so the best single host holds the longest prefix of the union: one
// host can serve it. No eviction, no load, no prefill time: of requests
// sharing a prefix, only the first sent computes it. A real request
// loads later than its send (after tokenizing, routing, queueing), so a
// policy can still meet, by a hair, a prefix the oracle counts for a
// later request instead; the pair's total is the same. Tokens are the
// sim's (vocabSize, blockSize: the demo's sims).
func oracleHitRatio(res *bench.Result, vocabSize, blockSize int) float64 {
	tok, err := sim.NewTokenizer(vocabSize)
	if err != nil || res == nil {
		return 0
	}
	type req struct {
		sent   time.Duration
		prompt []uint32
	}
	type save struct {
		at     time.Duration
		tokens []uint32
	}
	var reqs []req
	var saves []save // answers, when their requests finish
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
		sealed := append(append([]uint32(nil), p...), answer[:max(len(answer)-1, 0)]...)
		reqs = append(reqs, req{sent: r.Sent, prompt: p})
		saves = append(saves, save{r.Sent + r.Latency, sealed})
	}
	sort.SliceStable(reqs, func(i, j int) bool { return reqs[i].sent < reqs[j].sent })
	sort.SliceStable(saves, func(i, j int) bool { return saves[i].at < saves[j].at })
	held := map[uint64]bool{}
	hold := func(tokens []uint32) {
		for _, k := range blockKeys(tokens, blockSize) {
			held[k] = true
		}
	}
	next := 0
	var hits, prompts int
	for _, r := range reqs {
		for ; next < len(saves) && saves[next].at <= r.sent; next++ {
			hold(saves[next].tokens)
		}
		prompts += len(r.prompt)
		n := 0
		for _, k := range blockKeys(r.prompt, blockSize) {
			if !held[k] {
				break
			}
			n++
		}
		hits += min(n*blockSize, max(len(r.prompt)-1, 0))
		hold(r.prompt)
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
