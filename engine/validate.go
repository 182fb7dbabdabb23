package engine

import (
	"fmt"
	"math/bits"
	"net"
	"net/url"
	"path/filepath"
	"slices"

	pb "github.com/pegaflow/pegaflow/engine/api/pegaflowv1"
	"github.com/pegaflow/pegaflow/internal/hostport"
)

// Limits on requests. They bound the memory and time one call can take.
const (
	MinHashLen      = 8
	MaxHashLen      = 64
	MaxTPSize       = 64 // rank sets are uint64 bitmasks
	MaxLayers       = 4096
	MaxSegments     = 16
	MaxRegions      = 4096
	MaxIDLen        = 256
	MaxBlocksPerReq = 1 << 20
	MaxQueryHashes  = 1 << 20
	// MaxRankBlockBytes caps one rank's share of a block (all layers).
	MaxRankBlockBytes = 1 << 30
)

type segmentSpec struct {
	offset, stride, length uint64
}

type layerSpec struct {
	name     string
	region   int
	group    uint32 // KV cache group index (0 without groups)
	segments []segmentSpec
}

type regionSpec struct {
	shmPath    string
	ipcHandle  []byte
	size       uint64
	deviceUUID string
}

// rankLayout is a validated RegisterRequest: every block id below numBlocks
// maps to byte ranges that lie inside its region.
type rankLayout struct {
	numBlocks uint32
	regions   []regionSpec
	layers    []layerSpec
	// rankBytes is the rank's bytes of a block of every group together;
	// groupBytes those of one group's block.
	rankBytes  uint64
	groupBytes map[uint32]uint64
	// groupLayers lists each group's layers (indices into layers): the
	// ones a block of that group copies.
	groupLayers map[uint32][]int
	// device is the normalised UUID of the rank's GPU and gpuIndex its NVML
	// index, set at registration in CUDA mode ("" when regions name none).
	device   string
	gpuIndex int
}

// blockShape lists segment lengths per layer: what must agree across the
// ranks and instances of a namespace.
func (l *rankLayout) blockShape() [][]uint64 {
	shape := make([][]uint64, len(l.layers))
	for i, layer := range l.layers {
		for _, s := range layer.segments {
			shape[i] = append(shape[i], s.length)
		}
	}
	return shape
}

func invalid(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrInvalid, fmt.Sprintf(format, args...))
}

func validateID(what, id string) error {
	if id == "" {
		return invalid("%s is empty", what)
	}
	if len(id) > MaxIDLen {
		return invalid("%s is longer than %d bytes", what, MaxIDLen)
	}
	return nil
}

func validateNamespace(ns *Namespace) error {
	switch {
	case ns == nil:
		return invalid("namespace is missing")
	case ns.Model == "":
		return invalid("namespace.model is empty")
	case ns.BlockSize == 0:
		return invalid("namespace.block_size is 0")
	case ns.TPSize == 0 || ns.TPSize > MaxTPSize:
		return invalid("namespace.tp_size %d not in 1..%d", ns.TPSize, MaxTPSize)
	case len(ns.HashSeedFingerprint) > MaxHashLen:
		return invalid("namespace.hash_seed_fingerprint longer than %d bytes", MaxHashLen)
	}
	return validateGroups(ns)
}

