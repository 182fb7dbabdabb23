package server

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"runtime"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/pegaflow/pegaflow/engine"
	pb "github.com/pegaflow/pegaflow/engine/api/pegaflowv1"
	"github.com/pegaflow/pegaflow/engine/client"
	"github.com/pegaflow/pegaflow/internal/kvtest"
)

// fuzzSpec is small so that the fuzzed calls also evict.
var fuzzSpec = kvtest.Spec{Layout: kvtest.FlashAttn, Layers: 2, NumBlocks: 16, BlockSize: 4, Heads: 2, HeadSize: 8, ElemSize: 2}

// fuzzBytes deals out a fuzz input as choices; an exhausted input deals
// zeros.
type fuzzBytes []byte

func (f *fuzzBytes) next() byte {
	if len(*f) == 0 {
		return 0
	}
	b := (*f)[0]
	*f = (*f)[1:]
	return b
}

func (f *fuzzBytes) pick(n int) int { return int(f.next()) % n }
func (f *fuzzBytes) flag() bool     { return f.next()&1 == 1 }

func pickOf[T any](f *fuzzBytes, xs ...T) T { return xs[f.pick(len(xs))] }

// fuzzEngine is a live engine and server on a real socket, with a
// client whose instance "fz-main" is registered and holds some blocks.
type fuzzEngine struct {
	eng        *engine.Engine
	c          *client.Client
	caches     []*kvtest.Cache
	hashes     [][]byte
	sink       string
	goroutines int
	leases     []string
}

func newFuzzEngine(f *testing.F) *fuzzEngine {
	sock, eng := startServerWith(f, engine.Config{PoolSize: 1 << 20, NUMANode: -1, Device: -1, MaxTransfers: 16,
		MaxCopyOps: int64(8 * fuzzSpec.NumSegments() * fuzzSpec.Layers), MaxQueryWait: 50 * time.Millisecond})
	ctx := context.Background()
	c, err := client.Dial(ctx, sock, "fuzz")
	require.NoError(f, err)
	f.Cleanup(func() { c.Close() })
	fx := &fuzzEngine{eng: eng, c: c, hashes: kvtest.Hashes("fuzz", 6)}
	fx.hashes = append(fx.hashes, []byte("short"), make([]byte, 64))
	for i := range 2 {
		cache, err := kvtest.New(kvtest.ShmDir(), fmt.Sprintf("pf-fuzz-%d-%d", time.Now().UnixNano(), i), fuzzSpec)
		require.NoError(f, err)
		f.Cleanup(cache.Close)
		fx.caches = append(fx.caches, cache)
	}
	sink := httptest.NewServer(http.HandlerFunc(func(http.ResponseWriter, *http.Request) {}))
	f.Cleanup(sink.Close)
	fx.sink = sink.URL + "/kv_ready"
	_, err = c.Register(ctx, fx.caches[0].RegisterRequest("fz-main", 0, fuzzSpec.Namespace("m", 1)))
	require.NoError(f, err)
	_, err = c.Save(ctx, &pb.SaveRequest{InstanceId: "fz-main", Blocks: fx.refs(&fuzzBytes{0, 0, 1, 1, 2, 2}, 3)})
	require.NoError(f, err)
	fx.goroutines = runtime.NumGoroutine()
	return fx
}

func (fx *fuzzEngine) refs(f *fuzzBytes, n int) []*pb.BlockRef {
	out := make([]*pb.BlockRef, n)
	for i := range out {
		out[i] = &pb.BlockRef{BlockId: uint32(f.pick(fuzzSpec.NumBlocks + 2)), Hash: fx.hashes[f.pick(len(fx.hashes))]}
	}
	return out
}

var fuzzTransfers = []string{"", "fz-t0", "fz-t1", "fz-t2"}

