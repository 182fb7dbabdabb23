/*
 * CUDA build of pegaflow_native. Plain C against the CUDA runtime API (no
 * kernels, so no nvcc):
 *
 *   pool    cudaHostAlloc(portable | mapped), allocated by a thread bound to
 *           the CPUs of the device's NUMA node so the pinned pages land
 *           there (first touch).
 *   region  cudaIpcOpenMemHandle on the producer's device, bounds-checked
 *           against the allocation behind the handle when the driver can
 *           tell its size. Shared-memory regions work as in the CPU build.
 *   copier  device regions: per device and direction a set of non-blocking
 *           streams (round robin per batch), each with a completion thread. A
 *           batch is an optional wait on the producer's IPC event, then one
 *           cudaMemcpyBatchAsync (many ops, CUDA 12.8+) or one
 *           cudaMemcpyAsync per coalesced op, plus an event; the
 *           completion thread waits for the event (blocking sync, no spin),
 *           then releases references and writes the completion record. It
 *           runs outside the stream, so it may call the CUDA API (closing
 *           an IPC mapping whose region was closed mid-copy), which a
 *           cudaLaunchHostFunc callback may not. Host (shm) regions use the
 *           host copy engine. Nothing on the request path synchronizes.
 *   device  pf_cuda_device_by_uuid: cudaDeviceProp.uuid of every visible
 *           device, so CUDA_VISIBLE_DEVICES is honoured by the runtime.
 *   event   cudaIpcOpenEventHandle; submits wait on it with
 *           cudaStreamWaitEvent (GPU-side ordering after the producer).
 */
#include "pf_internal.h"

#include <ctype.h>
#include <cuda.h> /* driver types for cuMemGetAddressRange only; not linked */
#include <cuda_runtime_api.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PF_MAX_STREAMS 16

const char *pf_backend(void) { return "cuda"; }

/* Clears the calling thread's last (non-sticky) error. */
static void clear_error(void) { (void)cudaGetLastError(); }

static int check_device(int device, int *dev_out) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    clear_error();
    return PF_EIO;
  }
  int dev = device < 0 ? 0 : device;
  if (dev >= count) return PF_EINVAL;
  if (cudaSetDevice(dev) != cudaSuccess) {
    clear_error();
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
    clear_error();
    return PF_EIO;
  }
  for (int d = 0; d < count; d++) {
    struct cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, d) != cudaSuccess) {
      clear_error();
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
    clear_error();
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
  clear_error();
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
    clear_error();
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
  else clear_error();
}

static void ipc_release(pf_region *r) {
  (void)cudaSetDevice(r->device);
  (void)cudaIpcCloseMemHandle(r->base);
  clear_error();
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
    clear_error();
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

/* Refcounted like regions: a batch that waited on the event keeps it open
 * until the batch completed, because destroying an imported event while a
 * stream still waits on it is not something the driver promises to
 * handle. */
struct pf_event {
  cudaEvent_t event;
  int device;
  pthread_mutex_t mu;
  long refs; /* batches that waited on it and are not complete */
  int closed;
};

static void event_free(pf_event *e) {
  (void)cudaSetDevice(e->device);
  (void)cudaEventDestroy(e->event);
  clear_error();
  pthread_mutex_destroy(&e->mu);
  free(e);
}

static int event_acquire(pf_event *e) {
  pthread_mutex_lock(&e->mu);
  int closed = e->closed;
  if (!closed) e->refs++;
  pthread_mutex_unlock(&e->mu);
  return closed ? PF_ECLOSED : PF_OK;
}

static void event_release(pf_event *e) {
  pthread_mutex_lock(&e->mu);
  int free_now = --e->refs == 0 && e->closed;
  pthread_mutex_unlock(&e->mu);
  if (free_now) event_free(e);
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
    clear_error();
    free(e);
    return PF_EIO;
  }
  e->device = dev;
  pthread_mutex_init(&e->mu, NULL);
  *out = e;
  return PF_OK;
}

