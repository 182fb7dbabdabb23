package peer

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"net"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"

	"github.com/pegaflow/pegaflow/engine"
	pb "github.com/pegaflow/pegaflow/engine/api/pegaflowv1"
	"github.com/pegaflow/pegaflow/internal/kvtest"
)

var streamToken = []byte("0123456789abcdef0123456789abcdef")

var streamSpec = kvtest.Spec{Layout: kvtest.FlashAttn, Layers: 2, NumBlocks: 8, BlockSize: 4, Heads: 2, HeadSize: 8, ElemSize: 2}

// servedEngine is an engine holding 4 sealed blocks (a producer's cache
// filled with known bytes), serving the peer port on loopback.
type servedEngine struct {
	eng    *engine.Engine
	addr   string
	cache  *kvtest.Cache
	nsID   string
	hashes [][]byte
	m      *streamMetrics
}

func serveEngine(t *testing.T) *servedEngine {
	t.Helper()
	eng, err := engine.New(engine.Config{PoolSize: 4 << 20, NUMANode: -1, Device: -1, Peers: NewClient(streamToken)}, nil, prometheus.NewRegistry())
	require.NoError(t, err)
	t.Cleanup(func() { _ = eng.Close() })
	cache, err := kvtest.New(kvtest.TempShmDir(t), "kv", streamSpec)
	require.NoError(t, err)
	t.Cleanup(cache.Close)
	ctx := context.Background()
	sid, err := eng.OpenSession("P")
	require.NoError(t, err)
	reg := cache.RegisterRequest("P", 0, streamSpec.Namespace("m", 1))
	reg.SessionId = sid
	rr, err := eng.Register(ctx, reg)
	require.NoError(t, err)
	s := &servedEngine{eng: eng, cache: cache, nsID: rr.NamespaceId, hashes: kvtest.Hashes("stream", 4)}
	refs := make([]*pb.BlockRef, 4)
	for i := range refs {
		cache.Fill(i, uint64(70+i))
		refs[i] = &pb.BlockRef{BlockId: uint32(i), Hash: s.hashes[i]}
	}
	_, err = eng.Save(ctx, &pb.SaveRequest{SessionId: sid, InstanceId: "P", Blocks: refs})
	require.NoError(t, err)

	mreg := prometheus.NewRegistry()
	srv, err := New(Config{Addr: "127.0.0.1:0", Token: streamToken, Registerer: mreg}, eng, nil)
	require.NoError(t, err)
	s.addr, s.m = srv.Addr(), srv.stream.m
	sctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(sctx) }()
	t.Cleanup(func() { cancel(); require.NoError(t, <-done) })
	return s
}

// open opens a transfer of the first n blocks over the control plane.
func (s *servedEngine) open(t *testing.T, c *Client, n int) *pb.PeerOpenTransferResponse {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := c.OpenTransfer(ctx, s.addr, &pb.PeerOpenTransferRequest{Epoch: s.eng.Epoch(), NamespaceId: s.nsID, Hashes: s.hashes[:n]})
	require.NoError(t, err)
	require.Len(t, resp.Blocks, n)
	return resp
}

// serveOpened is serveEngine with a reader holding the token and an open
// transfer of the first block.
func serveOpened(t *testing.T) (*servedEngine, *Client, *pb.PeerOpenTransferResponse) {
	t.Helper()
	s := serveEngine(t)
	good := NewClient(streamToken)
	t.Cleanup(func() { good.Close() })
	return s, good, s.open(t, good, 1)
}

func shareRead(x *pb.PeerExtent) engine.PeerShareRead {
	return engine.PeerShareRead{Ext: engine.PeerExtent{Pool: x.Pool, Offset: x.Offset, Len: x.Length}, Dst: make([]byte, x.Length)}
}

