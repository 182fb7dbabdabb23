/*
 * CUDA build of pegaflow_native, memory objects. Plain C against the CUDA
 * runtime API (no kernels, so no nvcc); the copier is pf_cuda_copier.c.
 *
 *   pool    cudaHostAlloc(portable | mapped), allocated by a thread bound to
 *           the CPUs of the device's NUMA node so the pinned pages land
 *           there (first touch).
 *   region  cudaIpcOpenMemHandle on the producer's device, bounds-checked
 *           against the allocation behind the handle when the driver can
 *           tell its size. Shared-memory regions work as in the CPU build.
 *   device  pf_cuda_device_by_uuid: cudaDeviceProp.uuid of every visible
 *           device, so CUDA_VISIBLE_DEVICES is honoured by the runtime.
 *   event   cudaIpcOpenEventHandle; submits wait on it with
 *           cudaStreamWaitEvent (GPU-side ordering after the producer).
 */
#include "pf_cuda.h"

#include <ctype.h>
#include <cuda.h> /* driver types for cuMemGetAddressRange only; not linked */
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char *pf_backend(void) { return "cuda"; }

static int check_device(int device, int *dev_out) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    pf__cuda_clear_error();
    return PF_EIO;
  }
  int dev = device < 0 ? 0 : device;
  if (dev >= count) return PF_EINVAL;
  if (cudaSetDevice(dev) != cudaSuccess) {
    pf__cuda_clear_error();
    return PF_EIO;
  }
  *dev_out = dev;
  return PF_OK;
}

/* ---- devices by UUID ---- */

int pf_cuda_device_by_uuid(const char *uuid, uint64_t uuid_len, int *device_out) {
  if (device_out == NULL) return PF_EINVAL;
  *device_out = -1;
  uint8_t want[16];
  int rc = pf__parse_uuid(uuid, uuid_len, want);
  if (rc != PF_OK) return rc;
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count <= 0) {
    pf__cuda_clear_error();
    return PF_EIO;
  }
  for (int d = 0; d < count; d++) {
    struct cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, d) != cudaSuccess) {
      pf__cuda_clear_error();
      continue;
    }
    if (memcmp(prop.uuid.bytes, want, sizeof want) == 0) {
      *device_out = d;
      return PF_OK;
    }
  }
  return PF_ENODEV;
}

/* ---- pool ---- */

static int device_numa_node(int device) {
  char bus[64];
  if (cudaDeviceGetPCIBusId(bus, (int)sizeof bus, device) != cudaSuccess) {
    pf__cuda_clear_error();
    return -1;
  }
  unsigned dom, b, d, f;
  if (sscanf(bus, "%x:%x:%x.%x", &dom, &b, &d, &f) != 4) return -1;
  char path[128];
  snprintf(path, sizeof path, "/sys/bus/pci/devices/%04x:%02x:%02x.%x/numa_node", dom, b, d, f);
  FILE *fp = fopen(path, "re");
  if (fp == NULL) return -1;
  int node = -1;
  if (fscanf(fp, "%d", &node) != 1) node = -1;
  fclose(fp);
  return node;
}

/* Parses /sys/devices/system/node/nodeN/cpulist ("0-15,32-47"). */
static int node_cpus(int node, cpu_set_t *set) {
  char path[96];
  snprintf(path, sizeof path, "/sys/devices/system/node/node%d/cpulist", node);
  FILE *fp = fopen(path, "re");
  if (fp == NULL) return -1;
  char buf[4096];
  size_t n = fread(buf, 1, sizeof buf - 1, fp);
  fclose(fp);
  buf[n] = '\0';
  CPU_ZERO(set);
  int count = 0;
  for (char *p = buf; *p != '\0';) {
    while (*p == ',' || isspace((unsigned char)*p)) p++;
    if (!isdigit((unsigned char)*p)) break;
    long lo = strtol(p, &p, 10), hi = lo;
    if (*p == '-') hi = strtol(p + 1, &p, 10);
    for (long cpu = lo; cpu <= hi && cpu < CPU_SETSIZE; cpu++) {
      CPU_SET((int)cpu, set);
      count++;
    }
  }
  return count > 0 ? 0 : -1;
}

static void pinned_release(pf_pool *p) {
  (void)cudaSetDevice(p->device);
  (void)cudaFreeHost(p->base);
  pf__cuda_clear_error();
}