int pf_event_close(pf_event *e) {
  if (e == NULL) return PF_EINVAL;
  pthread_mutex_lock(&e->mu);
  if (e->closed) {
    pthread_mutex_unlock(&e->mu);
    return PF_ECLOSED;
  }
  e->closed = 1;
  int free_now = e->refs == 0;
  pthread_mutex_unlock(&e->mu);
  if (free_now) event_free(e);
  return PF_OK;
}

/* ---- batched copies ---- */

/* cudaMemcpyBatchAsync (CUDA 12.8+) submits a batch's copies in one call
 * instead of one cudaMemcpyAsync (a few microseconds of CPU each) per op.
 * Small batches gain nothing from it. CUDA 13 dropped its failIdx
 * argument. */
#if CUDART_VERSION >= 12080
#define PF_HAVE_BATCH_COPY 1
#define PF_BATCH_MIN_OPS 4
/* 1 when disabled: PEGAFLOW_NATIVE_BATCH_COPY=0, or the driver refused the
 * call as unsupported (then per-op copies are used for good). */
static atomic_int pf_batch_off;
static pthread_once_t pf_batch_once = PTHREAD_ONCE_INIT;

static void batch_init(void) {
  const char *v = getenv("PEGAFLOW_NATIVE_BATCH_COPY");
  if (v != NULL && strcmp(v, "0") == 0) atomic_store(&pf_batch_off, 1);
}

/* Enqueues every op of b on s with one call. Returns 0 when all were
 * enqueued; -1 when the caller must use per-op copies instead (redoing ops
 * the call may have enqueued before failing is harmless: same bytes, same
 * places, in stream order). */
static int batch_copy(pf_batch *b, cudaStream_t s, int to_pool) {
  pthread_once(&pf_batch_once, batch_init);
  if (b->n_ops < PF_BATCH_MIN_OPS || atomic_load(&pf_batch_off)) return -1;
  size_t n = (size_t)b->n_ops;
  void **dsts = malloc(2 * n * sizeof *dsts);
  size_t *sizes = malloc(n * sizeof *sizes);
  if (dsts == NULL || sizes == NULL) {
    free(dsts);
    free(sizes);
    return -1;
  }
  void **srcs = dsts + n;
  for (size_t i = 0; i < n; i++) {
    const pf_copy_op *o = &b->ops[i];
    uint8_t *r = b->region->base + o->region_offset, *p = b->pool->base + o->pool_offset;
    dsts[i] = to_pool ? p : r;
    srcs[i] = to_pool ? r : p;
    sizes[i] = (size_t)o->len;
  }
  struct cudaMemcpyAttributes attr;
  memset(&attr, 0, sizeof attr);
  /* Stream order: the copies must follow the wait on the producer event. */
  attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
  attr.srcLocHint.type = to_pool ? cudaMemLocationTypeDevice : cudaMemLocationTypeHost;
  attr.srcLocHint.id = to_pool ? b->region->device : 0;
  attr.dstLocHint.type = to_pool ? cudaMemLocationTypeHost : cudaMemLocationTypeDevice;
  attr.dstLocHint.id = to_pool ? 0 : b->region->device;
  /* Copy engines rather than SMs: vLLM's kernels run meanwhile. */
  attr.flags = cudaMemcpyFlagPreferOverlapWithCompute;
  size_t attr_idx = 0;
#if CUDART_VERSION >= 13000
  cudaError_t err = cudaMemcpyBatchAsync(dsts, (const void *const *)srcs, sizes, n, &attr, &attr_idx, 1, s);
#else
  size_t fail_idx = 0;
  cudaError_t err = cudaMemcpyBatchAsync(dsts, srcs, sizes, n, &attr, &attr_idx, 1, &fail_idx, s);
#endif
  free(dsts);
  free(sizes);
  if (err == cudaSuccess) return 0;
  clear_error();
  if (err == cudaErrorNotSupported || err == cudaErrorCallRequiresNewerDriver ||
      err == cudaErrorInvalidValue)
    atomic_store(&pf_batch_off, 1);
  return -1;
}
#endif

