package engine

import (
	"math/bits"
	"testing"

	"google.golang.org/protobuf/proto"

	pb "github.com/pegaflow/pegaflow/engine/api/pegaflowv1"
	"github.com/pegaflow/pegaflow/internal/kvtest"
)

// FuzzValidateRegister feeds arbitrary wire bytes as a RegisterRequest: the
// validator must never panic, and whatever it accepts must keep every block
// of every layer inside its region.
func FuzzValidateRegister(f *testing.F) {
	seed := (&kvtest.Cache{Spec: smallSpec, Paths: []string{"/dev/shm/a", "/dev/shm/b"}}).RegisterRequest("I", 0, smallSpec.Namespace("m", 1))
	wire, _ := proto.Marshal(seed)
	f.Add(wire)
	seed.Layers[0].Segments[0].Stride = 1 << 62
	wire, _ = proto.Marshal(seed)
	f.Add(wire)
	f.Fuzz(func(t *testing.T, data []byte) {
		var req pb.RegisterRequest
		if proto.Unmarshal(data, &req) != nil {
			return
		}
		reg, err := validateRegister(&req, 1<<30)
		if err != nil {
			return
		}
		layout := reg.layout
		last := uint64(layout.numBlocks - 1)
		var total uint64
		for _, l := range layout.layers {
			size := layout.regions[l.region].size
			for _, s := range l.segments {
				hi, span := bits.Mul64(last, s.stride)
				if hi != 0 || span+s.offset < span || span+s.offset+s.length < span+s.offset || span+s.offset+s.length > size {
					t.Fatalf("accepted a segment past its region: %+v in %d bytes", s, size)
				}
				total += s.length
			}
		}
		if total != layout.rankBytes || total*uint64(req.Namespace.TpSize) > 1<<30 {
			t.Fatalf("rank bytes %d, counted %d", layout.rankBytes, total)
		}
	})
}

// FuzzValidateBlocks: accepted refs always index inside the instance and
// name a group of its namespace.
func FuzzValidateBlocks(f *testing.F) {
	f.Add(uint32(3), []byte("0123456789abcdef"), uint32(16), uint32(0))
	f.Add(uint32(16), []byte("x"), uint32(16), uint32(3))
	f.Add(uint32(1), []byte("0123456789abcdef"), uint32(16), uint32(64))
	ns := &namespace{desc: &Namespace{BlockSize: 16, TPSize: 1, Groups: []KVGroup{{Index: 0, Kind: GroupFull}, {Index: 3, Kind: GroupState}}}}
	ns.initGroups()
	f.Fuzz(func(t *testing.T, id uint32, hash []byte, numBlocks, group uint32) {
		err := validateBlocks(ns, []*pb.BlockRef{{BlockId: id, Hash: hash, Group: group}}, numBlocks)
		if err == nil && (id >= numBlocks || len(hash) < MinHashLen || len(hash) > MaxHashLen || (group != 0 && group != 3)) {
			t.Fatalf("accepted id %d of %d, hash len %d, group %d", id, numBlocks, len(hash), group)
		}
	})
}
