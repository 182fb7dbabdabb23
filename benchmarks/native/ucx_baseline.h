/*
 * The bare-UCX baseline of `nativebench -xfer`: the same GETs as the
 * transfer agent's, posted with plain ucp_get_nbx between two UCX contexts
 * in this process and completed by one thread spinning on both workers.
 */
#ifndef NATIVEBENCH_UCX_BASELINE_H
#define NATIVEBENCH_UCX_BASELINE_H

#include <stdint.h>

/* Reads n extents of ext bytes (remote offsets roffs[i], local offsets
 * i*ext) from src into dst, iters times after one warm-up; returns the
 * seconds the timed iterations took, or a negative ucs_status_t. */
double pfb_ucx_get_loop(void *src, uint64_t src_size, void *dst, uint64_t dst_size, const uint64_t *roffs,
                        uint64_t n, uint64_t ext, int iters);

#endif
