package sim

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"
)

// CostModel gives a step's duration on the modelled accelerator: every
// forward pass costs StepBase, plus PrefillPerToken per prompt token
// computed and DecodePerToken per sequence decoding in the step. Prefill
// chunks and decodes share steps, so a long prefill lengthens the step that
// every running decode waits for: the inter-token stall P/D removes.
type CostModel struct {
	StepBase        time.Duration
	PrefillPerToken time.Duration
	DecodePerToken  time.Duration
}

// StepTime is the duration of a step with the given work.
func (c CostModel) StepTime(prefillTokens, decodeSeqs int) time.Duration {
	return c.StepBase + time.Duration(prefillTokens)*c.PrefillPerToken + time.Duration(decodeSeqs)*c.DecodePerToken
}

// token is one generated token as the HTTP side sees it.
type token struct {
	text string
	at   time.Time
}

// seq is one request inside the scheduler. Fields above the mutex belong to
// the scheduler goroutine once submitted (before that, to the submitter).
type seq struct {
	prompt    []uint32
	maxTokens int
	digest    uint64
	arrival   time.Time

	computed   int    // prompt positions whose KV is in blocks
	kvHash     uint64 // prefix hash after the last position written
	blocks     []uint32
	needBlocks int
	generated  []uint32
	// onFinish, when set, takes over the blocks after the last token (the
	// P role saves them before freeing); otherwise they are freed.
	onFinish func(blocks []uint32)

	cancelled atomic.Bool

	mu     sync.Mutex
	out    []token
	done   bool
	err    error
	notify chan struct{}
}

func newSeq(prompt []uint32, maxTokens int, digest uint64, blockSize int, kvStart uint64) *seq {
	return &seq{
		prompt: prompt, maxTokens: maxTokens, digest: digest, arrival: time.Now(), kvHash: kvStart,
		needBlocks: (len(prompt) + maxTokens + blockSize - 1) / blockSize,
		notify:     make(chan struct{}, 1),
	}
}

func (q *seq) push(t token, done bool, err error) {
	q.mu.Lock()
	if t.text != "" {
		q.out = append(q.out, t)
	}
	q.done = q.done || done
	if err != nil && q.err == nil {
		q.err = err
	}
	q.mu.Unlock()
	select {
	case q.notify <- struct{}{}:
	default:
	}
}

// next returns the tokens after the first `have`, waiting for at least one
// or the end. done is true once the sequence finished (err says whether it
// failed); ctx ending returns ctx.Err().
func (q *seq) next(ctx context.Context, have int) ([]token, bool, error) {
	for {
		q.mu.Lock()
		toks, done, err := q.out[have:], q.done, q.err
		q.mu.Unlock()
		if len(toks) > 0 || done {
			return toks, done, err
		}
		select {
		case <-q.notify:
		case <-ctx.Done():
			return nil, false, ctx.Err()
		}
	}
}

// errShutdown fails the requests in flight when the sim stops.
var errShutdown = errors.New("sim is shutting down")

// scheduler is the loop of one modelled accelerator, after vLLM's: each step
// runs one token of every decoding sequence, then prompt chunks of
// prefilling sequences (oldest first) within the token budget, then admits
// waiting sequences (first come first served) while budget, sequence slots
// and KV blocks allow.
type scheduler struct {
	cost           CostModel
	maxBatchTokens int
	maxNumSeqs     int
	kv             *kvCache
	pool           *blockPool
	sampler        Sampler
	m              *metrics
	in             chan *seq
	// wake is signalled when a request is cancelled, so an idle loop
	// drops it (and frees its blocks) at once.
	wake chan struct{}
}

type work struct {
	q       *seq
	prefill int // prompt tokens this step; 0 for a decode
}