// validateRegister checks a registration without touching any state and
// turns it into engine terms. The pool size bounds a block's size.
func validateRegister(req *pb.RegisterRequest, poolSize uint64) (*registration, error) {
	if err := validateID("instance_id", req.GetInstanceId()); err != nil {
		return nil, err
	}
	ns := namespaceFromPB(req.GetNamespace())
	if err := validateNamespace(ns); err != nil {
		return nil, err
	}
	if req.Rank >= ns.TPSize {
		return nil, invalid("rank %d out of range for tp_size %d", req.Rank, ns.TPSize)
	}
	if req.NumBlocks == 0 {
		return nil, invalid("num_blocks is 0")
	}
	if n := len(req.Regions); n == 0 || n > MaxRegions {
		return nil, invalid("%d regions, want 1..%d", n, MaxRegions)
	}
	if n := len(req.Layers); n == 0 || n > MaxLayers {
		return nil, invalid("%d layers, want 1..%d", n, MaxLayers)
	}
	if ns.NumLayers != 0 && int(ns.NumLayers) != len(req.Layers) {
		return nil, invalid("namespace.num_layers is %d but %d layers given", ns.NumLayers, len(req.Layers))
	}
	layout := &rankLayout{numBlocks: req.NumBlocks, groupBytes: map[uint32]uint64{}, groupLayers: map[uint32][]int{}}
	listed := map[uint32]bool{0: len(ns.Groups) == 0}
	for _, g := range ns.Groups {
		listed[g.Index] = true
	}
	for i, r := range req.Regions {
		spec := regionSpec{size: r.GetSize(), deviceUUID: r.GetDeviceUuid()}
		switch src := r.GetSource().(type) {
		case *pb.MemoryRegion_ShmPath:
			if !filepath.IsAbs(src.ShmPath) || len(src.ShmPath) > 4096 {
				return nil, invalid("region %d: shm_path %q must be an absolute path", i, src.ShmPath)
			}
			spec.shmPath = filepath.Clean(src.ShmPath)
		case *pb.MemoryRegion_CudaIpcHandle:
			if len(src.CudaIpcHandle) == 0 || len(src.CudaIpcHandle) > 128 {
				return nil, invalid("region %d: cuda_ipc_handle has %d bytes", i, len(src.CudaIpcHandle))
			}
			spec.ipcHandle = src.CudaIpcHandle
		default:
			return nil, invalid("region %d: no shm_path or cuda_ipc_handle", i)
		}
		if spec.size == 0 {
			return nil, invalid("region %d: size is 0", i)
		}
		layout.regions = append(layout.regions, spec)
	}
	last := uint64(req.NumBlocks - 1)
	var total uint64
	for li, l := range req.Layers {
		if int(l.RegionIndex) >= len(layout.regions) {
			return nil, invalid("layer %d (%s): region_index %d out of range", li, l.Name, l.RegionIndex)
		}
		if n := len(l.Segments); n == 0 || n > MaxSegments {
			return nil, invalid("layer %d (%s): %d segments, want 1..%d", li, l.Name, n, MaxSegments)
		}
		if !listed[l.Group] {
			return nil, invalid("layer %d (%s): group %d is not a group of the namespace", li, l.Name, l.Group)
		}
		regionSize := layout.regions[l.RegionIndex].size
		spec := layerSpec{name: l.Name, region: int(l.RegionIndex), group: l.Group}
		for si, s := range l.Segments {
			if s.Length == 0 {
				return nil, invalid("layer %d segment %d: length is 0", li, si)
			}
			if req.NumBlocks > 1 && s.Stride < s.Length {
				return nil, invalid("layer %d segment %d: stride %d < length %d makes blocks overlap", li, si, s.Stride, s.Length)
			}
			// end = offset + last*stride + length, checked for overflow.
			hi, span := bits.Mul64(last, s.Stride)
			end, c1 := bits.Add64(span, s.Offset, 0)
			end, c2 := bits.Add64(end, s.Length, 0)
			if hi != 0 || c1 != 0 || c2 != 0 || end > regionSize {
				return nil, invalid("layer %d segment %d: blocks 0..%d reach past region %d (size %d)", li, si, last, l.RegionIndex, regionSize)
			}
			var carry uint64
			total, carry = bits.Add64(total, s.Length, 0)
			if carry != 0 || total > MaxRankBlockBytes {
				return nil, invalid("bytes per block per rank exceed %d", MaxRankBlockBytes)
			}
			spec.segments = append(spec.segments, segmentSpec{s.Offset, s.Stride, s.Length})
			layout.groupBytes[l.Group] += s.Length
		}
		layout.groupLayers[l.Group] = append(layout.groupLayers[l.Group], len(layout.layers))
		layout.layers = append(layout.layers, spec)
	}
	for _, g := range ns.Groups {
		if len(layout.groupLayers[g.Index]) == 0 {
			return nil, invalid("group %d (%s) has no layer", g.Index, g.Kind)
		}
	}
	layout.rankBytes = total
	if hi, blockBytes := bits.Mul64(total, uint64(ns.TPSize)); hi != 0 || blockBytes > poolSize {
		return nil, invalid("a block (%d bytes x %d ranks) does not fit the pool (%d bytes)", total, ns.TPSize, poolSize)
	}
	return &registration{sessionID: req.SessionId, instanceID: req.InstanceId, rank: req.Rank, ns: ns, layout: layout,
		event: req.GetCudaIpcEvent()}, nil
}

