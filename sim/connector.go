package sim

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"time"

	pb "github.com/pegaflow/pegaflow/engine/api/pegaflowv1"
)

func str(v any) string { s, _ := v.(string); return s }

// kvSourceEngine is the kv_transfer_params key naming P's engine (its
// peer address): P returns it, the router passes it to D, D's query names
// it as source_engine. Absent when P's engine serves no peers (same host).
const kvSourceEngine = "pegaflow_source_engine"

// The connector's kv_role values (Config.KVRole).
const (
	KVBoth     = "kv_both"
	KVProducer = "kv_producer"
	KVConsumer = "kv_consumer"
)

// loadsPrefix: every request loads the prefix its engine holds.
func (s *Sim) loadsPrefix() bool {
	return s.engine != nil && (s.cfg.KVRole == KVBoth || s.cfg.KVRole == KVConsumer)
}

// savesAll: every request saves the full blocks it computed.
func (s *Sim) savesAll() bool {
	return s.engine != nil && (s.cfg.KVRole == KVBoth || s.cfg.KVRole == KVProducer)
}

// saveSealed makes q save, when it finishes, every full block whose KV it
// holds: the prompt's and the generated tokens' but the last, whose KV
// is never computed (vLLM samples it and stops). A chat's next turn is
// this prompt, this answer and a new message: it finds all of them.
func (s *Sim) saveSealed(q *seq, p *parsed) {
	q.onFinish = func(blocks []uint32) {
		toks := make([]uint32, 0, len(p.prompt)+len(q.generated))
		toks = append(append(toks, p.prompt...), q.generated[:len(q.generated)-1]...)
		s.saves.Add(1)
		go s.save(blocks, s.blockHashes(toks, p.salt), &pb.SaveRequest{Rank: 0})
	}
}

// preparePrefill makes q save its prompt's full blocks when it finishes
// and returns the kv_transfer_params for the decode leg.
func (s *Sim) preparePrefill(q *seq, p *parsed) map[string]any {
	hashes := s.blockHashes(p.prompt, p.salt)
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
//
// transfer: the decode leg of a P/D transfer (waits for it, fetches from
// P's engine); else a lookup of the prefix this engine already holds (no
// wait), counted in sim_kv_prefix_hit_tokens_total.
func (s *Sim) loadRemote(ctx context.Context, q *seq, p *parsed, transfer bool) (int, error) {
	bs := s.cfg.Geometry.BlockSize
	hashes := s.blockHashes(p.prompt, p.salt)
	if len(hashes) == 0 {
		return 0, nil
	}
	c, nsID, err := s.engine.get()
	if err != nil {
		s.m.loadFailures.Inc()
		s.log.Warn("KV load skipped; recomputing", "err", err)
		return 0, nil
	}
	tid, source, wait := str(p.params["pegaflow_transfer_id"]), str(p.params[kvSourceEngine]), s.cfg.KVQueryWait
	if !transfer {
		tid, source, wait = "", "", 0
	}
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
		NamespaceId: nsID, Hashes: hashes, WaitMs: uint32(wait / time.Millisecond),
		Lease: true, TransferId: tid, SourceEngine: source,
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
	if !transfer {
		s.m.prefixHits.Add(float64(q.computed))
	}
	return ok * bs, nil
}
