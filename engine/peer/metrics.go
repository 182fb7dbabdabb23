package peer

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

// streamMetrics are the validated stream's counters (README's Metrics).
type streamMetrics struct {
	conns   prometheus.Counter // connections that passed the token exchange
	refused prometheus.Counter // connections that failed the token exchange
	invalid prometheus.Counter // requests refused as malformed or outside their transfer
	bytes   prometheus.Counter // share bytes sent
}

func newStreamMetrics(reg prometheus.Registerer) (*streamMetrics, error) {
	m := &streamMetrics{
		conns: prometheus.NewCounter(prometheus.CounterOpts{Name: "pegaflow_engine_peer_stream_connections_total",
			Help: "Peer stream connections accepted (token exchange passed); readers keep theirs open across reads."}),
		refused: prometheus.NewCounter(prometheus.CounterOpts{Name: "pegaflow_engine_peer_stream_refused_total",
			Help: "Peer stream connections refused by the token exchange."}),
		invalid: prometheus.NewCounter(prometheus.CounterOpts{Name: "pegaflow_engine_peer_stream_invalid_total",
			Help: "Peer stream reads refused: malformed, or naming an extent that is not a share of the transfer they name."}),
		bytes: prometheus.NewCounter(prometheus.CounterOpts{Name: "pegaflow_engine_peer_stream_sent_bytes_total",
			Help: "Bytes of shares sent to peer engines over the validated stream."}),
	}
	if reg == nil {
		return m, nil
	}
	for _, c := range []prometheus.Collector{m.conns, m.refused, m.invalid, m.bytes} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("register peer stream metrics: %w", err)
		}
	}
	return m, nil
}