/* ---- copier ---- */

/* One stream and the thread that reports its batches. Batches complete in
 * stream order, so the thread waits for each in turn; one thread per
 * stream (not per lane) means a batch stuck on the GPU (a wait on the
 * event of a producer that died) holds back only the batches behind it on
 * its own stream. */
typedef struct pf_sq {
  int device;
  cudaStream_t stream;
  int have_stream;
  pthread_mutex_t mu;
  pthread_cond_t cv;
  pf_batch *head, *tail; /* batches whose copies are enqueued on stream */
  int exiting;
  int started;
  pthread_t thread;
} pf_sq;

/* One direction on one device: streams used round robin per batch. */
typedef struct pf_lane {
  int n_streams;
  pthread_mutex_t mu; /* guards next */
  unsigned next;
  pf_sq sq[PF_MAX_STREAMS];
} pf_lane;

typedef struct pf_cuda_dev {
  int ready;
  pf_lane lanes[2]; /* indexed by direction */
} pf_cuda_dev;

typedef struct pf_cuda {
  pthread_mutex_t mu; /* guards lazy device setup */
  int n_devices;
  int n_streams;
  pf_cuda_dev *devs;
} pf_cuda;

/* Per-batch CUDA state (pf_batch.backend). */
typedef struct pf_cuda_batch {
  cudaEvent_t event; /* NULL when recording failed: sync the stream */
  cudaStream_t stream;
  pf_event *after; /* the producer event the stream waited on (a ref), or NULL */
} pf_cuda_batch;

static void *sq_main(void *arg) {
  pf_sq *q = arg;
  (void)cudaSetDevice(q->device);
  pthread_mutex_lock(&q->mu);
  for (;;) {
    while (q->head == NULL && !q->exiting) pthread_cond_wait(&q->cv, &q->mu);
    if (q->head == NULL) break;
    pf_batch *b = q->head;
    q->head = b->next;
    if (q->head == NULL) q->tail = NULL;
    pthread_mutex_unlock(&q->mu);

    pf_cuda_batch *cb = b->backend;
    cudaError_t err = cb->event ? cudaEventSynchronize(cb->event) : cudaStreamSynchronize(cb->stream);
    int status = atomic_load(&b->status);
    if (err != cudaSuccess) {
      clear_error();
      status = PF_ECOPY;
    }
    if (cb->event) (void)cudaEventDestroy(cb->event);
    if (cb->after) event_release(cb->after);
    free(cb);
    b->backend = NULL;
    pf__batch_finish(b, status);
    pthread_mutex_lock(&q->mu);
  }
  pthread_mutex_unlock(&q->mu);
  return NULL;
}

static void sq_stop(pf_sq *q) {
  if (q->started) {
    pthread_mutex_lock(&q->mu);
    q->exiting = 1;
    pthread_cond_broadcast(&q->cv);
    pthread_mutex_unlock(&q->mu);
    pthread_join(q->thread, NULL);
  }
  if (q->have_stream) {
    (void)cudaSetDevice(q->device);
    (void)cudaStreamDestroy(q->stream);
    clear_error();
  }
  pthread_cond_destroy(&q->cv);
  pthread_mutex_destroy(&q->mu);
}

static int sq_start(pf_sq *q, int device) {
  memset(q, 0, sizeof *q);
  q->device = device;
  pthread_mutex_init(&q->mu, NULL);
  pthread_cond_init(&q->cv, NULL);
  int rc = PF_OK;
  if (cudaStreamCreateWithFlags(&q->stream, cudaStreamNonBlocking) != cudaSuccess) {
    clear_error();
    rc = PF_EIO;
  } else {
    q->have_stream = 1;
    if (pf__thread_create(&q->thread, sq_main, q) != 0) rc = PF_ENOMEM;
    else q->started = 1;
  }
  if (rc != PF_OK) sq_stop(q);
  return rc;
}

