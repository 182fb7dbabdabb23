/*
 * CPU build of pegaflow_native: an mmap'd pool (best-effort hugepages,
 * mlock and NUMA placement), shared-memory regions, and the host copy
 * engine. CUDA IPC is not available here.
 */
#include "pf_internal.h"

#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

const char *pf_backend(void) { return "cpu"; }

#define PF_MAX_NUMA_NODES 1024
#define PF_MPOL_PREFERRED 1

/* Prefers `node` for the pool's pages. MPOL_PREFERRED rather than BIND: a
 * node without enough free memory then falls back to others instead of
 * the OOM killer ending the engine while the pool is faulted in. Best
 * effort: without NUMA (or in a restricted container) the call just fails.
 * Raw syscall, so there is no libnuma dependency. */
static void prefer_node(void *addr, uint64_t size, int node) {
  if (node < 0 || node >= PF_MAX_NUMA_NODES) return;
  char path[64];
  snprintf(path, sizeof path, "/sys/devices/system/node/node%d", node);
  if (access(path, F_OK) != 0) return;
  unsigned long mask[PF_MAX_NUMA_NODES / (8 * sizeof(unsigned long))];
  memset(mask, 0, sizeof mask);
  mask[(size_t)node / (8 * sizeof(unsigned long))] |= 1ul << ((size_t)node % (8 * sizeof(unsigned long)));
  (void)syscall(SYS_mbind, addr, (unsigned long)size, PF_MPOL_PREFERRED, mask,
                (unsigned long)PF_MAX_NUMA_NODES, 0u);
}

static void mmap_release(pf_pool *p) { munmap(p->base, (size_t)p->size); }

int pf_pool_create(uint64_t size, int numa_node, int device, uint32_t flags, pf_pool **out) {
  if (out == NULL) return PF_EINVAL;
  *out = NULL;
  if (size == 0 || size > (uint64_t)SIZE_MAX / 2) return PF_EINVAL;
  if (flags & ~(PF_POOL_HUGEPAGES | PF_POOL_MLOCK)) return PF_EINVAL;
  void *base = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED) return PF_ENOMEM;
  /* Placement and page size must be set before the first touch. */
  prefer_node(base, size, numa_node);
  if (flags & PF_POOL_HUGEPAGES) (void)madvise(base, (size_t)size, MADV_HUGEPAGE);
  /* Fault every page in now, as cudaHostAlloc does, so copies into the pool
   * never pay for page faults on the request path. A successful mlock has
   * already done it. */
  if (!((flags & PF_POOL_MLOCK) && mlock(base, (size_t)size) == 0)) {
    long page = sysconf(_SC_PAGESIZE);
    if (page <= 0) page = 4096;
    for (uint64_t off = 0; off < size; off += (uint64_t)page) ((volatile uint8_t *)base)[off] = 0;
  }
  pf_pool *p = pf__pool_new(base, size, device, mmap_release);
  if (p == NULL) {
    munmap(base, (size_t)size);
    return PF_ENOMEM;
  }
  *out = p;
  return PF_OK;
}

int pf_region_open_cuda_ipc(const uint8_t *handle, uint64_t handle_len, int device, uint64_t size,
                            pf_region **out) {
  (void)handle, (void)handle_len, (void)device, (void)size;
  if (out != NULL) *out = NULL;
  return PF_ENOTSUP;
}

int pf_cuda_device_by_uuid(const char *uuid, uint64_t uuid_len, int *device_out) {
  if (device_out == NULL) return PF_EINVAL;
  *device_out = -1;
  uint8_t bytes[16];
  int rc = pf__parse_uuid(uuid, uuid_len, bytes);
  return rc != PF_OK ? rc : PF_ENOTSUP;
}

int pf_event_open_ipc(const uint8_t *handle, uint64_t handle_len, int device, pf_event **out) {
  (void)device;
  if (out == NULL) return PF_EINVAL;
  *out = NULL;
  if (handle == NULL || handle_len != PF_CUDA_IPC_HANDLE_BYTES) return PF_EINVAL;
  return PF_ENOTSUP;
}

/* No pf_event can exist in this build. */
int pf_event_close(pf_event *event) { return event == NULL ? PF_EINVAL : PF_ENOTSUP; }

int pf_copier_create(int threads, int notify_fd, pf_copier **out) {
  return pf__copier_new(threads, notify_fd, out);
}

int pf_copier_submit(pf_copier *copier, pf_region *region, pf_pool *pool, int direction,
                     const pf_copy_op *ops, uint64_t n_ops, uint64_t token) {
  return pf_copier_submit_after(copier, region, pool, direction, ops, n_ops, NULL, token);
}

int pf_copier_submit_after(pf_copier *copier, pf_region *region, pf_pool *pool, int direction,
                           const pf_copy_op *ops, uint64_t n_ops, pf_event *after, uint64_t token) {
  if (after != NULL) return PF_ENOTSUP;
  pf_batch *b;
  int rc = pf__batch_new(copier, region, pool, direction, ops, n_ops, token, &b);
  if (rc != PF_OK) return rc;
  pf__host_enqueue(copier, b);
  return PF_OK;
}

int pf_copier_destroy(pf_copier *copier) {
  if (copier == NULL) return PF_EINVAL;
  pf__copier_drain(copier);
  pf__copier_free(copier);
  return PF_OK;
}
