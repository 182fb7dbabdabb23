package main

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/pegaflow/pegaflow/engine"
)

// The baseline of the target over --peer-transport=tcp: the bytes the
// fetch moves, moved by plain Go net between two processes of this
// benchmark (-bare-tcp-writer, -bare-tcp-reader) with no PegaFlow code.
// The writer holds a buffer as large as A's pool; the reader reads each
// batch (the bytes of a query) as the fetch does: in chunks of whole
// blocks of ~8 MiB, all chunks of a batch in parallel, one connection
// each (kept from batch to batch, as the stream client keeps them), into
// a buffer as large as B's pool. Both sides advance through their buffers,
// so neither reads nor writes cache-hot memory. What the baseline leaves
// out is what the fetch adds: the query, OpenTransfer, the extents and
// their check, one status head per chunk and one read per share.

// fetchChunkBytes mirrors engine/fetch.go's chunk size (unexported there):
// a fetch reads about this many bytes of whole blocks per chunk.
const fetchChunkBytes = 8 << 20

// chunkBlocks is how many whole blocks of size bytes (one rank) one chunk
// of the fetch reads (engine/fetch.go readBlocks with TP 1).
func chunkBlocks(size int) int {
	return max(1, min(fetchChunkBytes/size, engine.MaxPeerReadExtents))
}

// bareTCPPlan is one size's two-process TCP baseline.
type bareTCPPlan struct {
	share, blocks, perChunk, batches, regionMiB int
}

func planBareTCP(size, batchMiB, totalMiB, poolMiB int) bareTCPPlan {
	return bareTCPPlan{share: size, blocks: max((batchMiB<<20)/size, 1), perChunk: chunkBlocks(size),
		batches: totalMiB / batchMiB, regionMiB: poolMiB}
}

// chunks is how many chunks, and so connections, one batch reads.
func (p bareTCPPlan) chunks() int { return (p.blocks + p.perChunk - 1) / p.perChunk }

func (p bareTCPPlan) writerArgs(host string) []string {
	return []string{"-bare-tcp-writer", "-host", host, "-pool-mib", strconv.Itoa(p.regionMiB)}
}

func (p bareTCPPlan) readerArgs() []string {
	return []string{"-bare-tcp-reader", "-share-bytes", strconv.Itoa(p.share), "-blocks", strconv.Itoa(p.blocks),
		"-chunk-blocks", strconv.Itoa(p.perChunk), "-batches", strconv.Itoa(p.batches), "-pool-mib", strconv.Itoa(p.regionMiB)}
}

// check refuses a plan the reader cannot run (a region too small for one
// batch's chunks).
func (p bareTCPPlan) check() error {
	if p.share <= 0 || p.blocks <= 0 || p.perChunk <= 0 || p.batches <= 0 || p.regionMiB <= 0 {
		return errors.New("bare tcp: need share-bytes, blocks, chunk-blocks, batches, pool-mib > 0")
	}
	if int64(p.blocks)*int64(p.share) > int64(p.regionMiB)<<20 {
		return fmt.Errorf("bare tcp: a batch of %d x %d bytes is larger than the %d MiB region", p.blocks, p.share, p.regionMiB)
	}
	return nil
}

// bareRequestLen is a reader's request: u64 offset, u64 length (LE).
const bareRequestLen = 16

// touchedBuffer allocates n bytes and writes every page (page i holds
// byte(i)^seed at its start), as the engines fault their pools in when
// they start.
func touchedBuffer(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := 0; i < n; i += 4096 {
		b[i] = byte(i>>12) ^ seed
	}
	return b
}

// runBareTCPWriter serves a pool-size buffer on host until stdin ends: it
// prints its address as its first line on stdout, then answers each
// request of each connection with the bytes it names.
func runBareTCPWriter(host string, poolBytes int, stdin io.Reader, stdout io.Writer) error {
	buf := touchedBuffer(poolBytes, 0)
	lis, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		return err
	}
	defer lis.Close()
	go func() {
		_, _ = io.Copy(io.Discard, stdin) // its end is the signal to exit
		_ = lis.Close()
	}()
	if _, err := fmt.Fprintln(stdout, lis.Addr().String()); err != nil {
		return err
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		c, err := lis.Accept()
		if err != nil {
			return nil // closed: stdin ended
		}
		wg.Go(func() { serveBareTCP(c, buf) })
	}
}

// serveBareTCP answers one reader's requests until it hangs up or asks for
// bytes outside buf.
func serveBareTCP(c net.Conn, buf []byte) {
	defer c.Close()
	var req [bareRequestLen]byte
	for {
		_ = c.SetDeadline(time.Now().Add(time.Minute))
		if _, err := io.ReadFull(c, req[:]); err != nil {
			return
		}
		off, n := binary.LittleEndian.Uint64(req[:]), binary.LittleEndian.Uint64(req[8:])
		if off > uint64(len(buf)) || n > uint64(len(buf))-off {
			fmt.Fprintf(os.Stderr, "bare tcp writer: request [%d, +%d) outside the %d-byte buffer\n", off, n, len(buf))
			return
		}
		if _, err := c.Write(buf[off : off+n]); err != nil {
			return
		}
	}
}