// An authenticated peer reads exactly the shares of the transfer it opened,
// and nothing else: not another block, not free pool memory, not an
// address past the pool (which would fault the engine if it were served).
// A refused read leaves the connection usable and the engine healthy.
func TestStreamReadsOnlyOpenedShares(t *testing.T) {
	s := serveEngine(t)
	c := NewClient(streamToken)
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	tr := s.open(t, c, 2)

	reads := []engine.PeerShareRead{shareRead(tr.Blocks[0].Shares[0]), shareRead(tr.Blocks[1].Shares[0])}
	require.NoError(t, c.Read(ctx, s.addr, tr.Handle, reads))
	for i, r := range reads {
		require.True(t, bytes.Equal(s.cache.BlockBytes(i), r.Dst), "block %d byte-exact", i)
	}

	other := s.open(t, c, 4) // blocks 2 and 3 are only in this one
	share := tr.Blocks[0].Shares[0]
	for name, x := range map[string]engine.PeerExtent{
		"a block of another transfer": {Pool: other.Blocks[3].Shares[0].Pool, Offset: other.Blocks[3].Shares[0].Offset, Len: share.Length},
		"free pool memory":            {Pool: 0, Offset: 3 << 20, Len: share.Length},
		"past the pool":               {Pool: 0, Offset: 1 << 40, Len: share.Length},
		"a share plus the next bytes": {Pool: share.Pool, Offset: share.Offset, Len: 2 * share.Length},
	} {
		dst := make([]byte, x.Len)
		err := c.Read(ctx, s.addr, tr.Handle, []engine.PeerShareRead{{Ext: x, Dst: dst}})
		require.ErrorIs(t, err, engine.ErrInvalid, name)
		require.Equal(t, make([]byte, x.Len), dst, "%s: no byte arrived", name)
	}
	err := c.Read(ctx, s.addr, "pt-guessed-handle", reads[:1])
	require.ErrorIs(t, err, engine.ErrNotFound)
	require.EqualValues(t, 4, testutil.ToFloat64(s.m.invalid))

	// The same connection still serves; a released transfer is gone.
	require.NoError(t, c.Read(ctx, s.addr, tr.Handle, reads[:1]))
	require.NoError(t, c.ReleaseTransfer(ctx, s.addr, tr.Handle))
	require.ErrorIs(t, c.Read(ctx, s.addr, tr.Handle, reads[:1]), engine.ErrNotFound)
	require.Equal(t, "ok", s.eng.Health().Status)
}

