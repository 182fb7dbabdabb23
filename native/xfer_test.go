//go:build !noucx

package native

import (
	"context"
	"encoding/json"
	"io"
	"os"
	"os/exec"
	"strconv"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/stretchr/testify/require"
)

// The peer side of the two-process tests runs in a re-executed test binary
// (TestXferPeerProcess with peerEnv set): it registers a patterned buffer,
// writes its blobs to fd 3 and serves reads until its stdin closes.
const peerEnv = "PEGAFLOW_XFER_TEST_PEER_BYTES"

type peerBlobs struct {
	Addr []byte `json:"addr"`
	RKey []byte `json:"rkey"`
	Base uint64 `json:"base"`
	Size uint64 `json:"size"`
}

func pattern(i uint64) byte { return byte(i*131 + i>>12 + 7) }

// mapMem is memory Go does not manage, as RegisterMemory requires.
func mapMem(t testing.TB, size int) []byte {
	t.Helper()
	b, err := syscall.Mmap(-1, 0, size, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_PRIVATE|syscall.MAP_ANON)
	require.NoError(t, err)
	t.Cleanup(func() { _ = syscall.Munmap(b) })
	return b
}

func register(t testing.TB, a *XferAgent, b []byte) *XferMem {
	t.Helper()
	m, err := a.RegisterMemory(unsafe.Pointer(&b[0]), uint64(len(b)))
	require.NoError(t, err)
	t.Cleanup(func() { _ = m.Close() })
	return m
}

func newAgent(t testing.TB) *XferAgent {
	t.Helper()
	a, err := NewXferAgent()
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, a.Close()) })
	return a
}

func TestXferPeerProcess(t *testing.T) {
	size, err := strconv.Atoi(os.Getenv(peerEnv))
	if err != nil {
		t.Skip("the peer side of the two-process transfer tests")
	}
	a := newAgent(t)
	buf := mapMem(t, size)
	for i := range buf {
		buf[i] = pattern(uint64(i))
	}
	m := register(t, a, buf)
	out := os.NewFile(3, "blobs")
	require.NoError(t, json.NewEncoder(out).Encode(peerBlobs{a.Address(), m.RKey(), m.Base(), m.Size()}))
	require.NoError(t, out.Close())
	_, _ = io.Copy(io.Discard, os.Stdin) // serve until the test closes stdin
}

type peerProc struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	blobs peerBlobs
}

func startPeer(t *testing.T, size int) *peerProc {
	t.Helper()
	t.Setenv("UCX_TLS", "tcp")
	r, w, err := os.Pipe()
	require.NoError(t, err)
	cmd := exec.Command(os.Args[0], "-test.run=^TestXferPeerProcess$", "-test.count=1")
	cmd.Env = append(os.Environ(), peerEnv+"="+strconv.Itoa(size))
	cmd.ExtraFiles = []*os.File{w}
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())
	w.Close()
	pp := &peerProc{cmd: cmd, stdin: stdin}
	t.Cleanup(func() {
		stdin.Close()
		done := make(chan struct{})
		go func() { _ = cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
	})
	require.NoError(t, json.NewDecoder(r).Decode(&pp.blobs))
	r.Close()
	return pp
}

func (pp *peerProc) connect(t *testing.T, a *XferAgent) (*XferPeer, RemoteRegion) {
	t.Helper()
	p, err := a.Connect(pp.blobs.Addr)
	require.NoError(t, err)
	t.Cleanup(func() { _ = p.Close() })
	id, err := p.AddRemoteRegion(pp.blobs.RKey, pp.blobs.Base, pp.blobs.Size)
	require.NoError(t, err)
	return p, id
}

// bigBatch reads 8 GiB (2 MiB at a time, local extents reused): seconds of
// work over loopback TCP, so it is surely in flight when the test acts.
func bigBatch(remote, local uint64) []XferOp {
	const ext = 2 << 20
	ops := make([]XferOp, 4096)
	for i := range ops {
		ops[i] = XferOp{RemoteOffset: uint64(i) % (remote / ext) * ext, LocalOffset: uint64(i) % (local / ext) * ext, Len: ext}
	}
	return ops
}

