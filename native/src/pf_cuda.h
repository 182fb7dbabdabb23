/*
 * Internals of the CUDA build shared by its two files: pf_cuda.c (memory
 * objects: pool, IPC regions, device lookup, IPC events) and
 * pf_cuda_copier.c (streams, batched copies, completion threads).
 */
#ifndef PF_CUDA_H
#define PF_CUDA_H

#include "pf_internal.h"

#include <cuda_runtime_api.h>

/* An imported producer event. Refcounted like regions (pf_ref): a batch
 * that waited on the event keeps it open until the batch completed,
 * because destroying an imported event while a stream still waits on it
 * is not something the driver promises to handle. */
struct pf_event {
  cudaEvent_t event;
  int device;
  pf_ref ref; /* batches that waited on it and are not complete */
};

/* Clears the calling thread's last (non-sticky) CUDA error, so a failed
 * call does not show up in a later cudaGetLastError. */
static inline void pf__cuda_clear_error(void) { (void)cudaGetLastError(); }

#endif /* PF_CUDA_H */