// validateBlocks checks a Save's or Load's block refs against the
// instance's block count and its namespace's groups. A call names each
// (group, hash) and each block id at most once: a repeated hash copies
// the same block again for nothing (a Load of one hash 1,000 times was an
// out-of-memory), a repeated block id makes two copies race on one cache
// block (vLLM's block ids are unique across groups, and the layers of
// two groups may share memory, so ids are unique across the call). So a
// call has at most numBlocks refs (bounds.go).
func validateBlocks(ns *namespace, blocks []*pb.BlockRef, numBlocks uint32) error {
	if len(blocks) > MaxBlocksPerReq {
		return invalid("%d blocks in one request, max %d", len(blocks), MaxBlocksPerReq)
	}
	for i, b := range blocks {
		if b == nil {
			return invalid("block %d is null", i)
		}
		if b.BlockId >= numBlocks {
			return invalid("block %d: block_id %d out of range (instance has %d blocks)", i, b.BlockId, numBlocks)
		}
		if err := validateHash(i, b.Hash); err != nil {
			return err
		}
		if ns.group(b.Group) == nil {
			return groupErr(ns, i, b.Group)
		}
	}
	// Without repeats there are at most numBlocks refs: more has one.
	if uint64(len(blocks)) > uint64(numBlocks) {
		return invalid("%d blocks in one call, more than the instance's %d", len(blocks), numBlocks)
	}
	ids := make([]uint32, len(blocks))
	type key struct {
		group uint32
		hash  string
	}
	hashes := make(map[key]struct{}, len(blocks))
	for i, b := range blocks {
		ids[i] = b.BlockId
		k := key{b.Group, string(b.Hash)}
		if _, dup := hashes[k]; dup {
			return invalid("block %d: hash %x of group %d repeated in one call", i, b.Hash, b.Group)
		}
		hashes[k] = struct{}{}
	}
	slices.Sort(ids)
	for i := 1; i < len(ids); i++ {
		if ids[i] == ids[i-1] {
			return invalid("block_id %d repeated in one call", ids[i])
		}
	}
	return nil
}

// validateCopyOps refuses a Save or Load of n blocks of perBlock copy ops
// each of which only fit fit the engine's whole budget
// (copyBudget.reserve): it could never run. (A peer fetch reads the
// blocks that fit instead.)
func validateCopyOps(n, fit, perBlock int, max int64) error {
	if fit < n {
		return invalid("%d blocks x %d copy ops per block is more than the engine's %d copy ops per call (--max-copy-ops); split the call",
			n, perBlock, max)
	}
	return nil
}

// validateSave checks what a Save names besides its blocks (those are
// checked against its instance, validateBlocks): the transfer id, its
// token and its ready_url, which --kv-ready-allow must admit.
func (e *Engine) validateSave(req *pb.SaveRequest) error {
	if req.TransferId == "" {
		return nil
	}
	if err := validateTransfer(req.TransferId, req.ReadyToken); err != nil || req.ReadyUrl == "" {
		return err
	}
	return e.checkReadyURL(req.ReadyUrl)
}

// checkReadyURL validates a Save's ready_url against --kv-ready-allow.
func (e *Engine) checkReadyURL(readyURL string) error {
	u, err := url.Parse(readyURL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return invalid("ready_url %q is not an http(s) URL", readyURL)
	}
	if _, ok := readyPath(u); !ok {
		return invalid("ready_url %q: dot segments (. ..) and encoded slashes (%%2f %%5c) are refused (--kv-ready-allow)", readyURL)
	}
	if e.readyAllow.admitsURL(u) {
		return nil
	}
	return refused(e.readyAllow, "ready_url", readyURL, "start the engine with --kv-ready-allow naming the router's /kv_ready address")
}