func TestXferTwoProcesses(t *testing.T) {
	const remoteSize, localSize = 32 << 20, 16 << 20
	pp := startPeer(t, remoteSize)
	a := newAgent(t)
	local := mapMem(t, localSize)
	m := register(t, a, local)
	p, region := pp.connect(t, a)
	ctx := context.Background()

	t.Run("byte exact", func(t *testing.T) {
		for ext := uint64(16 << 10); ext <= 2<<20; ext *= 2 {
			n := localSize / ext
			slots := remoteSize / ext
			ops := make([]XferOp, n)
			for i := range ops {
				// Scattered remote extents (7 is coprime with the power-of-two slot count).
				ops[i] = XferOp{RemoteOffset: (uint64(i)*7 + 3) % slots * ext, LocalOffset: uint64(i) * ext, Len: ext}
			}
			clear(local)
			start := time.Now()
			require.NoError(t, p.Get(ctx, region, m, ops), "extent %d", ext)
			t.Logf("%7d KiB extents: %.2f GB/s", ext>>10, float64(localSize)/time.Since(start).Seconds()/1e9)
			for _, op := range ops {
				for j := uint64(0); j < op.Len; j++ {
					if local[op.LocalOffset+j] != pattern(op.RemoteOffset+j) {
						require.Failf(t, "byte mismatch", "extent %d: local %d remote %d", ext, op.LocalOffset+j, op.RemoteOffset+j)
					}
				}
			}
		}
	})

	t.Run("refusals", func(t *testing.T) {
		for _, tc := range []struct {
			name   string
			region RemoteRegion
			ops    []XferOp
			want   error
		}{
			{"remote extent past advertised size", region, []XferOp{{0, 0, 4096}, {remoteSize - 4096, 0, 8192}}, ErrRange},
			{"remote offset wraps", region, []XferOp{{^uint64(0) - 1, 0, 4096}}, ErrRange},
			{"local extent past memory", region, []XferOp{{0, localSize - 1, 2}}, ErrRange},
			{"local offset wraps", region, []XferOp{{0, ^uint64(0), 1}}, ErrRange},
			{"unknown region", region + 1, []XferOp{{0, 0, 4096}}, ErrInvalid},
			{"too many ops", region, make([]XferOp, MaxXferOps+1), ErrInvalid},
		} {
			t.Run(tc.name, func(t *testing.T) {
				require.ErrorIs(t, p.Get(ctx, tc.region, m, tc.ops), tc.want)
			})
		}
		_, err := p.AddRemoteRegion(pp.blobs.RKey, ^uint64(0)-10, 4096)
		require.ErrorIs(t, err, ErrInvalid)
		require.ErrorIs(t, p.Get(ctx, region, nil, nil), ErrInvalid)
		require.NoError(t, p.Err()) // refusals leave the peer usable
		require.NoError(t, p.Get(ctx, region, m, []XferOp{{0, 0, 4096}}))
	})

	t.Run("ctx cancel ends the batch, peer stays usable", func(t *testing.T) {
		// Well within the grace: the window drained, no force needed.
		requireCancelled(t, p, region, m, bigBatch(remoteSize, localSize), XferCancelGrace)
		require.NoError(t, p.Err())
		requireRead(t, p, region, m, local, 5<<20)
	})

	t.Run("peer that stops answering: forced after the grace", func(t *testing.T) {
		require.NoError(t, pp.cmd.Process.Signal(syscall.SIGSTOP))
		defer pp.cmd.Process.Signal(syscall.SIGCONT) //nolint:errcheck // best effort; cleanup kills it
		requireCancelled(t, p, region, m, bigBatch(remoteSize, localSize), XferCancelGrace+2*time.Second)
		require.ErrorIs(t, p.Err(), ErrPeer)
		require.ErrorIs(t, p.Get(ctx, region, m, []XferOp{{0, 0, 4096}}), ErrPeer)
		require.NoError(t, pp.cmd.Process.Signal(syscall.SIGCONT))

		// A new endpoint to the same peer works.
		p2, region2 := pp.connect(t, a)
		requireRead(t, p2, region2, m, local, 3<<20)
	})
}