static void lane_stop(pf_lane *l) {
  for (int i = 0; i < l->n_streams; i++) sq_stop(&l->sq[i]);
  pthread_mutex_destroy(&l->mu);
}

static int lane_start(pf_lane *l, int device, int n_streams) {
  memset(l, 0, sizeof *l);
  pthread_mutex_init(&l->mu, NULL);
  for (; l->n_streams < n_streams; l->n_streams++) {
    int rc = sq_start(&l->sq[l->n_streams], device);
    if (rc != PF_OK) {
      lane_stop(l); /* the streams started so far */
      return rc;
    }
  }
  return PF_OK;
}

/* Streams and completion threads of a device, created on first use. */
static int device_lanes(pf_cuda *cu, int device, pf_cuda_dev **out) {
  if (device < 0 || device >= cu->n_devices) return PF_EINVAL;
  pthread_mutex_lock(&cu->mu);
  pf_cuda_dev *d = &cu->devs[device];
  int rc = PF_OK;
  if (!d->ready) {
    if (cudaSetDevice(device) != cudaSuccess) {
      clear_error();
      rc = PF_EIO;
    } else if ((rc = lane_start(&d->lanes[0], device, cu->n_streams)) == PF_OK) {
      if ((rc = lane_start(&d->lanes[1], device, cu->n_streams)) != PF_OK) lane_stop(&d->lanes[0]);
    }
    d->ready = rc == PF_OK;
  }
  pthread_mutex_unlock(&cu->mu);
  *out = d;
  return rc;
}

int pf_copier_create(int threads, int notify_fd, pf_copier **out) {
  int rc = pf__copier_new(threads, notify_fd, out);
  if (rc != PF_OK) return rc;
  pf_copier *c = *out;
  pf_cuda *cu = calloc(1, sizeof *cu);
  int count = 0;
  /* No device (or no driver) still leaves a working copier for shm
   * regions; device regions cannot be opened then anyway. */
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    clear_error();
    count = 0;
  }
  if (cu != NULL && count > 0) cu->devs = calloc((size_t)count, sizeof *cu->devs);
  if (cu == NULL || (count > 0 && cu->devs == NULL)) {
    free(cu);
    pf__copier_drain(c);
    pf__copier_free(c);
    *out = NULL;
    return PF_ENOMEM;
  }
  pthread_mutex_init(&cu->mu, NULL);
  cu->n_devices = count;
  cu->n_streams = threads < PF_MAX_STREAMS ? threads : PF_MAX_STREAMS;
  c->backend = cu;
  return PF_OK;
}

