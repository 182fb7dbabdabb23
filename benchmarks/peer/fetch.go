package main

import (
	"context"
	"fmt"
	"os"
	"time"

	pb "github.com/pegaflow/pegaflow/engine/api/pegaflowv1"
	"github.com/pegaflow/pegaflow/engine/client"
	"github.com/pegaflow/pegaflow/internal/kvtest"
)

// fetchResult is one size's peer fetch: B's query-to-answer wall time over
// the timed queries, and B's own metrics over the same queries.
type fetchResult struct {
	ShareBytes   int     `json:"share_bytes"`
	Blocks       int     `json:"blocks_per_query"`
	Queries      int     `json:"queries"`
	FetchGBps    float64 `json:"peer_fetch_gbps"`
	MetricBytes  float64 `json:"metric_bytes"`
	MetricGBps   float64 `json:"metric_gbps"`
	QueryP50ms   float64 `json:"query_p50_ms"`
	MetricsMatch bool    `json:"metrics_match"`
}

// specFor is a one-rank FlashAttention cache whose blocks (= the rank's
// share) have shareBytes bytes: 4 layers x K/V segments.
func specFor(shareBytes, numBlocks int) kvtest.Spec {
	const layers, blockSize, elem = 4, 16, 2
	seg := shareBytes / (layers * 2)
	heads, headSize := seg/(blockSize*128*elem), 128
	if heads == 0 {
		heads, headSize = 1, seg/(blockSize*elem)
	}
	return kvtest.Spec{Layout: kvtest.FlashAttn, Layers: layers, NumBlocks: numBlocks, BlockSize: blockSize,
		Heads: heads, HeadSize: headSize, ElemSize: elem}
}

// rank is one registered cache of an engine client.
type rank struct {
	c     *client.Client
	cache *kvtest.Cache
	nsID  string
	inst  string
}

func openRank(ctx context.Context, sock, inst string, spec kvtest.Spec, model string) (*rank, error) {
	c, err := client.Dial(ctx, sock, inst)
	if err != nil {
		return nil, err
	}
	cache, err := kvtest.New(kvtest.ShmDir(), fmt.Sprintf("pf-peerbench-%s-%d", inst, os.Getpid()), spec)
	if err != nil {
		c.Close()
		return nil, err
	}
	req := cache.RegisterRequest(inst, 0, spec.Namespace(model, 1))
	req.SessionId = c.SessionID()
	resp, err := c.Register(ctx, req)
	if err != nil {
		cache.Close()
		c.Close()
		return nil, fmt.Errorf("register %s: %w", inst, err)
	}
	return &rank{c: c, cache: cache, nsID: resp.NamespaceId, inst: inst}, nil
}

func (r *rank) close() {
	r.c.Close()
	r.cache.Close()
}

// measureFetch saves rounds+1 batches of fresh blocks into A (producer)
// and, after each save, queries B (consumer) naming A as the source: B
// fetches the whole batch (over --peer-transport) before it answers. The first round
// warms up (connection, handshake, pool pages); the rest are timed. rep
// keeps the hashes of repetitions apart.
func measureFetch(ctx context.Context, a, b *engineProc, shareBytes, batchBytes, rounds, rep int) (fetchResult, error) {
	n := max(batchBytes/shareBytes, 1)
	spec := specFor(shareBytes, n)
	if spec.BlockBytes() != shareBytes {
		return fetchResult{}, fmt.Errorf("spec gives %d-byte shares, want %d", spec.BlockBytes(), shareBytes)
	}
	model := fmt.Sprintf("peer-bench-%d", shareBytes)
	prod, err := openRank(ctx, a.sock, "P", spec, model)
	if err != nil {
		return fetchResult{}, err
	}
	defer prod.close()
	// The consumer only queries: B needs a registered rank of the
	// namespace for the block shape, not room for the blocks.
	cons, err := openRank(ctx, b.sock, "D", specFor(shareBytes, 1), model)
	if err != nil {
		return fetchResult{}, err
	}
	defer cons.close()
	if prod.nsID != cons.nsID {
		return fetchResult{}, fmt.Errorf("namespace ids differ: %s on A, %s on B", prod.nsID, cons.nsID)
	}
	for i := range n {
		prod.cache.Fill(i, uint64(shareBytes))
	}
	refs := make([]*pb.BlockRef, n)
	var before peerMetrics
	var total time.Duration
	var durs []time.Duration
	for round := -1; round < rounds; round++ {
		hashes := kvtest.Hashes(fmt.Sprintf("%s-rep%d-r%d", model, rep, round), n) // fresh: B holds none of them
		for i, h := range hashes {
			refs[i] = &pb.BlockRef{BlockId: uint32(i), Hash: h}
		}
		s, err := prod.c.Save(ctx, &pb.SaveRequest{SessionId: prod.c.SessionID(), InstanceId: prod.inst, Blocks: refs})
		if err != nil {
			return fetchResult{}, fmt.Errorf("save into A: %w", err)
		}
		if int(s.Saved) != n {
			return fetchResult{}, fmt.Errorf("engine A saved %d of %d blocks", s.Saved, n)
		}
		if round == 0 {
			if before, err = b.metrics(); err != nil {
				return fetchResult{}, err
			}
		}
		t0 := time.Now()
		q, err := cons.c.Query(ctx, &pb.QueryRequest{SessionId: cons.c.SessionID(), NamespaceId: cons.nsID, Hashes: hashes,
			WaitMs: 30_000, SourceEngine: a.peerAddr})
		d := time.Since(t0)
		if err != nil {
			return fetchResult{}, fmt.Errorf("query B: %w", err)
		}
		if int(q.NumHit) != n {
			return fetchResult{}, fmt.Errorf("engine B answered %d of %d blocks (a failed fetch; B's log: %s)", q.NumHit, n, b.logTail())
		}
		if round >= 0 {
			total += d
			durs = append(durs, d)
		}
	}
	after, err := b.metrics()
	if err != nil {
		return fetchResult{}, err
	}
	bytes := float64(n * shareBytes * rounds)
	r := fetchResult{ShareBytes: shareBytes, Blocks: n, Queries: rounds, FetchGBps: bytes / total.Seconds() / 1e9,
		MetricBytes: after.bytes - before.bytes, QueryP50ms: float64(p50(durs).Microseconds()) / 1e3}
	if s := after.seconds - before.seconds; s > 0 {
		r.MetricGBps = r.MetricBytes / s / 1e9
	}
	r.MetricsMatch = r.MetricBytes == bytes && after.fetches-before.fetches == float64(rounds)
	return r, nil
}
