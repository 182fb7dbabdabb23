package sim

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/labstack/echo/v4"

	pb "github.com/pegaflow/pegaflow/engine/api/pegaflowv1"
)

// maxBodyBytes bounds a request body.
const maxBodyBytes = 32 << 20

type genRequest struct {
	Model               string          `json:"model"`
	Prompt              json.RawMessage `json:"prompt"`
	Messages            []chatMessage   `json:"messages"`
	MaxTokens           *int            `json:"max_tokens"`
	MaxCompletionTokens *int            `json:"max_completion_tokens"`
	Stream              bool            `json:"stream"`
	StreamOptions       *struct {
		IncludeUsage bool `json:"include_usage"`
	} `json:"stream_options"`
	Seed             *int64         `json:"seed"`
	N                *int           `json:"n"`
	CacheSalt        string         `json:"cache_salt"`
	KVTransferParams map[string]any `json:"kv_transfer_params"`
}

type chatMessage struct {
	Role    string          `json:"role"`
	Content json.RawMessage `json:"content"`
}

// httpError is a request failure with its status.
type httpError struct {
	code int
	msg  string
}

func (e *httpError) Error() string { return e.msg }

func badRequest(format string, args ...any) error {
	return &httpError{http.StatusBadRequest, fmt.Sprintf(format, args...)}
}

type role int

const (
	roleAggregated role = iota
	rolePrefill         // P: do_remote_decode
	roleDecode          // D: do_remote_prefill
)

// parsed is a validated request.
type parsed struct {
	chat      bool
	prompt    []uint32
	maxTokens int
	seed      int64
	stream    bool
	usage     bool
	salt      string
	role      role
	params    map[string]any
}

func (s *Sim) parse(c echo.Context, chat bool) (*parsed, error) {
	body, err := io.ReadAll(http.MaxBytesReader(c.Response(), c.Request().Body, maxBodyBytes))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return nil, &httpError{http.StatusRequestEntityTooLarge, fmt.Sprintf("request body over %d bytes", maxBodyBytes)}
		}
		return nil, badRequest("reading body: %v", err)
	}
	var r genRequest
	dec := json.NewDecoder(bytes.NewReader(body))
	if err := dec.Decode(&r); err != nil {
		return nil, badRequest("invalid JSON body: %v", err)
	}
	if r.Model != "" && r.Model != s.cfg.Model {
		return nil, &httpError{http.StatusNotFound, fmt.Sprintf("The model `%s` does not exist.", r.Model)}
	}
	if r.N != nil && *r.N != 1 {
		return nil, badRequest("n=%d is not supported (only n=1)", *r.N)
	}
	p := &parsed{chat: chat, stream: r.Stream, salt: r.CacheSalt, params: r.KVTransferParams}
	if r.Seed != nil {
		p.seed = *r.Seed
	}
	p.usage = r.StreamOptions != nil && r.StreamOptions.IncludeUsage
	if chat {
		if len(r.Messages) == 0 {
			return nil, badRequest("messages is missing or empty")
		}
		msgs := make([]Message, len(r.Messages))
		for i, m := range r.Messages {
			text, err := contentText(m.Content)
			if err != nil {
				return nil, badRequest("messages[%d].content: %v", i, err)
			}
			msgs[i] = Message{Role: m.Role, Content: text}
		}
		if p.prompt, err = s.tok.ApplyChatTemplate(msgs); err != nil {
			return nil, badRequest("%v", err)
		}
	} else {
		if p.prompt, err = s.promptTokens(r.Prompt); err != nil {
			return nil, err
		}
	}
	if len(p.prompt) == 0 {
		return nil, badRequest("the prompt is empty")
	}
	switch {
	case chat && r.MaxCompletionTokens != nil:
		p.maxTokens = *r.MaxCompletionTokens
	case r.MaxTokens != nil:
		p.maxTokens = *r.MaxTokens
	case chat:
		p.maxTokens = s.cfg.MaxModelLen - len(p.prompt)
	default:
		p.maxTokens = 16 // the OpenAI completions default
	}
	if p.maxTokens < 1 {
		return nil, badRequest("max_tokens must be at least 1, got %d", p.maxTokens)
	}
	if total := len(p.prompt) + p.maxTokens; total > s.cfg.MaxModelLen {
		return nil, badRequest("This model's maximum context length is %d tokens. However, you requested %d tokens (%d in the messages, %d in the completion).",
			s.cfg.MaxModelLen, total, len(p.prompt), p.maxTokens)
	}
	bs := s.cfg.Geometry.BlockSize
	if need := (len(p.prompt) + p.maxTokens + bs - 1) / bs; need > s.cfg.Geometry.NumBlocks {
		return nil, badRequest("the request needs %d KV blocks; this instance has %d", need, s.cfg.Geometry.NumBlocks)
	}
	if truthy(r.KVTransferParams["do_remote_decode"]) {
		p.role = rolePrefill
	} else if truthy(r.KVTransferParams["do_remote_prefill"]) {
		p.role = roleDecode
	}
	if p.role != roleAggregated && s.engine == nil {
		s.log.Warn("kv_transfer_params given but the sim has no engine; serving alone")
		p.role = roleAggregated
	}
	return p, nil
}

