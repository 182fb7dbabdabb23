/*
 * Bare-UCX baselines of the benchmarks, plain ucp.h, no PegaFlow code:
 *
 *  - pfb_ucx_get_loop (`nativebench -xfer`): the same GETs as the transfer
 *    agent's, posted with ucp_get_nbx between two UCX contexts in this
 *    process and completed by one thread spinning on both workers.
 *  - pfb_target_* / pfb_initiator_run (`nativebench -ucx-get-target` and
 *    `-ucx-get-initiator`, run by benchmarks/peer as two processes): the
 *    peer fetch's data path without PegaFlow, windowed GETs of share-size
 *    extents from distinct remote memory into a batch-size region.
 */
#ifndef NATIVEBENCH_UCX_BASELINE_H
#define NATIVEBENCH_UCX_BASELINE_H

#include <stdint.h>

/* Bounds the two-process calls check their arguments against. */
#define PFB_MAX_BLOB (1u << 20)    /* worker address or rkey blob bytes */
#define PFB_MAX_WINDOW 65536u      /* GETs outstanding */
#define PFB_MAX_BATCH_OPS 1048576u /* extents per batch */
#define PFB_MAX_BATCHES 1048576u   /* timed batches per run */

/* Reads n extents of ext bytes (remote offsets roffs[i], local offsets
 * i*ext) from src into dst, iters times after one warm-up; returns the
 * seconds the timed iterations took, or a negative ucs_status_t. */
double pfb_ucx_get_loop(void *src, uint64_t src_size, void *dst, uint64_t dst_size, const uint64_t *roffs,
                        uint64_t n, uint64_t ext, int iters);

typedef struct pfb_target pfb_target;

/* Opens a UCX context and worker and registers [buf, buf+size) for remote
 * reads. Returns 0 or a negative ucs_status_t; *out is set on 0. */
int pfb_target_open(void *buf, uint64_t size, pfb_target **out);
/* Copies the worker address (which = 0) or the packed rkey (which = 1)
 * into out (cap bytes); returns its length, or a negative ucs_status_t
 * (UCS_ERR_BUFFER_TOO_SMALL when cap is too small). */
int64_t pfb_target_blob(pfb_target *t, int which, uint8_t *out, uint64_t cap);
/* Progresses the worker (spinning, as ucx_perftest's server does) until
 * stop_fd is readable or hung up (the parent closed the pipe). Returns 0
 * or a negative ucs_status_t. */
int pfb_target_serve(pfb_target *t, int stop_fd);
void pfb_target_close(pfb_target *t);

/* Connects to the target whose worker address and rkey these are (its
 * region is [remote_base, remote_base+remote_size)) and reads batches:
 * each batch is dst_size/ext GETs of ext bytes, at most window
 * outstanding, into dst at offsets 0, ext, 2*ext, ..., from remote
 * offsets advancing by ext from 0 (wrapping at the last whole extent of
 * the region), waited for in full before the next batch starts. One
 * warm-up batch, then batches timed ones. Returns the timed seconds, or a
 * negative ucs_status_t (UCS_ERR_INVALID_PARAM for arguments out of the
 * bounds above or not fitting the buffers). */
double pfb_initiator_run(const uint8_t *addr, uint64_t addr_len, const uint8_t *rkey, uint64_t rkey_len,
                         uint64_t remote_base, uint64_t remote_size, void *dst, uint64_t dst_size, uint64_t ext,
                         uint64_t window, uint64_t batches);

#endif