static int device_submit(pf_copier *c, pf_batch *b, pf_event *after) {
  pf_cuda *cu = c->backend;
  pf_cuda_dev *d = NULL;
  int rc = device_lanes(cu, b->region->device, &d);
  if (rc == PF_OK && cudaSetDevice(b->region->device) != cudaSuccess) {
    clear_error();
    rc = PF_EIO;
  }
  pf_cuda_batch *cb = rc == PF_OK ? calloc(1, sizeof *cb) : NULL;
  if (rc == PF_OK && cb == NULL) rc = PF_ENOMEM;
  if (rc == PF_OK && cudaEventCreateWithFlags(&cb->event, cudaEventDisableTiming | cudaEventBlockingSync) != cudaSuccess) {
    clear_error();
    rc = PF_EIO;
  }
  pf_sq *q = NULL;
  if (rc == PF_OK) {
    pf_lane *l = &d->lanes[b->direction];
    pthread_mutex_lock(&l->mu);
    q = &l->sq[l->next++ % (unsigned)l->n_streams];
    pthread_mutex_unlock(&l->mu);
    cb->stream = q->stream;
    /* GPU-side ordering after the producer: the stream waits for the
     * event's latest record; the host does not block. Before any copy, so
     * a failure here still leaves nothing enqueued. */
    if (after != NULL && (rc = event_acquire(after)) == PF_OK) {
      cb->after = after;
      if (cudaStreamWaitEvent(cb->stream, after->event, 0) != cudaSuccess) rc = PF_EIO;
    }
    if (rc != PF_OK) (void)cudaEventDestroy(cb->event);
  }
  if (rc != PF_OK) {
    clear_error();
    if (cb != NULL && cb->after != NULL) event_release(cb->after);
    free(cb);
    pf__batch_abort(b); /* nothing was enqueued */
    return rc;
  }

  /* From here on the batch always completes through the lane: once one
   * copy is enqueued the memory is in use until the stream reaches it. */
  int to_pool = b->direction == PF_DIR_REGION_TO_POOL;
  enum cudaMemcpyKind kind = to_pool ? cudaMemcpyDeviceToHost : cudaMemcpyHostToDevice;
  uint64_t first = 0;
#ifdef PF_HAVE_BATCH_COPY
  if (batch_copy(b, cb->stream, to_pool) == 0) first = b->n_ops;
#endif
  for (uint64_t i = first; i < b->n_ops; i++) {
    const pf_copy_op *o = &b->ops[i];
    uint8_t *r = b->region->base + o->region_offset, *p = b->pool->base + o->pool_offset;
    if (cudaMemcpyAsync(to_pool ? p : r, to_pool ? r : p, (size_t)o->len, kind, cb->stream) != cudaSuccess) {
      clear_error();
      atomic_store(&b->status, PF_ECOPY);
      break;
    }
  }
  if (cudaEventRecord(cb->event, cb->stream) != cudaSuccess) {
    clear_error();
    (void)cudaEventDestroy(cb->event);
    cb->event = NULL;
    atomic_store(&b->status, PF_ECOPY);
  }
  b->backend = cb;
  b->next = NULL;
  pthread_mutex_lock(&q->mu);
  if (q->tail) q->tail->next = b;
  else q->head = b;
  q->tail = b;
  pthread_cond_signal(&q->cv);
  pthread_mutex_unlock(&q->mu);
  return PF_OK;
}

int pf_copier_submit(pf_copier *copier, pf_region *region, pf_pool *pool, int direction,
                     const pf_copy_op *ops, uint64_t n_ops, uint64_t token) {
  return pf_copier_submit_after(copier, region, pool, direction, ops, n_ops, NULL, token);
}

int pf_copier_submit_after(pf_copier *copier, pf_region *region, pf_pool *pool, int direction,
                           const pf_copy_op *ops, uint64_t n_ops, pf_event *after, uint64_t token) {
  /* A host region's copies run on CPU threads, which cannot wait on a GPU
   * event without blocking; the producer orders shm writes itself. */
  if (after != NULL && region != NULL && region->kind == PF_MEM_HOST) return PF_EINVAL;
  pf_batch *b;
  int rc = pf__batch_new(copier, region, pool, direction, ops, n_ops, token, &b);
  if (rc != PF_OK) return rc;
  if (region->kind == PF_MEM_HOST) {
    pf__host_enqueue(copier, b);
    return PF_OK;
  }
  return device_submit(copier, b, after);
}

int pf_copier_destroy(pf_copier *copier) {
  if (copier == NULL) return PF_EINVAL;
  pf__copier_drain(copier);
  pf_cuda *cu = copier->backend;
  for (int i = 0; i < cu->n_devices; i++) {
    if (!cu->devs[i].ready) continue;
    lane_stop(&cu->devs[i].lanes[0]);
    lane_stop(&cu->devs[i].lanes[1]);
  }
  pthread_mutex_destroy(&cu->mu);
  free(cu->devs);
  free(cu);
  pf__copier_free(copier);
  return PF_OK;
}
