package engine

import (
	"fmt"
	"strings"
)

// How a reading engine's bytes move (Config.PeerTransport). The control
// plane (handshake, open, release) is the same gRPC service either way.
const (
	// PeerTransportTCP (the default): the reader asks the peer's
	// validated stream (engine/peer) for whole shares of a transfer it
	// opened, naming the transfer's handle; the peer checks every extent
	// against that transfer's blocks before a byte is sent. No UCX runs,
	// and nothing of the pools is reachable by address.
	PeerTransportTCP = "tcp"
	// PeerTransportRDMA: one-sided UCX GETs into the peer's pools
	// (native/pegaflow_xfer.h), for RDMA fabrics only: there the NIC
	// enforces each rkey, and the pools are registered remote-read-only.
	// Over TCP or shared memory UCX emulates RMA in software for any
	// address of the process, so CheckPeerTransport refuses to start it
	// unless UCX_TLS names RDMA transports only.
	PeerTransportRDMA = "rdma"
)

// rdmaTransports are the UCX_TLS names that CheckPeerTransport accepts for
// PeerTransportRDMA: InfiniBand/RoCE transports, whose NIC checks the rkey
// of every remote access. Anything else (tcp, sm/shm/posix/sysv/cma/knem/
// xpmem, cuda_ipc, all, a ^negation) lets UCX serve RMA without that check.
var rdmaTransports = map[string]bool{
	"rc": true, "rc_v": true, "rc_x": true, "rc_verbs": true, "rc_mlx5": true,
	"dc": true, "dc_x": true, "dc_mlx5": true,
	"ud": true, "ud_v": true, "ud_x": true, "ud_verbs": true, "ud_mlx5": true,
	"ib": true, "self": true,
}

// CheckPeerTransport refuses an unknown transport, and PeerTransportRDMA
// unless getenv("UCX_TLS") names RDMA transports only: an engine that would
// expose RMA over TCP does not start. The message names the safe settings.
func CheckPeerTransport(transport string, getenv func(string) string) error {
	switch transport {
	case "", PeerTransportTCP:
		return nil
	case PeerTransportRDMA:
	default:
		return fmt.Errorf("%w: --peer-transport %q: want %q (validated stream, the default) or %q (UCX one-sided reads, RDMA fabrics only)",
			ErrInvalid, transport, PeerTransportTCP, PeerTransportRDMA)
	}
	tls := strings.TrimSpace(getenv("UCX_TLS"))
	safe := "set UCX_TLS to RDMA transports only (e.g. UCX_TLS=rc,ud or UCX_TLS=dc,ud) and UCX_NET_DEVICES to the KV NIC, " +
		"or use --peer-transport=tcp"
	if tls == "" {
		return fmt.Errorf("%w: --peer-transport=rdma with UCX_TLS unset would let UCX pick TCP, over which any process reaching its port can read "+
			"and write the engine's memory: %s", ErrInvalid, safe)
	}
	for _, t := range strings.Split(tls, ",") {
		if !rdmaTransports[strings.TrimSpace(t)] {
			return fmt.Errorf("%w: --peer-transport=rdma with UCX_TLS=%q: %q is not an RDMA transport (UCX would serve RMA without a NIC-checked key): %s",
				ErrInvalid, tls, strings.TrimSpace(t), safe)
		}
	}
	return nil
}