func truthy(v any) bool { b, ok := v.(bool); return ok && b }

func str(v any) string { s, _ := v.(string); return s }

// promptTokens accepts a string, a one-element list of strings, or a list
// of token ids.
func (s *Sim) promptTokens(raw json.RawMessage) ([]uint32, error) {
	if len(raw) == 0 || string(raw) == "null" {
		return nil, badRequest("prompt is missing")
	}
	var text string
	if json.Unmarshal(raw, &text) == nil {
		return s.tok.Encode(text), nil
	}
	var texts []string
	if json.Unmarshal(raw, &texts) == nil {
		if len(texts) != 1 {
			return nil, badRequest("batched prompts (%d) are not supported; send one prompt per request", len(texts))
		}
		return s.tok.Encode(texts[0]), nil
	}
	var ids []int64
	if json.Unmarshal(raw, &ids) == nil {
		out := make([]uint32, len(ids))
		for i, id := range ids {
			if id < 0 || id >= int64(s.cfg.VocabSize) {
				return nil, badRequest("prompt token %d (%d) is outside the vocabulary [0, %d)", i, id, s.cfg.VocabSize)
			}
			out[i] = uint32(id)
		}
		return out, nil
	}
	return nil, badRequest("prompt must be a string, a list with one string, or a list of token ids")
}

// contentText accepts a string or a list of {"type":"text","text":...} parts.
func contentText(raw json.RawMessage) (string, error) {
	if len(raw) == 0 || string(raw) == "null" {
		return "", nil
	}
	var s string
	if json.Unmarshal(raw, &s) == nil {
		return s, nil
	}
	var parts []struct {
		Type string `json:"type"`
		Text string `json:"text"`
	}
	if err := json.Unmarshal(raw, &parts); err != nil {
		return "", errors.New("want a string or a list of text parts")
	}
	var b strings.Builder
	for i, p := range parts {
		if p.Type != "text" {
			return "", fmt.Errorf("part %d has type %q; only text is supported", i, p.Type)
		}
		if i > 0 {
			b.WriteByte(' ')
		}
		b.WriteString(p.Text)
	}
	return b.String(), nil
}

func (s *Sim) fail(c echo.Context, err error) error {
	code := http.StatusInternalServerError
	var he *httpError
	if errors.As(err, &he) {
		code = he.code
	} else if errors.Is(err, errShutdown) {
		code = http.StatusServiceUnavailable
	}
	s.m.requestErrors.WithLabelValues(fmt.Sprint(code)).Inc()
	if c.Response().Committed {
		return nil
	}
	return writeError(c, code, err.Error())
}

func (s *Sim) serveGenerate(c echo.Context, chat bool) error {
	arrival := time.Now()
	p, err := s.parse(c, chat)
	if err != nil {
		return s.fail(c, err)
	}
	ctx := c.Request().Context()
	bs := s.cfg.Geometry.BlockSize
	q := newSeq(p.prompt, p.maxTokens, Digest(p.prompt, p.seed), bs, prefixStart(s.noneHash))
	q.arrival = arrival
	s.m.promptTokens.Add(float64(len(p.prompt)))

	var loadedTokens int
	var respParams map[string]any
	switch p.role {
	case roleDecode:
		if loadedTokens, err = s.loadRemote(ctx, q, p); err != nil {
			return s.fail(c, err)
		}
	case rolePrefill:
		respParams = s.preparePrefill(q, p)
	}
	if err := s.submit(ctx, q); err != nil {
		s.pool.release(q.blocks)
		return s.fail(c, err)
	}
	stop := context.AfterFunc(ctx, func() {
		q.cancelled.Store(true)
		select {
		case s.wake <- struct{}{}:
		default:
		}
	})
	defer stop()

	w := newWriter(c, p, s.cfg.Model)
	if p.stream {
		w.start()
	}
	var toks []token
	for {
		more, done, err := q.next(ctx, len(toks))
		if err != nil {
			if ctx.Err() != nil {
				return nil // the client left; the scheduler drops the request
			}
			if p.stream {
				s.m.requestErrors.WithLabelValues("500").Inc()
				w.streamError(err)
				return nil
			}
			return s.fail(c, err)
		}
		if p.stream {
			for i, t := range more {
				w.chunk(t.text, done && i == len(more)-1)
			}
		}
		toks = append(toks, more...)
		if done {
			break
		}
	}
	s.observe(arrival, toks)
	u := usage{Prompt: len(p.prompt), Completion: len(toks), Cached: loadedTokens}
	if p.stream {
		w.finish(u)
		return nil
	}
	var text strings.Builder
	for _, t := range toks {
		text.WriteString(t.text)
	}
	return w.whole(text.String(), u, respParams)
}