// requireCancelled runs ops under a 150 ms deadline: Get must fail with
// the deadline and ErrCanceled within limit.
func requireCancelled(t *testing.T, p *XferPeer, region RemoteRegion, m *XferMem, ops []XferOp, limit time.Duration) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 150*time.Millisecond)
	defer cancel()
	start := time.Now()
	err := p.Get(ctx, region, m, ops)
	require.ErrorIs(t, err, context.DeadlineExceeded)
	require.ErrorIs(t, err, ErrCanceled)
	require.Less(t, time.Since(start), limit)
}

// requireRead reads 1 MiB at remote offset off into local[0:] and checks it.
func requireRead(t *testing.T, p *XferPeer, region RemoteRegion, m *XferMem, local []byte, off uint64) {
	t.Helper()
	clear(local[:1<<20])
	require.NoError(t, p.Get(context.Background(), region, m, []XferOp{{off, 0, 1 << 20}}))
	for j := range uint64(1 << 20) {
		if local[j] != pattern(off+j) {
			require.Failf(t, "byte mismatch", "offset %d", j)
		}
	}
}

func TestXferPeerKilledMidBatch(t *testing.T) {
	const remoteSize, localSize = 32 << 20, 16 << 20
	pp := startPeer(t, remoteSize)
	a := newAgent(t)
	m := register(t, a, mapMem(t, localSize))
	p, region := pp.connect(t, a)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	require.NoError(t, p.Get(ctx, region, m, []XferOp{{0, 0, 4096}})) // connected

	errc := make(chan error, 1)
	go func() { errc <- p.Get(ctx, region, m, bigBatch(remoteSize, localSize)) }()
	time.Sleep(200 * time.Millisecond)
	require.NoError(t, pp.cmd.Process.Kill())
	killed := time.Now()
	select {
	case err := <-errc:
		require.ErrorIs(t, err, ErrPeer)
		require.NotErrorIs(t, err, context.DeadlineExceeded)
		t.Logf("killed peer -> %v after %v", err, time.Since(killed))
	case <-ctx.Done():
		require.Fail(t, "Get hung past its deadline after the peer was killed")
	}
	require.ErrorIs(t, p.Err(), ErrPeer)
}

// The pool as registered memory (target in this process), and Close of the
// agent with a Get in flight (target in another).
func TestXferLocalAgents(t *testing.T) {
	t.Setenv("UCX_TLS", "tcp")
	src, dst := newAgent(t), newAgent(t)
	remote := mapMem(t, 32<<20)
	for i := range remote {
		remote[i] = pattern(uint64(i))
	}
	rm := register(t, src, remote)
	m := register(t, dst, mapMem(t, 16<<20))
	p, err := dst.Connect(src.Address())
	require.NoError(t, err)
	region, err := p.AddRemoteRegion(rm.RKey(), rm.Base(), rm.Size())
	require.NoError(t, err)

	t.Run("pool", func(t *testing.T) {
		pool, err := NewPool(4<<20, -1, 0, 0)
		if err != nil {
			t.Skipf("no pool in this build/machine: %v", err)
		}
		pm, err := dst.RegisterPool(pool)
		require.NoError(t, err)
		require.ErrorIs(t, pool.Close(), ErrClosed) // registered: held
		require.NoError(t, p.Get(context.Background(), region, pm, []XferOp{{1 << 20, 0, 4 << 20}}))
		require.Equal(t, remote[1<<20:5<<20], pool.Bytes())
		require.NoError(t, pm.Close())
		require.NoError(t, pool.Close())
	})

	// The target is another process: UCX over TCP may abort a target whose
	// reader tears down mid-read (see XferCancelGrace), and that must not
	// be this test binary.
	t.Run("agent close ends in-flight gets", func(t *testing.T) {
		pp := startPeer(t, 32<<20)
		p, region := pp.connect(t, dst)
		errc := make(chan error, 1)
		go func() { errc <- p.Get(context.Background(), region, m, bigBatch(32<<20, 16<<20)) }()
		time.Sleep(100 * time.Millisecond)
		require.NoError(t, dst.Close())
		select {
		case err := <-errc:
			require.ErrorIs(t, err, ErrCanceled)
		case <-time.After(10 * time.Second):
			require.Fail(t, "Get still running after the agent closed")
		}
		require.ErrorIs(t, p.Get(context.Background(), region, m, nil), ErrClosed)
		_, err := dst.Connect(src.Address())
		require.ErrorIs(t, err, ErrClosed)
	})
}