// bareTCPResult is what -bare-tcp-reader prints (one element, the same
// shape as benchmarks/native's initiator, so parseInitiatorJSON reads it).
type bareTCPResult struct {
	ShareBytes  int     `json:"share_bytes"`
	BatchBytes  int     `json:"batch_bytes"`
	ChunkBlocks int     `json:"chunk_blocks"`
	Conns       int     `json:"conns"`
	Batches     int     `json:"batches"`
	Seconds     float64 `json:"seconds"`
	GBps        float64 `json:"gbps"`
}

// runBareTCPReader reads the writer's address from in, then p.batches+1
// batches (the first a warm-up that also opens the connections), each
// batch's chunks in parallel over one connection each.
func runBareTCPReader(ctx context.Context, in io.Reader, p bareTCPPlan) (bareTCPResult, error) {
	if err := p.check(); err != nil {
		return bareTCPResult{}, err
	}
	line, err := bufio.NewReader(in).ReadString('\n')
	if err != nil {
		return bareTCPResult{}, fmt.Errorf("reading the writer's address: %w", err)
	}
	return readBatches(ctx, strings.TrimSpace(line), p, touchedBuffer(p.regionMiB<<20, 0xa5))
}

// readBatches is the reader's timed part, into dst (p.regionMiB large).
func readBatches(ctx context.Context, addr string, p bareTCPPlan, dst []byte) (bareTCPResult, error) {
	region := len(dst)
	conns := make([]net.Conn, p.chunks())
	defer func() {
		for _, c := range conns {
			if c != nil {
				_ = c.Close()
			}
		}
	}()
	batchBytes := p.blocks * p.share
	var remote, local int // advance through both regions, wrapping per batch
	var t0 time.Time
	for b := -1; b < p.batches; b++ {
		if b == 0 {
			t0 = time.Now()
		}
		if remote+batchBytes > region {
			remote = 0
		}
		if local+batchBytes > region {
			local = 0
		}
		errs := make([]error, len(conns))
		var wg sync.WaitGroup
		for c := range conns {
			first, n := c*p.perChunk, min(p.perChunk, p.blocks-c*p.perChunk)
			off, size := first*p.share, n*p.share
			wg.Go(func() {
				errs[c] = readBareChunk(ctx, &conns[c], addr, uint64(remote+off), dst[local+off:local+off+size])
			})
		}
		wg.Wait()
		if err := errors.Join(errs...); err != nil {
			return bareTCPResult{}, err
		}
		remote += batchBytes
		local += batchBytes
	}
	secs := time.Since(t0).Seconds()
	return bareTCPResult{ShareBytes: p.share, BatchBytes: batchBytes, ChunkBlocks: p.perChunk, Conns: len(conns),
		Batches: p.batches, Seconds: secs, GBps: float64(batchBytes) * float64(p.batches) / secs / 1e9}, nil
}

// readBareChunk asks the writer for len(dst) bytes at remote and reads
// them into dst, dialling *c first if it is not open yet (the warm-up).
func readBareChunk(ctx context.Context, c *net.Conn, addr string, remote uint64, dst []byte) error {
	if *c == nil {
		var d net.Dialer
		conn, err := d.DialContext(ctx, "tcp", addr)
		if err != nil {
			return err
		}
		_ = conn.(*net.TCPConn).SetNoDelay(true) // as the stream client does
		*c = conn
	}
	_ = (*c).SetDeadline(time.Now().Add(time.Minute))
	var req [bareRequestLen]byte
	binary.LittleEndian.PutUint64(req[:], remote)
	binary.LittleEndian.PutUint64(req[8:], uint64(len(dst)))
	if _, err := (*c).Write(req[:]); err != nil {
		return fmt.Errorf("bare tcp request: %w", err)
	}
	if _, err := io.ReadFull(*c, dst); err != nil {
		return fmt.Errorf("bare tcp read of %d bytes: %w", len(dst), err)
	}
	return nil
}

// bareTCPMain runs one of the two baseline processes (main's hidden modes)
// and returns the exit code.
func bareTCPMain(writer bool, host string, p bareTCPPlan) int {
	if writer {
		if p.regionMiB <= 0 {
			fmt.Fprintln(os.Stderr, "bench-peer: -bare-tcp-writer needs -pool-mib > 0")
			return 2
		}
		if err := runBareTCPWriter(host, p.regionMiB<<20, os.Stdin, os.Stdout); err != nil {
			fmt.Fprintln(os.Stderr, "bench-peer: bare tcp writer:", err)
			return 1
		}
		return 0
	}
	if err := p.check(); err != nil {
		fmt.Fprintln(os.Stderr, "bench-peer:", err)
		return 2
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	r, err := runBareTCPReader(ctx, os.Stdin, p)
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench-peer: bare tcp reader:", err)
		return 1
	}
	js, _ := json.Marshal([]bareTCPResult{r})
	fmt.Println(string(js))
	return 0
}