int pf_pool_create(uint64_t size, int numa_node, int device, uint32_t flags, pf_pool **out) {
  if (out == NULL) return PF_EINVAL;
  *out = NULL;
  if (size == 0 || size > (uint64_t)SIZE_MAX / 2) return PF_EINVAL;
  if (flags & ~(PF_POOL_HUGEPAGES | PF_POOL_MLOCK)) return PF_EINVAL; /* pinned anyway */
  int dev, rc = check_device(device, &dev);
  if (rc != PF_OK) return rc;
  /* Best effort: run the allocation on the node's CPUs so the pinned pages
   * are local to the device, then give the caller its affinity back. */
  int node = numa_node >= 0 ? numa_node : device_numa_node(dev);
  cpu_set_t old, want;
  int rebound = 0;
  if (node >= 0 && node_cpus(node, &want) == 0 && sched_getaffinity(0, sizeof old, &old) == 0)
    rebound = sched_setaffinity(0, sizeof want, &want) == 0;
  void *base = NULL;
  cudaError_t err = cudaHostAlloc(&base, (size_t)size, cudaHostAllocPortable | cudaHostAllocMapped);
  if (rebound) (void)sched_setaffinity(0, sizeof old, &old);
  if (err != cudaSuccess) {
    pf__cuda_clear_error();
    return err == cudaErrorMemoryAllocation ? PF_ENOMEM : PF_EIO;
  }
  pf_pool *p = pf__pool_new(base, size, dev, pinned_release);
  if (p == NULL) {
    (void)cudaFreeHost(base);
    return PF_ENOMEM;
  }
  *out = p;
  return PF_OK;
}

/* ---- IPC regions ---- */

typedef CUresult (*pf_range_fn)(CUdeviceptr *base, size_t *size, CUdeviceptr ptr);
static pf_range_fn pf_get_range;
static pthread_once_t pf_range_once = PTHREAD_ONCE_INIT;

static void range_init(void) {
  void *fn = NULL;
  enum cudaDriverEntryPointQueryResult status;
#if CUDART_VERSION >= 12050
  cudaError_t err = cudaGetDriverEntryPointByVersion("cuMemGetAddressRange", &fn, 3020, cudaEnableDefault, &status);
#else
  cudaError_t err = cudaGetDriverEntryPoint("cuMemGetAddressRange", &fn, cudaEnableDefault, &status);
#endif
  if (err == cudaSuccess && status == cudaDriverEntryPointSuccess) pf_get_range = (pf_range_fn)fn;
  else pf__cuda_clear_error();
}

static void ipc_release(pf_region *r) {
  (void)cudaSetDevice(r->device);
  (void)cudaIpcCloseMemHandle(r->base);
  pf__cuda_clear_error();
}

int pf_region_open_cuda_ipc(const uint8_t *handle, uint64_t handle_len, int device, uint64_t size,
                            pf_region **out) {
  if (out == NULL) return PF_EINVAL;
  *out = NULL;
  if (handle == NULL || handle_len != sizeof(cudaIpcMemHandle_t) || size == 0) return PF_EINVAL;
  int dev, rc = check_device(device, &dev);
  if (rc != PF_OK) return rc;
  cudaIpcMemHandle_t h;
  memcpy(&h, handle, sizeof h);
  void *ptr = NULL;
  if (cudaIpcOpenMemHandle(&ptr, h, cudaIpcMemLazyEnablePeerAccess) != cudaSuccess) {
    pf__cuda_clear_error();
    return PF_EIO;
  }
  /* A region larger than the allocation would turn a bad registration into
   * an illegal-address fault that poisons the engine's CUDA context. */
  pthread_once(&pf_range_once, range_init);
  if (pf_get_range != NULL) {
    CUdeviceptr alloc_base = 0;
    size_t alloc_size = 0;
    if (pf_get_range(&alloc_base, &alloc_size, (CUdeviceptr)(uintptr_t)ptr) == CUDA_SUCCESS) {
      uint64_t skip = (uint64_t)((uintptr_t)ptr - (uintptr_t)alloc_base);
      if (skip > alloc_size || size > alloc_size - skip) {
        (void)cudaIpcCloseMemHandle(ptr);
        return PF_ERANGE;
      }
    }
  }
  pf_region *r = pf__region_new(ptr, size, PF_MEM_DEVICE, dev, ipc_release);
  if (r == NULL) {
    (void)cudaIpcCloseMemHandle(ptr);
    return PF_ENOMEM;
  }
  *out = r;
  return PF_OK;
}

/* ---- IPC events ---- */

static void event_free(pf_ref *ref) {
  pf_event *e = pf__ref_owner(ref, pf_event, ref);
  (void)cudaSetDevice(e->device);
  (void)cudaEventDestroy(e->event);
  pf__cuda_clear_error();
  free(e);
}

int pf_event_open_ipc(const uint8_t *handle, uint64_t handle_len, int device, pf_event **out) {
  if (out == NULL) return PF_EINVAL;
  *out = NULL;
  if (handle == NULL || handle_len != sizeof(cudaIpcEventHandle_t)) return PF_EINVAL;
  int dev, rc = check_device(device, &dev);
  if (rc != PF_OK) return rc;
  cudaIpcEventHandle_t h;
  memcpy(&h, handle, sizeof h);
  pf_event *e = calloc(1, sizeof *e);
  if (e == NULL) return PF_ENOMEM;
  if (cudaIpcOpenEventHandle(&e->event, h) != cudaSuccess) {
    pf__cuda_clear_error();
    free(e);
    return PF_EIO;
  }
  e->device = dev;
  pf__ref_init(&e->ref, event_free);
  *out = e;
  return PF_OK;
}

int pf_event_close(pf_event *e) { return e ? pf__ref_close(&e->ref) : PF_EINVAL; }
