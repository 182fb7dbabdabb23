/*
 * pegaflow_xfer: one-sided reads of a peer's registered memory over UCX UCP.
 *
 * Shaped like NIXL (register, exchange blobs, batched read, notify) so that
 * another backend (NIXL, libfabric) could sit behind the same calls:
 *
 *   pf_xfer_agent  one UCX context + worker, and a progress thread that
 *                  sleeps on the worker's event fd (never spins). Peers that
 *                  read from this agent are served by that thread too (over
 *                  TCP a GET is emulated by the target's progress).
 *   pf_xfer_mem    local memory registered once (ucp_mem_map): a pf_pool or
 *                  any host buffer. Its packed rkey is an opaque blob.
 *   pf_xfer_peer   an endpoint to another agent, created from that agent's
 *                  address blob, plus the remote regions added from their
 *                  rkey blobs with their advertised base and size.
 *
 * A batch (pf_xfer_get) is a list of (remote offset, local offset, length)
 * reads from one remote region into one local memory. Every op is checked
 * against both sizes before any GET is posted; on PF_OK exactly one
 * pf_completion {token, status} is later written to the agent's notify fd,
 * the same record and path as the copier's (pegaflow_native.h). A peer that
 * dies fails its batches with PF_EPEER (the endpoints run in UCX's peer
 * error-handling mode); pf_xfer_cancel ends a batch with PF_ECANCELED.
 * A peer has at most a window of GETs (256 ops, ~16 MiB) in flight; the
 * rest of its batches wait in FIFO order and are posted as GETs complete.
 *
 * Threading: every call is thread-safe (one mutex per agent serialises the
 * UCX worker between callers and the progress thread). None may be called
 * with an object after its close/deregister/destroy returned.
 *
 * Trust: address and rkey blobs are parsed by UCX, which takes no length for
 * them; they must come from an authenticated peer. Registered memory is
 * mapped remote-read-only. Over TCP (and shared-memory transports) UCX
 * emulates RMA in software and serves a GET of any address of the target
 * process to any endpoint: this component is safe only where the NIC
 * enforces rkeys (RDMA). The engine refuses to start it otherwise
 * (engine/peertransport.go); over TCP peers read through the engine's
 * validated stream instead (engine/peer). See native/README.md.
 */
#ifndef PEGAFLOW_XFER_H
#define PEGAFLOW_XFER_H

#include <stdint.h>

#include "pegaflow_native.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Bounds on what one call may ask for: work per call stays bounded. */
#define PF_XFER_MAX_OPS 65536u          /* ops per batch */
#define PF_XFER_MAX_REGIONS 1024u       /* remote regions per peer */
#define PF_XFER_MAX_BLOB (1u << 20)     /* address or rkey blob bytes */

typedef struct pf_xfer_agent pf_xfer_agent;
typedef struct pf_xfer_mem pf_xfer_mem;
typedef struct pf_xfer_peer pf_xfer_peer;

typedef struct pf_xfer_op {
  uint64_t remote_offset; /* within the remote region */
  uint64_t local_offset;  /* within the local memory */
  uint64_t len;
} pf_xfer_op;

/* "ucx". */
const char *pf_xfer_backend(void);

/* Creates the UCX context, worker and progress thread. Completions go to
 * notify_fd (a pipe's write end; may be nonblocking). UCX reads its
 * configuration (UCX_TLS, UCX_NET_DEVICES, ...) from the environment. */
int pf_xfer_agent_create(int notify_fd, pf_xfer_agent **out);
/* Copies the worker address blob into buf. With buf == NULL (cap 0) only
 * *len is set; PF_ERANGE (and *len set) when cap is too small. */
int pf_xfer_agent_address(pf_xfer_agent *a, uint8_t *buf, uint64_t cap, uint64_t *len);
/* Stops the progress thread and frees the agent. PF_ECLOSED, and nothing
 * changed, while a peer or memory of it is still open. */
int pf_xfer_agent_destroy(pf_xfer_agent *a);

/* Registers [base, base+size) of host memory. The memory must stay mapped
 * until pf_xfer_mem_deregister returned. */
int pf_xfer_mem_register(pf_xfer_agent *a, void *base, uint64_t size, pf_xfer_mem **out);
/* Registers a whole pool; the pool cannot be destroyed (PF_ECLOSED) until
 * the memory is deregistered. */
int pf_xfer_mem_register_pool(pf_xfer_agent *a, pf_pool *pool, pf_xfer_mem **out);
/* The packed rkey (same buffer contract as pf_xfer_agent_address). */
int pf_xfer_mem_rkey(pf_xfer_mem *m, uint8_t *buf, uint64_t cap, uint64_t *len);
/* The address a peer adds the region at (the registered base) and size. */
uint64_t pf_xfer_mem_base(const pf_xfer_mem *m);
uint64_t pf_xfer_mem_size(const pf_xfer_mem *m);
/* Waits for local batches reading into m, then unregisters and frees it.
 * Peers that still hold its rkey fail their reads from then on. */
int pf_xfer_mem_deregister(pf_xfer_mem *m);

/* Creates an endpoint to the agent whose address blob this is. The
 * connection is established lazily, by the first batch. */
int pf_xfer_peer_connect(pf_xfer_agent *a, const uint8_t *addr, uint64_t addr_len, pf_xfer_peer **out);
/* Adds a region the peer registered: its rkey blob, the remote address of
 * its first byte and its size. *id names it in pf_xfer_get. */
int pf_xfer_peer_add_region(pf_xfer_peer *p, const uint8_t *rkey, uint64_t rkey_len, uint64_t remote_base,
                            uint64_t size, uint32_t *id);
/* PF_OK while usable; PF_EPEER once the peer failed or was cancelled. */
int pf_xfer_peer_status(pf_xfer_peer *p);
/* Ends the peer's batches (PF_ECANCELED): stops posting, waits up to a
 * second for the GETs in flight, closes the endpoint, waits until UCX
 * released it and every batch on it completed, then frees it. */
int pf_xfer_peer_close(pf_xfer_peer *p);

/* Reads ops from remote region `region` of p into local memory m. Every op
 * is validated first (remote extent within the region's advertised size,
 * local extent within m; n_ops <= PF_XFER_MAX_OPS): on error nothing is
 * posted and no completion is written. PF_EPEER when the peer already
 * failed. On PF_OK exactly one completion with token follows: PF_OK,
 * PF_EPEER (the peer failed), PF_ECANCELED or PF_ECOPY (UCX refused an op). */
int pf_xfer_get(pf_xfer_peer *p, uint32_t region, pf_xfer_mem *m, const pf_xfer_op *ops, uint64_t n_ops,
                uint64_t token);
/* Ends the batch with this token; its completion says PF_ECANCELED, and no
 * byte lands in local memory after that completion was written. Without
 * force, the batch's unposted ops are dropped and the completion follows
 * once its GETs already in flight (at most one window per peer) finished;
 * the peer stays usable. With force (for a peer that stopped answering),
 * the batch's endpoint is force-closed at once: UCX cannot cancel one RMA
 * request, so the other batches on that peer fail with PF_EPEER and the
 * peer must be reconnected. Over TCP, tearing an endpoint down under GETs
 * the target is still answering can abort the target process (a UCX bug,
 * see native/README.md), so force only after a graceful cancel timed out.
 * PF_OK also when the batch already completed. Returns without waiting. */
int pf_xfer_cancel(pf_xfer_agent *a, uint64_t token, int force);

#ifdef __cplusplus
}
#endif

#endif /* PEGAFLOW_XFER_H */
