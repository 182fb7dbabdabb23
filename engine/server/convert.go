package server

import (
	"github.com/pegaflow/pegaflow/engine"
	pb "github.com/pegaflow/pegaflow/engine/api/pegaflowv1"
)

// This file maps the engine's own types to and from the wire messages, so
// the engine's long-lived state holds no protobuf.

func healthToPB(h engine.Health) *pb.HealthResponse {
	return &pb.HealthResponse{Status: h.Status, Backend: h.Backend, Version: h.Version}
}

func statsToPB(s engine.Stats) *pb.StatsResponse {
	return &pb.StatsResponse{
		PoolCapacityBytes: s.PoolCapacityBytes,
		PoolUsedBytes:     s.PoolUsedBytes,
		ResidentBlocks:    s.ResidentBlocks,
		PinnedBlocks:      s.PinnedBlocks,
		InflightBlocks:    s.InflightBlocks,
		Hits:              s.Hits,
		Misses:            s.Misses,
		Saves:             s.Saves,
		Loads:             s.Loads,
		Evictions:         s.Evictions,
		SaveFailures:      s.SaveFailures,
		Namespaces:        s.Namespaces,
		Instances:         s.Instances,
		Sessions:          s.Sessions,
		BytesSaved:        s.BytesSaved,
		BytesLoaded:       s.BytesLoaded,
	}
}