// call makes one well-typed request chosen by f.
func (fx *fuzzEngine) call(ctx context.Context, f *fuzzBytes) error {
	instance := pickOf(f, "fz-main", "fz-main", "fz-b", "nobody")
	rank := uint32(f.pick(2))
	switch f.pick(7) {
	case 0:
		ns := fuzzSpec.Namespace(pickOf(f, "m", "m", "m2"), 1+f.pick(2))
		req := fx.caches[f.pick(2)].RegisterRequest(pickOf(f, "fz-b", "fz-main"), int(rank), ns)
		switch f.pick(5) {
		case 1:
			req.NumBlocks = uint32(pickOf(f, 0, 1, fuzzSpec.NumBlocks+1))
		case 2:
			req.Layers[0].Segments[0].Length *= 2
		case 3:
			req.Layers = req.Layers[:1]
		case 4:
			ns.HashSeedFingerprint = []byte("other")
		}
		_, err := fx.c.Register(ctx, req)
		return err
	case 1:
		_, err := fx.c.Save(ctx, &pb.SaveRequest{InstanceId: instance, Rank: rank, Blocks: fx.refs(f, f.pick(9)),
			TransferId: pickOf(f, fuzzTransfers...), TransferLast: f.flag(), WaitEvent: f.pick(8) == 0,
			ReadyUrl:   pickOf(f, "", fx.sink, "http://10.0.0.1:1/kv_ready", "ftp://x/y"),
			ReadyToken: pickOf(f, "", "tok", "other")})
		return err
	case 2:
		lease := ""
		if len(fx.leases) > 0 && f.flag() {
			lease = fx.leases[f.pick(len(fx.leases))]
		}
		_, err := fx.c.Load(ctx, &pb.LoadRequest{InstanceId: instance, Rank: rank, Blocks: fx.refs(f, f.pick(9)),
			LeaseId: pickOf(f, lease, "l-junk"), TransferId: pickOf(f, fuzzTransfers...), WaitEvent: f.pick(8) == 0})
		return err
	case 3:
		ns, err := fx.c.OpenNamespace(ctx, fuzzSpec.Namespace("m", 1))
		if err != nil {
			return err
		}
		req := &pb.QueryRequest{NamespaceId: pickOf(f, ns, ns, "ns-junk"), WaitMs: uint32(f.pick(4) * 10),
			TransferId: pickOf(f, fuzzTransfers...), Lease: f.flag(), LeaseTtlMs: uint32(f.pick(3) * 1000)}
		for range f.pick(9) {
			req.Hashes = append(req.Hashes, fx.hashes[f.pick(len(fx.hashes))])
		}
		if f.pick(4) == 0 { // the packed encoding
			req.HashLen = uint32(pickOf(f, 32, 7))
			for _, h := range req.Hashes {
				req.PackedHashes = append(req.PackedHashes, h...)
			}
			req.Hashes = nil
		}
		resp, err := fx.c.Query(ctx, req)
		if err == nil && resp.LeaseId != "" {
			fx.leases = append(fx.leases, resp.LeaseId)
		}
		return err
	case 4:
		lease := "l-junk"
		if len(fx.leases) > 0 {
			lease = fx.leases[f.pick(len(fx.leases))]
		}
		return fx.c.Release(ctx, &pb.ReleaseRequest{LeaseId: pickOf(f, "", lease), TransferId: pickOf(f, fuzzTransfers...)})
	case 5:
		ns := fuzzSpec.Namespace(pickOf(f, "m", "m3"), 1+f.pick(2))
		if f.flag() {
			ns.HashSeedFingerprint = []byte("other")
		}
		_, err := fx.c.OpenNamespace(ctx, ns)
		return err
	default:
		return fx.c.Unregister(ctx, &pb.UnregisterRequest{InstanceId: pickOf(f, "fz-b", "nobody"), Rank: rank})
	}
}

// settle releases what the input pinned and checks that nothing leaked.
func (fx *fuzzEngine) settle(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for _, l := range fx.leases {
		_ = fx.c.Release(ctx, &pb.ReleaseRequest{LeaseId: l})
	}
	fx.leases = nil
	// In-process, as the router releases them: the input may have left
	// the session without the namespace usage an RPC release requires.
	for _, id := range fuzzTransfers[1:] {
		fx.eng.ReleaseTransfer(id)
	}
	h, err := fx.c.Health(ctx)
	require.NoError(t, err)
	require.Equal(t, "ok", h.Status)
	st := fx.eng.Stats()
	require.LessOrEqual(t, st.PoolUsedBytes, st.PoolCapacityBytes)
	require.Zero(t, st.PinnedBlocks, "pins left after releasing every lease and transfer")
	require.Zero(t, st.InflightBlocks)
	require.Eventually(t, func() bool { return runtime.NumGoroutine() <= fx.goroutines+32 }, 5*time.Second, 5*time.Millisecond,
		"goroutines grow: %d, %d at start", runtime.NumGoroutine(), fx.goroutines)
}

// FuzzServer sends random but well-typed requests through the real socket
// to a live engine: no call may crash the engine, hang past its deadline
// or fail other than with a client-error code, and nothing may leak.
func FuzzServer(f *testing.F) {
	fx := newFuzzEngine(f)
	f.Add([]byte{2, 0, 0, 3, 0, 0, 1, 1, 2, 2})                      // Load three saved blocks
	f.Add([]byte{2, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0})                // Load one block many times
	f.Add([]byte{1, 0, 0, 4, 3, 3, 4, 4, 5, 5, 6, 6, 1, 1, 0, 1, 1}) // Save with a transfer and a callback
	f.Add([]byte{3, 0, 0, 0, 3, 1, 1, 2, 4, 0, 1, 2, 3})             // Query with wait, transfer and lease
	f.Add([]byte{0, 0, 0, 0, 1, 1, 0, 0, 1, 2, 6, 2, 0})             // Register, then Unregister
	f.Fuzz(func(t *testing.T, data []byte) {
		in := fuzzBytes(data)
		for range 8 {
			if len(in) == 0 {
				break
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			start := time.Now()
			err := fx.call(ctx, &in)
			cancel()
			switch status.Code(err) {
			case codes.OK, codes.InvalidArgument, codes.NotFound, codes.FailedPrecondition, codes.ResourceExhausted:
			default:
				t.Fatalf("call failed with %v after %s", err, time.Since(start))
			}
		}
		fx.settle(t)
	})
}