func (s *Sim) submit(ctx context.Context, q *seq) error {
	select {
	case s.sched.in <- q:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-s.lifeCtx.Done():
		return errShutdown
	}
}

func (s *Sim) observe(arrival time.Time, toks []token) {
	if len(toks) == 0 {
		return
	}
	s.m.ttft.Observe(toks[0].at.Sub(arrival).Seconds())
	for i := 1; i < len(toks); i++ {
		s.m.itl.Observe(toks[i].at.Sub(toks[i-1].at).Seconds())
	}
	s.m.e2e.Observe(toks[len(toks)-1].at.Sub(arrival).Seconds())
	s.m.success.WithLabelValues("length").Inc()
}

// kvSourceEngine is the kv_transfer_params key naming P's engine (its
// peer address): P returns it, the router passes it to D, D's query names
// it as source_engine. Absent when P's engine serves no peers (same host).
const kvSourceEngine = "pegaflow_source_engine"

// preparePrefill makes q save its prompt's full blocks when it finishes
// and returns the kv_transfer_params for the decode leg.
func (s *Sim) preparePrefill(q *seq, p *parsed) map[string]any {
	hashes := BlockHashes(s.noneHash, p.prompt, s.cfg.Geometry.BlockSize, p.salt)
	tid := str(p.params["pegaflow_transfer_id"])
	save := &pb.SaveRequest{
		Rank: 0, TransferId: tid, TransferLast: tid != "",
		ReadyUrl: str(p.params["pegaflow_ready_url"]), ReadyToken: str(p.params["pegaflow_ready_token"]),
	}
	// Runs on the scheduler goroutine, which Run stops before waiting for
	// saves, so Add never races with Wait.
	q.onFinish = func(blocks []uint32) {
		s.saves.Add(1)
		go s.save(blocks, hashes, save)
	}
	out := map[string]any{"do_remote_prefill": true, "do_remote_decode": false, "pegaflow_num_blocks": len(hashes)}
	if tid != "" {
		out["pegaflow_transfer_id"] = tid
	}
	if src := s.engine.peerAddress(); src != "" {
		// Where D's engine fetches the KV from when D is on another host.
		out[kvSourceEngine] = src
	}
	return out
}

// save stores the prompt's full blocks (held since the request finished)
// in the engine, then frees them: vLLM's delayed free for async saves.
func (s *Sim) save(blocks []uint32, hashes [][]byte, req *pb.SaveRequest) {
	defer s.saves.Done()
	defer s.pool.release(blocks)
	if s.cfg.CorruptSavedKV && len(hashes) > 0 {
		s.kv.write(func() { s.kv.slot(0, 0, int(blocks[0]), 0)[0] ^= 0x5a })
	}
	c, _, err := s.engine.get()
	if err != nil {
		s.m.saveFails.Inc()
		s.log.Error("KV save skipped", "transfer", req.TransferId, "err", err)
		return
	}
	req.InstanceId = s.engine.instanceID
	for i, h := range hashes {
		req.Blocks = append(req.Blocks, &pb.BlockRef{BlockId: blocks[i], Hash: h})
	}
	ctx, cancel := context.WithTimeout(s.lifeCtx, s.cfg.EngineTimeout)
	defer cancel()
	resp, err := c.Save(ctx, req)
	if err != nil {
		s.m.saveFails.Inc()
		s.log.Error("KV save failed", "transfer", req.TransferId, "blocks", len(hashes), "err", err)
		return
	}
	s.m.blocksSaved.Add(float64(resp.Saved + resp.Skipped))
	if resp.Failed > 0 {
		s.m.saveFails.Inc()
		s.log.Error("KV save incomplete", "transfer", req.TransferId, "failed", resp.Failed, "saved", resp.Saved)
	}
}

// errVerify marks loaded KV that differs from what the tokens imply.
var errVerify = errors.New("loaded KV does not match the prompt")

