package router

// Backend roles: a backend's role, the "role" label of the backend
// metrics and the "leg" label of retries_total.
const (
	rolePrefill    = "prefill"    // --prefill servers (P/D mode)
	roleDecode     = "decode"     // --decode servers (P/D mode)
	roleAggregated = "aggregated" // --backend servers (aggregated mode)
)

// Router modes, the "mode" constant label of every router metric: one
// router serves one mode, and the label keeps a P/D router's series apart
// from an aggregated (DP) baseline's when both are scraped together.
const (
	modePD         = "pd"
	modeAggregated = "aggregated"
)

// Request outcomes (pegaflow_router_requests_total{outcome}).
const (
	outcomeOK        = "ok"
	outcomeFailed    = "failed"
	outcomeCancelled = "client_cancelled"
	outcomeStalled   = "client_stalled" // the client stopped reading: a write passed --client-write-timeout
	outcomeRejected  = "rejected"
)
