package server

import (
	"context"

	pb "github.com/pegaflow/pegaflow/engine/api/pegaflowv1"
)

// BlockEvents serves a namespace's block feed (engine/events.go).
func (s *service) BlockEvents(_ context.Context, req *pb.BlockEventsRequest) (*pb.BlockEventsResponse, error) {
	resp, err := s.eng.BlockEvents(req)
	return resp, toStatus(err)
}
