package bench

import (
	"context"
	"math/rand/v2"
	"net/http"
	"sort"
	"strings"
	"sync"
	"time"
)

// The multi-turn chat workload (Config.Users > 0): Users conversations of
// Turns turns each. Every conversation opens with the same system prompt
// (SystemPromptLen words) and a user message of InputLen words (within
// ±RangeRatio); each later turn sends the whole conversation so far: the
// previous messages, the server's answer as the assistant message, and a
// new user message, after a think time (exponential, mean ThinkTime)
// following the answer. The conversations start at the arrival times of
// RequestRate and Burstiness; within one, turns are sequential. The seed
// fixes every text and pause; with a deterministic server (greedy
// decoding, `pegaflow sim`) the answers too, so two runs with the same
// seed send the same requests: the workload of a routing comparison.
//
// A turn whose predecessor failed is not sent (its conversation is cut):
// counted in Result.NotSent.

// ChatMessage is one message of a multi-turn request.
type ChatMessage struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

// conversation is one user's planned turns.
type conversation struct {
	user     int
	start    time.Duration   // first turn's send time
	messages []string        // the user message of each turn
	think    []time.Duration // pause before each turn after the first
}

// plan draws the conversations of cfg (the same seed, the same plan).
func plan(cfg *Config) (system string, convs []conversation) {
	r := rand.New(rand.NewPCG(uint64(cfg.Seed), 0x7a1c_c0de))
	system = randomWords(r, cfg.SystemPromptLen)
	lo, hi := lenRange(cfg.InputLen, cfg.RangeRatio)
	starts := Arrivals(cfg.Users, cfg.RequestRate, cfg.Burstiness, cfg.Seed)
	convs = make([]conversation, cfg.Users)
	for u := range convs {
		c := conversation{user: u, start: starts[u]}
		for t := 0; t < cfg.Turns; t++ {
			c.messages = append(c.messages, randomWords(r, max(lo+r.IntN(hi-lo+1), 1)))
			var pause time.Duration
			if t > 0 && cfg.ThinkTime > 0 {
				pause = time.Duration(r.ExpFloat64() * float64(cfg.ThinkTime))
			}
			c.think = append(c.think, pause)
		}
		convs[u] = c
	}
	return system, convs
}

// runMultiTurn runs the conversations; res.Records are in send order
// within each conversation, conversations one after another.
func runMultiTurn(ctx context.Context, cfg *Config, hc *http.Client, res *Result, prog *progress) {
	system, convs := plan(cfg)
	recs := make([][]Record, len(convs))
	var sem chan struct{}
	if cfg.MaxConcurrency > 0 {
		sem = make(chan struct{}, cfg.MaxConcurrency)
	}
	start := res.Started
	var wg sync.WaitGroup
	for i := range convs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			recs[i] = converse(ctx, cfg, hc, system, convs[i], start, sem, prog)
		}()
	}
	wg.Wait()
	sent := 0
	for i := range recs {
		sent += len(recs[i])
	}
	res.NotSent = len(convs)*cfg.Turns - sent
	res.Records = make([]Record, 0, sent)
	for i := range recs {
		for _, r := range recs[i] {
			r.Index = len(res.Records)
			res.Records = append(res.Records, r)
		}
	}
}

// converse runs one conversation's turns in order; it stops at a failed
// turn or when ctx ends. Every wait ends with ctx.
func converse(ctx context.Context, cfg *Config, hc *http.Client, system string, c conversation,
	start time.Time, sem chan struct{}, prog *progress) []Record {
	var (
		recs []Record
		msgs []ChatMessage
		at   = start.Add(c.start)
	)
	if system != "" {
		msgs = append(msgs, ChatMessage{Role: "system", Content: system})
	}
	for t, text := range c.messages {
		at = at.Add(c.think[t])
		if !sleepUntil(ctx, at) {
			return recs
		}
		if sem != nil {
			select {
			case sem <- struct{}{}:
			case <-ctx.Done():
				return recs
			}
		}
		msgs = append(msgs, ChatMessage{Role: "user", Content: text})
		p := Prompt{Messages: append([]ChatMessage(nil), msgs...), InputLen: nominalLen(msgs), OutputLen: cfg.OutputLen}
		rec := Record{User: c.user, Turn: t + 1, Sent: time.Since(start), Messages: p.Messages}
		doRequest(ctx, hc, cfg, p, &rec)
		if sem != nil {
			<-sem
		}
		prog.done(rec.OK())
		recs = append(recs, rec)
		if !rec.OK() {
			return recs
		}
		msgs = append(msgs, ChatMessage{Role: "assistant", Content: rec.Text})
		at = time.Now()
	}
	return recs
}

// nominalLen is a chat's length in words plus a marker per message and
// the generation prompt (exact for `pegaflow sim`); the server's usage
// replaces it.
func nominalLen(msgs []ChatMessage) int {
	n := 1
	for _, m := range msgs {
		n += 1 + len(strings.Fields(m.Content))
	}
	return n
}

// sleepUntil waits until t; false when ctx ended first.
func sleepUntil(ctx context.Context, t time.Time) bool {
	d := time.Until(t)
	if d <= 0 {
		return ctx.Err() == nil
	}
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-timer.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// TurnStats summarises the successful requests of one turn number (or,
// in Result.FollowUps, of every turn from the second on).
type TurnStats struct {
	Turn     int   `json:"turn"` // 0 in FollowUps
	Requests int   `json:"requests"`
	TTFT     Stats `json:"ttft_ms"`
	// PromptTokens and CachedTokens are the servers' usage
	// (prompt_tokens_details.cached_tokens: what the answering instance
	// loaded or found cached; vLLM reports it with
	// --enable-prompt-tokens-details).
	PromptTokens int `json:"prompt_tokens"`
	CachedTokens int `json:"cached_tokens"`
}

// CachedRatio is CachedTokens / PromptTokens (0 without prompt tokens).
func (t TurnStats) CachedRatio() float64 {
	if t.PromptTokens == 0 {
		return 0
	}
	return float64(t.CachedTokens) / float64(t.PromptTokens)
}

// summarizeTurns fills res.Turns and res.FollowUps from res.Records.
func summarizeTurns(res *Result) {
	byTurn := map[int][]*Record{}
	var follow []*Record
	for i := range res.Records {
		r := &res.Records[i]
		if r.Turn == 0 || !r.OK() {
			continue
		}
		byTurn[r.Turn] = append(byTurn[r.Turn], r)
		if r.Turn >= 2 {
			follow = append(follow, r)
		}
	}
	res.Turns = res.Turns[:0]
	for t, recs := range byTurn {
		res.Turns = append(res.Turns, turnStats(t, recs, res.Percentiles))
	}
	sort.Slice(res.Turns, func(i, j int) bool { return res.Turns[i].Turn < res.Turns[j].Turn })
	if len(byTurn) > 0 {
		fu := turnStats(0, follow, res.Percentiles)
		res.FollowUps = &fu
	}
}

func turnStats(turn int, recs []*Record, pcts []float64) TurnStats {
	s := TurnStats{Turn: turn, Requests: len(recs)}
	ttft := make([]float64, len(recs))
	for i, r := range recs {
		ttft[i] = ms(r.TTFT)
		s.PromptTokens += r.PromptTokens
		s.CachedTokens += r.CachedTokens
	}
	s.TTFT = summary(ttft, pcts)
	return s
}