// A process that reaches the port without the token gets no byte of the
// pools and learns nothing of the token: the engine proves it holds the
// token first, and refuses a reader that cannot prove it back. A reader
// holding another token never sends its proof to that engine.
func TestStreamRefusesWithoutTheToken(t *testing.T) {
	s, _, tr := serveOpened(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	wrong := NewClient([]byte("another-token-another-token-another"))
	defer wrong.Close()
	read := shareRead(tr.Blocks[0].Shares[0])
	require.ErrorIs(t, wrong.Read(ctx, s.addr, tr.Handle, []engine.PeerShareRead{read}), engine.ErrPermission)
	require.Equal(t, make([]byte, len(read.Dst)), read.Dst)

	// By hand: a made-up proof, then the handle and extents anyway.
	conn, err := net.Dial("tcp", s.addr)
	require.NoError(t, err)
	defer conn.Close()
	require.NoError(t, conn.SetDeadline(time.Now().Add(10*time.Second)))
	_, err = conn.Write(append([]byte(streamMagic), make([]byte, nonceLen)...))
	require.NoError(t, err)
	hello := make([]byte, nonceLen+macLen)
	_, err = io.ReadFull(conn, hello)
	require.NoError(t, err)
	req := encodeRequest(nil, tr.Handle, []engine.PeerShareRead{read})
	_, err = conn.Write(append(make([]byte, macLen), req...))
	require.NoError(t, err)
	rest, _ := io.ReadAll(conn)
	require.Equal(t, verdict(1), rest, "a refusal, then the engine closed: no answer, no bytes")
	require.Eventually(t, func() bool { return testutil.ToFloat64(s.m.refused) >= 2 }, 5*time.Second, 10*time.Millisecond)
	require.Equal(t, "ok", s.eng.Health().Status)
}

// Malformed requests from an authenticated reader end its connection
// with at most an error answer: lengths are checked before anything is
// allocated for them, and the engine keeps serving.
func TestStreamMalformedRequests(t *testing.T) {
	s, good, tr := serveOpened(t)
	le32 := func(v uint32) []byte { return binary.LittleEndian.AppendUint32(nil, v) }
	for name, req := range map[string][]byte{
		"a 2 GiB handle":         le32(1 << 31),
		"an empty handle":        le32(0),
		"4G extents":             append(append(le32(uint32(len(tr.Handle))), tr.Handle...), le32(1<<32-1)...),
		"no extent":              append(append(le32(uint32(len(tr.Handle))), tr.Handle...), le32(0)...),
		"extents cut off":        append(append(le32(uint32(len(tr.Handle))), tr.Handle...), append(le32(3), make([]byte, 25)...)...),
		"a handle then silence.": append(le32(uint32(len(tr.Handle))), tr.Handle[:4]...),
	} {
		t.Run(name, func(t *testing.T) {
			sc, err := (&streams{token: streamToken, idle: map[string][]*streamConn{}}).dial(context.Background(), s.addr)
			require.NoError(t, err)
			defer sc.c.Close()
			require.NoError(t, sc.c.SetDeadline(time.Now().Add(30*time.Second)))
			_, err = sc.c.Write(req)
			require.NoError(t, err)
			if cw, ok := sc.c.(*net.TCPConn); ok {
				require.NoError(t, cw.CloseWrite())
			}
			rest, _ := io.ReadAll(sc.br)
			if len(rest) > 0 {
				answered, err := decodeStatus(bytes.NewReader(rest), s.addr)
				require.True(t, answered)
				require.ErrorIs(t, err, engine.ErrInvalid)
			}
		})
	}
	require.Equal(t, "ok", s.eng.Health().Status)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	read := shareRead(tr.Blocks[0].Shares[0])
	require.NoError(t, good.Read(ctx, s.addr, tr.Handle, []engine.PeerShareRead{read}))
	require.True(t, bytes.Equal(s.cache.BlockBytes(0), read.Dst))
}

// Everything the engine sends before the shares is a multiple of
// headAlign bytes (the kernel then copies the shares cache-line aligned),
// and every head still decodes to its status and message.
func TestStreamHeadsKeepTheSharesAligned(t *testing.T) {
	require.Len(t, verdict(0), headAlign)
	require.Equal(t, 64, nonceLen+macLen, "the engine's hello")
	for _, tc := range []struct {
		code uint32
		msg  string
		want error
	}{
		{statusOK, "", nil},
		{statusInvalid, "x", engine.ErrInvalid},
		{statusNotFound, string(make([]byte, 56)), engine.ErrNotFound},
		{statusFailed, string(make([]byte, 57)), engine.ErrPeerUnavailable},
		{statusInvalid, string(bytes.Repeat([]byte("m"), maxMessage+10)), engine.ErrInvalid},
	} {
		head := encodeStatus(tc.code, tc.msg)
		require.Zero(t, len(head)%headAlign, "head of a %d-byte message", len(tc.msg))
		r := bytes.NewReader(append(head, 0xAB))
		answered, err := decodeStatus(r, "peer")
		require.True(t, answered)
		if tc.want == nil {
			require.NoError(t, err)
		} else {
			require.ErrorIs(t, err, tc.want)
		}
		next, _ := r.ReadByte()
		require.Equal(t, byte(0xAB), next, "the head was read to its end, padding included")
	}
}

// A kept connection the peer closed while it sat idle (the peer engine
// restarted, or dropped it) costs the next read nothing: it is found
// closed before reuse and the read goes on a fresh connection.
func TestStreamReadSurvivesAStaleKeptConnection(t *testing.T) {
	s, _, tr := serveOpened(t)
	gone, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	go func() {
		c, err := gone.Accept()
		if err == nil {
			_ = c.Close() // the peer's side of an idle connection, closed
		}
	}()
	stale, err := net.Dial("tcp", gone.Addr().String())
	require.NoError(t, err)
	defer gone.Close()
	// The peer's FIN has arrived (as it has, long before, for an engine
	// that restarted).
	require.Eventually(t, func() bool {
		return !idleAlive(&streamConn{c: stale, br: bufio.NewReader(stale)})
	}, 5*time.Second, 5*time.Millisecond)
	st := &streams{token: streamToken, idle: map[string][]*streamConn{}}
	defer st.close()
	st.put(s.addr, &streamConn{c: stale, br: bufio.NewReader(stale)})

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	read := shareRead(tr.Blocks[0].Shares[0])
	require.NoError(t, st.read(ctx, s.addr, tr.Handle, []engine.PeerShareRead{read}))
	require.True(t, bytes.Equal(s.cache.BlockBytes(0), read.Dst))
}