// checkSourceEngine refuses a source_engine (a valid host:port) that
// --peer-allow does not list, before anything dials it.
func (e *Engine) checkSourceEngine(addr string) error {
	host, port, _ := net.SplitHostPort(addr)
	if e.peerAllow.admitsAddr(host, port) {
		return nil
	}
	return refused(e.peerAllow, "source_engine", addr, "this engine sends its peer token only to listed peers; "+
		"start it with --peer-allow naming the peer engines' --peer-addr")
}

// refused is the error for a value allowlist l does not admit; hint says
// what to do.
func refused(l *allowlist, what, value, hint string) error {
	return invalid("%s %q is not allowed by the engine's %s (%s); %s", what, value, l.flag, l.text, hint)
}

func validateTransfer(id, token string) error {
	if err := validateID("transfer_id", id); err != nil {
		return err
	}
	if len(token) > MaxIDLen {
		return invalid("ready_token longer than %d bytes", MaxIDLen)
	}
	return nil
}

// validatePeerOpen checks a peer's OpenTransfer: at most
// MaxPeerOpenHashes valid hashes and, if named, a valid transfer id.
func validatePeerOpen(req *pb.PeerOpenTransferRequest) error {
	if len(req.Hashes) > MaxPeerOpenHashes {
		return invalid("%d hashes in one transfer, max %d", len(req.Hashes), MaxPeerOpenHashes)
	}
	for i, h := range req.Hashes {
		if err := validateHash(i, h); err != nil {
			return err
		}
	}
	if req.TransferId == "" {
		return nil
	}
	return validateTransfer(req.TransferId, "")
}

// validateRelease: a Release names a lease, a transfer or both.
func validateRelease(req *pb.ReleaseRequest) error {
	if req.LeaseId == "" && req.TransferId == "" {
		return invalid("release needs lease_id or transfer_id")
	}
	return nil
}

// validatePeerAddr checks a peer engine address with the router's own
// host:port check (internal/hostport): what one accepts, so does the other.
func validatePeerAddr(what, addr string) error {
	if err := hostport.Check(addr); err != nil {
		return invalid("%s %q is not host:port: %v", what, addr, err)
	}
	return nil
}

func validateHash(i int, h []byte) error {
	if len(h) < MinHashLen || len(h) > MaxHashLen {
		return invalid("hash %d has %d bytes, want %d..%d", i, len(h), MinHashLen, MaxHashLen)
	}
	return nil
}

// queryHashes returns the query's hashes from either encoding, validated.
// Packed hashes are sliced in place, without copying.
func queryHashes(req *pb.QueryRequest) ([][]byte, error) {
	if len(req.PackedHashes) == 0 {
		if len(req.Hashes) > MaxQueryHashes {
			return nil, invalid("%d hashes in one query, max %d", len(req.Hashes), MaxQueryHashes)
		}
		for i, h := range req.Hashes {
			if err := validateHash(i, h); err != nil {
				return nil, err
			}
		}
		return req.Hashes, nil
	}
	if len(req.Hashes) > 0 {
		return nil, invalid("set hashes or packed_hashes, not both")
	}
	return unpackHashes(req.PackedHashes, req.HashLen, MaxQueryHashes, "query")
}

// unpackHashes slices packed hashes of hashLen bytes in place, at most
// max of them (what names the call in the error).
func unpackHashes(packed []byte, hashLen uint32, max int, what string) ([][]byte, error) {
	n := int(hashLen)
	if n < MinHashLen || n > MaxHashLen {
		return nil, invalid("hash_len %d, want %d..%d", hashLen, MinHashLen, MaxHashLen)
	}
	if len(packed)%n != 0 {
		return nil, invalid("packed_hashes has %d bytes, not a multiple of hash_len %d", len(packed), n)
	}
	count := len(packed) / n
	if count > max {
		return nil, invalid("%d hashes in one %s, max %d", count, what, max)
	}
	out := make([][]byte, count)
	for i := range out {
		out[i] = packed[i*n : (i+1)*n : (i+1)*n]
	}
	return out, nil
}
