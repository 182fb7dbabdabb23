package engine

import (
	"context"
	"testing"

	"github.com/stretchr/testify/require"

	pb "github.com/pegaflow/pegaflow/engine/api/pegaflowv1"
	"github.com/pegaflow/pegaflow/internal/kvtest"
)

// A validated read serves exactly the shares of the transfer it names:
// anything else a reader could name (free pool memory, another transfer's
// blocks, a share shifted by a byte, beyond the pool, a released handle)
// is refused before a byte is served.
func TestPeerReadServesOnlyTheTransfersShares(t *testing.T) {
	pp := newPeerPair(t)
	a, p := pp.a, pp.p
	hashes := kvtest.Hashes("read", 4)
	for i := range 4 {
		p.cache.Fill(i, uint64(40+i))
	}
	p.save(t, seq(0, 4), hashes, "", false)
	open := func(hs [][]byte) *pb.PeerOpenTransferResponse {
		resp, err := a.OpenPeerTransfer(context.Background(), &pb.PeerOpenTransferRequest{Epoch: a.Epoch(), NamespaceId: p.nsID, Hashes: hs})
		require.NoError(t, err)
		return resp
	}
	mine, other := open(hashes[:2]), open(hashes[2:])
	ext := func(b *pb.PeerBlock) PeerExtent {
		return PeerExtent{Pool: b.Shares[0].Pool, Offset: b.Shares[0].Offset, Len: b.Shares[0].Length}
	}
	share := ext(mine.Blocks[0])

	rd, err := a.OpenPeerRead(mine.Handle, []PeerExtent{share, ext(mine.Blocks[1])})
	require.NoError(t, err)
	require.Len(t, rd.Src, 2)
	dst := make([]byte, len(rd.Src[0]))
	copy(dst, rd.Src[0])
	rd.Done()

	for name, x := range map[string]PeerExtent{
		"another transfer's share": ext(other.Blocks[0]),
		"shifted by one byte":      {Pool: share.Pool, Offset: share.Offset + 1, Len: share.Len},
		"longer than a share":      {Pool: share.Pool, Offset: share.Offset, Len: share.Len + 1},
		"shorter than a share":     {Pool: share.Pool, Offset: share.Offset, Len: share.Len - 1},
		"free pool memory":         {Pool: 0, Offset: 7 << 20, Len: share.Len},
		"beyond the pool":          {Pool: 0, Offset: 1 << 62, Len: share.Len},
		"a pool that is not there": {Pool: 9, Offset: share.Offset, Len: share.Len},
	} {
		_, err := a.OpenPeerRead(mine.Handle, []PeerExtent{share, x})
		require.ErrorIs(t, err, ErrInvalid, name)
	}
	_, err = a.OpenPeerRead("pt-guessed", []PeerExtent{share})
	require.ErrorIs(t, err, ErrNotFound)
	_, err = a.OpenPeerRead(mine.Handle, nil)
	require.ErrorIs(t, err, ErrInvalid)
	_, err = a.OpenPeerRead(mine.Handle, make([]PeerExtent, MaxPeerReadExtents+1))
	require.ErrorIs(t, err, ErrInvalid)

	// A read being sent keeps its blocks pinned past the release; a new
	// read of the released handle is refused.
	rd, err = a.OpenPeerRead(mine.Handle, []PeerExtent{share})
	require.NoError(t, err)
	require.NoError(t, a.ReleasePeerTransfer(mine.Handle))
	require.NoError(t, a.ReleasePeerTransfer(other.Handle))
	require.EqualValues(t, 2, a.Stats().PinnedBlocks, "the read in flight holds its transfer's blocks")
	_, err = a.OpenPeerRead(mine.Handle, []PeerExtent{share})
	require.ErrorIs(t, err, ErrNotFound)
	require.Equal(t, dst, rd.Src[0])
	rd.Done()
	require.Zero(t, a.Stats().PinnedBlocks)
}