func (s *scheduler) run(ctx context.Context) {
	var waiting, running []*seq
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	defer func() {
		for _, q := range append(waiting, running...) {
			s.pool.release(q.blocks)
			q.push(token{}, true, errShutdown)
		}
		s.m.running.Set(0)
		s.m.waiting.Set(0)
	}()
	for {
	drain:
		for {
			select {
			case q := <-s.in:
				waiting = append(waiting, q)
			default:
				break drain
			}
		}
		waiting = s.dropCancelled(waiting)
		running = s.dropCancelled(running)
		s.m.running.Set(float64(len(running)))
		s.m.waiting.Set(float64(len(waiting)))
		s.m.kvUsage.Set(float64(s.pool.used()) / float64(s.pool.total))

		batch, blocked := s.schedule(&waiting, &running)
		if len(batch) == 0 {
			// Idle, or every waiting sequence waits for KV blocks.
			select {
			case q := <-s.in:
				waiting = append(waiting, q)
			case <-blocked:
			case <-s.wake:
			case <-ctx.Done():
				return
			}
			continue
		}
		start := time.Now()
		prefillTokens, decodes := s.execute(batch)
		d := s.cost.StepTime(prefillTokens, decodes)
		if rest := time.Until(start.Add(d)); rest > 0 {
			timer.Reset(rest)
			select {
			case <-timer.C:
			case <-ctx.Done():
				timer.Stop()
				return
			}
		}
		s.m.steps.Inc()
		s.m.stepSeconds.Observe(time.Since(start).Seconds())
		s.m.prefillTokens.Add(float64(prefillTokens))
		s.m.iterationTokens.Observe(float64(prefillTokens + decodes))
		s.m.stepSeqs.Observe(float64(len(batch)))
		running = s.emit(batch, running, time.Now())
	}
}

func (s *scheduler) dropCancelled(qs []*seq) []*seq {
	out := qs[:0]
	for _, q := range qs {
		if q.cancelled.Load() {
			s.pool.release(q.blocks)
			q.blocks = nil
			q.push(token{}, true, context.Canceled)
			continue
		}
		out = append(out, q)
	}
	for i := len(out); i < len(qs); i++ {
		qs[i] = nil
	}
	return out
}

func (s *scheduler) schedule(waiting, running *[]*seq) (batch []work, blocked <-chan struct{}) {
	budget := s.maxBatchTokens
	for _, q := range *running {
		if q.computed == len(q.prompt) && budget > 0 {
			batch = append(batch, work{q: q})
			budget--
		}
	}
	for _, q := range *running {
		if q.computed < len(q.prompt) && budget > 0 {
			n := min(len(q.prompt)-q.computed, budget)
			batch = append(batch, work{q: q, prefill: n})
			budget -= n
		}
	}
	for len(*waiting) > 0 && budget > 0 && len(*running) < s.maxNumSeqs {
		q := (*waiting)[0]
		if q.blocks == nil {
			b, changed := s.pool.tryAlloc(q.needBlocks)
			if changed != nil {
				blocked = changed
				break
			}
			q.blocks = b
		}
		*waiting = (*waiting)[1:]
		*running = append(*running, q)
		n := min(len(q.prompt)-q.computed, budget)
		batch = append(batch, work{q: q, prefill: n})
		budget -= n
	}
	return batch, blocked
}

// execute writes the KV of every token the step computes.
func (s *scheduler) execute(batch []work) (prefillTokens, decodes int) {
	for _, w := range batch {
		q := w.q
		if w.prefill == 0 {
			// Feed the last sampled token.
			pos := len(q.prompt) + len(q.generated) - 1
			q.kvHash = s.kv.writeTokens(q.blocks, pos, q.generated[len(q.generated)-1:], q.kvHash)
			decodes++
			continue
		}
		q.kvHash = s.kv.writeTokens(q.blocks, q.computed, q.prompt[q.computed:q.computed+w.prefill], q.kvHash)
		q.computed += w.prefill
		prefillTokens += w.prefill
	}
	return prefillTokens, decodes
}

// emit samples a token for every sequence whose prompt is complete and
// retires finished ones.
func (s *scheduler) emit(batch []work, running []*seq, now time.Time) []*seq {
	finished := map[*seq]bool{}
	for _, w := range batch {
		q := w.q
		if q.computed < len(q.prompt) {
			continue
		}
		text, id := s.sampler.Token(q.digest, len(q.generated))
		q.generated = append(q.generated, id)
		s.m.generationTokens.Inc()
		done := len(q.generated) >= q.maxTokens
		if done {
			finished[q] = true
			blocks := q.blocks
			q.blocks = nil
			if q.onFinish != nil {
				q.onFinish(blocks)
			} else {
				s.pool.release(blocks)
			}
		}
		q.push(token{text: text, at: now}, done, nil)
	}
	if len(finished) == 0 {
		return running
	}
	out := running[:0]
	for _, q := range running {
		if !finished[q] {
			out = append(out, q)
		}
	}
	for i := len(out); i < len(running); i++ {
		running[i] = nil
	}
	return out
}
