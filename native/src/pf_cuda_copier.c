/*
 * CUDA build of pegaflow_native, the stream copier (memory objects are
 * pf_cuda.c). Device regions: per device and direction a set of
 * non-blocking streams (round robin per batch), each with a completion
 * thread. A batch is an optional wait on the producer's IPC event, then
 * one cudaMemcpyBatchAsync (many ops, CUDA 12.8+) or one cudaMemcpyAsync
 * per coalesced op, plus an event; the completion thread waits for the
 * event (blocking sync, no spin), then releases references and writes the
 * completion record. It runs outside the stream, so it may call the CUDA
 * API (closing an IPC mapping whose region was closed mid-copy), which a
 * cudaLaunchHostFunc callback may not. Host (shm) regions use the host
 * copy engine. Nothing on the request path synchronizes.
 */
#include "pf_cuda.h"

#include <stdlib.h>
#include <string.h>

#define PF_MAX_STREAMS 16

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
  pf__cuda_clear_error();
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
      pf__cuda_clear_error();
      status = PF_ECOPY;
    }
    if (cb->event) (void)cudaEventDestroy(cb->event);
    if (cb->after) pf__ref_release(&cb->after->ref);
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
    pf__cuda_clear_error();
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
    pf__cuda_clear_error();
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
      pf__cuda_clear_error();
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
    pf__cuda_clear_error();
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
    pf__cuda_clear_error();
    rc = PF_EIO;
  }
  pf_cuda_batch *cb = rc == PF_OK ? calloc(1, sizeof *cb) : NULL;
  if (rc == PF_OK && cb == NULL) rc = PF_ENOMEM;
  if (rc == PF_OK && cudaEventCreateWithFlags(&cb->event, cudaEventDisableTiming | cudaEventBlockingSync) != cudaSuccess) {
    pf__cuda_clear_error();
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
    if (after != NULL && (rc = pf__ref_acquire(&after->ref)) == PF_OK) {
      cb->after = after;
      if (cudaStreamWaitEvent(cb->stream, after->event, 0) != cudaSuccess) rc = PF_EIO;
    }
    if (rc != PF_OK) (void)cudaEventDestroy(cb->event);
  }
  if (rc != PF_OK) {
    pf__cuda_clear_error();
    if (cb != NULL && cb->after != NULL) pf__ref_release(&cb->after->ref);
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
      pf__cuda_clear_error();
      atomic_store(&b->status, PF_ECOPY);
      break;
    }
  }
  if (cudaEventRecord(cb->event, cb->stream) != cudaSuccess) {
    pf__cuda_clear_error();
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