// loadRemote is the decode side: it finds the prompt's blocks in the
// engine, loads them into q's blocks and verifies them. Engine trouble
// (unreachable, missing blocks) means recomputing, as vLLM's connector
// does; wrong bytes fail the request. It returns the tokens loaded.
func (s *Sim) loadRemote(ctx context.Context, q *seq, p *parsed) (int, error) {
	bs := s.cfg.Geometry.BlockSize
	hashes := BlockHashes(s.noneHash, p.prompt, bs, p.salt)
	if len(hashes) == 0 {
		return 0, nil
	}
	c, nsID, err := s.engine.get()
	if err != nil {
		s.m.loadFailures.Inc()
		s.log.Warn("KV load skipped; recomputing", "err", err)
		return 0, nil
	}
	tid := str(p.params["pegaflow_transfer_id"])
	s.m.externalQueries.Add(float64(len(p.prompt)))
	release := func(lease string) {
		if lease == "" && tid == "" {
			return
		}
		rctx, cancel := context.WithTimeout(s.lifeCtx, 5*time.Second)
		defer cancel()
		if err := c.Release(rctx, &pb.ReleaseRequest{LeaseId: lease, TransferId: tid}); err != nil {
			s.log.Debug("release", "lease", lease, "transfer", tid, "err", err)
		}
	}
	qctx, cancel := context.WithTimeout(ctx, s.cfg.KVQueryWait+s.cfg.EngineTimeout)
	qr, err := c.Query(qctx, &pb.QueryRequest{
		NamespaceId: nsID, Hashes: hashes, WaitMs: uint32(s.cfg.KVQueryWait / time.Millisecond),
		Lease: true, TransferId: tid, SourceEngine: str(p.params[kvSourceEngine]),
	})
	cancel()
	if err != nil {
		if ctx.Err() != nil {
			return 0, ctx.Err()
		}
		s.m.loadFailures.Inc()
		s.log.Warn("KV query failed; recomputing", "transfer", tid, "err", err)
		release("")
		return 0, nil
	}
	hit := int(qr.NumHit)
	if hit == 0 {
		release("")
		return 0, nil
	}
	if q.blocks, err = s.pool.alloc(ctx, q.needBlocks); err != nil {
		release(qr.LeaseId)
		return 0, err
	}
	refs := make([]*pb.BlockRef, hit)
	for i := range refs {
		refs[i] = &pb.BlockRef{BlockId: q.blocks[i], Hash: hashes[i]}
	}
	lctx, cancel := context.WithTimeout(ctx, s.cfg.EngineTimeout)
	lr, err := c.Load(lctx, &pb.LoadRequest{InstanceId: s.engine.instanceID, Rank: 0, Blocks: refs, LeaseId: qr.LeaseId, TransferId: tid})
	cancel()
	if err != nil {
		if ctx.Err() != nil {
			s.pool.release(q.blocks)
			release(qr.LeaseId)
			return 0, ctx.Err()
		}
		s.m.loadFailures.Inc()
		s.log.Warn("KV load failed; recomputing", "transfer", tid, "err", err)
		release(qr.LeaseId)
		return 0, nil
	}
	ok := 0
	for ok < len(lr.Status) && lr.Status[ok] == pb.BlockStatus_BLOCK_STATUS_OK {
		ok++
	}
	if ok < hit {
		s.m.loadFailures.Inc()
		s.log.Warn("KV load partial; recomputing the rest", "transfer", tid, "hit", hit, "loaded", ok)
	}
	h := prefixStart(s.noneHash)
	for i := 0; i < ok; i++ {
		var good bool
		var where string
		if h, good, where = s.kv.verifyBlock(q.blocks[i], i, p.prompt, h); !good {
			s.m.verifyFailures.Inc()
			s.pool.release(q.blocks)
			s.log.Error("loaded KV does not match the prompt", "transfer", tid, "block", i, "at", where)
			return 0, &httpError{http.StatusInternalServerError,
				fmt.Sprintf("%v: block %d of %d (hash %s) differs at %s; the engine returned corrupted or foreign KV",
					errVerify, i, hit, hex.EncodeToString(hashes[i][:8]), where)}
		}
	}
	s.m.blocksLoaded.Add(float64(ok))
	// vLLM always recomputes the last prompt token to sample from it.
	q.computed = min(ok*bs, len(p.prompt)-1)
	h = prefixStart(s.noneHash)
	for pos := 0; pos < q.computed; pos++ {
		h = prefixNext(h, p.prompt[pos], pos)
	}
	q.kvHash = h
	s.m.externalHits.Add(float64(ok * bs))
	return ok * bs, nil
}
