package native

// XferOp reads Len bytes at RemoteOffset of a peer's remote region into
// LocalOffset of local registered memory. Its layout is pf_xfer_op's.
type XferOp struct{ RemoteOffset, LocalOffset, Len uint64 }

// RemoteRegion names a region added to a peer with AddRemoteRegion.
type RemoteRegion uint32

// MaxXferOps is the most ops one Get accepts (pf_xfer_get's bound on the
// work of one call); callers split longer lists.
const MaxXferOps = 65536
