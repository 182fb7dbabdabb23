/*
 * CPU build of pegaflow_native: an mmap'd pool, shared-memory regions and a
 * pool of copy threads. See pegaflow_native.h for the contract.
 */
#define _GNU_SOURCE
#include "pegaflow_native.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

/* A worker takes at least this many bytes of a batch at a time, so locking
 * cost stays small next to the copies while big batches still spread over
 * every thread. Ops larger than this are split into chunks of this size. */
#define PF_CHUNK_BYTES (1u << 20)
#define PF_GRAB_BYTES (256u << 10)

struct pf_pool {
  uint8_t *base;
  uint64_t size;
  atomic_long inflight;
};

struct pf_region {
  uint8_t *base;
  uint64_t size;
  pthread_mutex_t mu;
  long refs;
  int closed;
};

typedef struct pf_task {
  uint8_t *dst;
  const uint8_t *src;
  uint64_t len;
} pf_task;

typedef struct pf_batch {
  struct pf_batch *next;
  pf_region *region;
  pf_pool *pool;
  uint64_t token;
  pf_task *tasks;
  uint64_t n_tasks;
  uint64_t next_task; /* guarded by the copier's mutex */
  atomic_uint_fast64_t remaining;
} pf_batch;

struct pf_copier {
  pthread_mutex_t mu;
  pthread_cond_t work;
  pthread_cond_t idle;
  pf_batch *head, *tail;
  long active; /* batches submitted and not completed */
  int stopping;
  int notify_fd;
  int n_threads;
  pthread_t *threads;
};

const char *pf_backend(void) { return "cpu"; }

const char *pf_strerror(int code) {
  switch (code) {
    case PF_OK: return "ok";
    case PF_EINVAL: return "invalid argument";
    case PF_ERANGE: return "offset or length out of range";
    case PF_ENOMEM: return "out of memory";
    case PF_EIO: return "i/o or mapping failure";
    case PF_ENOTSUP: return "not supported by this build";
    case PF_ECLOSED: return "object is closing";
    case PF_ECOPY: return "copy failed";
    default: return "unknown error";
  }
}

/* ---- pool ---- */

static void bind_numa(void *addr, uint64_t size, int node) {
  char path[64];
  snprintf(path, sizeof path, "/sys/devices/system/node/node%d", node);
  if (node < 0 || node >= 1024 || access(path, F_OK) != 0) return;
  unsigned long mask[1024 / (8 * sizeof(unsigned long))];
  memset(mask, 0, sizeof mask);
  mask[node / (8 * sizeof(unsigned long))] |= 1ul << (node % (8 * sizeof(unsigned long)));
  /* MPOL_BIND = 2. Best effort: without CAP_SYS_NICE or NUMA it just fails. */
  (void)syscall(SYS_mbind, addr, size, 2, mask, (unsigned long)1024, 0u);
}

int pf_pool_create(uint64_t size, int numa_node, int device, uint32_t flags, pf_pool **out) {
  (void)device;
  if (out == NULL || size == 0 || size > (uint64_t)SIZE_MAX / 2) return PF_EINVAL;
  *out = NULL;
  pf_pool *p = calloc(1, sizeof *p);
  if (p == NULL) return PF_ENOMEM;
  void *base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED) {
    free(p);
    return PF_ENOMEM;
  }
  bind_numa(base, size, numa_node);
  if (flags & PF_POOL_HUGEPAGES) (void)madvise(base, size, MADV_HUGEPAGE);
  /* Fault every page in now, as cudaHostAlloc does: a copy into the pool
   * must never pay for page faults on the request path. */
  if (!((flags & PF_POOL_MLOCK) && mlock(base, size) == 0)) {
    long page = sysconf(_SC_PAGESIZE);
    for (uint64_t off = 0; off < size; off += (uint64_t)page) ((volatile uint8_t *)base)[off] = 0;
  }
  p->base = base;
  p->size = size;
  atomic_init(&p->inflight, 0);
  *out = p;
  return PF_OK;
}

uint64_t pf_pool_size(const pf_pool *pool) { return pool ? pool->size : 0; }
void *pf_pool_base(pf_pool *pool) { return pool ? pool->base : NULL; }

int pf_pool_destroy(pf_pool *pool) {
  if (pool == NULL) return PF_EINVAL;
  if (atomic_load(&pool->inflight) != 0) return PF_ECLOSED;
  munmap(pool->base, pool->size);
  free(pool);
  return PF_OK;
}

/* ---- regions ---- */

int pf_region_open_shm(const char *path, uint64_t size, pf_region **out) {
  if (path == NULL || out == NULL || size == 0 || size > (uint64_t)SIZE_MAX / 2) return PF_EINVAL;
  *out = NULL;
  int fd = open(path, O_RDWR | O_CLOEXEC);
  if (fd < 0) return PF_EIO;
  struct stat st;
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    close(fd);
    return PF_EIO;
  }
  if ((uint64_t)st.st_size < size) {
    close(fd);
    return PF_ERANGE;
  }
  void *base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (base == MAP_FAILED) return PF_EIO;
  pf_region *r = calloc(1, sizeof *r);
  if (r == NULL) {
    munmap(base, size);
    return PF_ENOMEM;
  }
  r->base = base;
  r->size = size;
  pthread_mutex_init(&r->mu, NULL);
  *out = r;
  return PF_OK;
}

int pf_region_open_cuda_ipc(const uint8_t *handle, uint64_t handle_len, int device, uint64_t size,
                            pf_region **out) {
  (void)handle, (void)handle_len, (void)device, (void)size;
  if (out) *out = NULL;
  return PF_ENOTSUP;
}

uint64_t pf_region_size(const pf_region *region) { return region ? region->size : 0; }

static void region_free(pf_region *r) {
  munmap(r->base, r->size);
  pthread_mutex_destroy(&r->mu);
  free(r);
}

int pf_region_close(pf_region *r) {
  if (r == NULL) return PF_EINVAL;
  pthread_mutex_lock(&r->mu);
  if (r->closed) {
    pthread_mutex_unlock(&r->mu);
    return PF_ECLOSED;
  }
  r->closed = 1;
  int free_now = r->refs == 0;
  pthread_mutex_unlock(&r->mu);
  if (free_now) region_free(r);
  return PF_OK;
}

static int region_acquire(pf_region *r) {
  pthread_mutex_lock(&r->mu);
  int closed = r->closed;
  if (!closed) r->refs++;
  pthread_mutex_unlock(&r->mu);
  return closed ? PF_ECLOSED : PF_OK;
}

static void region_release(pf_region *r) {
  pthread_mutex_lock(&r->mu);
  int free_now = --r->refs == 0 && r->closed;
  pthread_mutex_unlock(&r->mu);
  if (free_now) region_free(r);
}

/* ---- copier ---- */

static void notify(int fd, uint64_t token, int64_t status) {
  pf_completion c = {token, status};
  const uint8_t *p = (const uint8_t *)&c;
  size_t left = sizeof c;
  while (left > 0) {
    ssize_t n = write(fd, p, left);
    if (n > 0) {
      p += n;
      left -= (size_t)n;
    } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      struct pollfd pfd = {.fd = fd, .events = POLLOUT};
      (void)poll(&pfd, 1, 100);
    } else if (n < 0 && errno == EINTR) {
      continue;
    } else {
      return; /* reader gone: nobody is waiting any more */
    }
  }
}

static void complete(pf_copier *c, pf_batch *b) {
  notify(c->notify_fd, b->token, PF_OK);
  region_release(b->region);
  atomic_fetch_sub(&b->pool->inflight, 1);
  free(b->tasks);
  free(b);
  pthread_mutex_lock(&c->mu);
  if (--c->active == 0) pthread_cond_broadcast(&c->idle);
  pthread_mutex_unlock(&c->mu);
}

static void *copy_worker(void *arg) {
  pf_copier *c = arg;
  pthread_mutex_lock(&c->mu);
  for (;;) {
    while (c->head == NULL && !c->stopping) pthread_cond_wait(&c->work, &c->mu);
    if (c->head == NULL) break;
    pf_batch *b = c->head;
    uint64_t first = b->next_task, last = first, bytes = 0;
    while (last < b->n_tasks && bytes < PF_GRAB_BYTES) bytes += b->tasks[last++].len;
    b->next_task = last;
    if (last == b->n_tasks) {
      c->head = b->next;
      if (c->head == NULL) c->tail = NULL;
    }
    pthread_mutex_unlock(&c->mu);
    for (uint64_t i = first; i < last; i++) memcpy(b->tasks[i].dst, b->tasks[i].src, b->tasks[i].len);
    if (atomic_fetch_sub(&b->remaining, last - first) == last - first) complete(c, b);
    pthread_mutex_lock(&c->mu);
  }
  pthread_mutex_unlock(&c->mu);
  return NULL;
}

int pf_copier_create(int threads, int notify_fd, pf_copier **out) {
  if (out == NULL || threads <= 0 || threads > 256 || notify_fd < 0) return PF_EINVAL;
  *out = NULL;
  pf_copier *c = calloc(1, sizeof *c);
  if (c == NULL) return PF_ENOMEM;
  c->threads = calloc((size_t)threads, sizeof *c->threads);
  if (c->threads == NULL) {
    free(c);
    return PF_ENOMEM;
  }
  pthread_mutex_init(&c->mu, NULL);
  pthread_cond_init(&c->work, NULL);
  pthread_cond_init(&c->idle, NULL);
  c->notify_fd = notify_fd;
  for (int i = 0; i < threads; i++) {
    if (pthread_create(&c->threads[i], NULL, copy_worker, c) != 0) {
      c->n_threads = i;
      pf_copier_destroy(c);
      return PF_ENOMEM;
    }
  }
  c->n_threads = threads;
  *out = c;
  return PF_OK;
}

static int in_bounds(uint64_t off, uint64_t len, uint64_t size) {
  return len <= size && off <= size - len;
}

int pf_copier_submit(pf_copier *c, pf_region *region, pf_pool *pool, int direction,
                     const pf_copy_op *ops, uint64_t n_ops, uint64_t token) {
  if (c == NULL || region == NULL || pool == NULL || (ops == NULL && n_ops > 0)) return PF_EINVAL;
  if (direction != PF_DIR_REGION_TO_POOL && direction != PF_DIR_POOL_TO_REGION) return PF_EINVAL;
  if (n_ops > (1ull << 32)) return PF_EINVAL;
  uint64_t n_tasks = 0;
  for (uint64_t i = 0; i < n_ops; i++) {
    const pf_copy_op *op = &ops[i];
    if (!in_bounds(op->region_offset, op->len, region->size) || !in_bounds(op->pool_offset, op->len, pool->size))
      return PF_ERANGE;
    n_tasks += op->len == 0 ? 0 : (op->len + PF_CHUNK_BYTES - 1) / PF_CHUNK_BYTES;
  }
  int rc = region_acquire(region);
  if (rc != PF_OK) return rc;
  pthread_mutex_lock(&c->mu);
  int stopping = c->stopping;
  if (!stopping) c->active++;
  pthread_mutex_unlock(&c->mu);
  if (stopping) {
    region_release(region);
    return PF_ECLOSED;
  }
  pf_batch *b = calloc(1, sizeof *b);
  pf_task *tasks = n_tasks ? malloc(n_tasks * sizeof *tasks) : NULL;
  if (b == NULL || (n_tasks && tasks == NULL)) {
    free(b);
    free(tasks);
    region_release(region);
    pthread_mutex_lock(&c->mu);
    if (--c->active == 0) pthread_cond_broadcast(&c->idle);
    pthread_mutex_unlock(&c->mu);
    return PF_ENOMEM;
  }
  uint64_t t = 0;
  for (uint64_t i = 0; i < n_ops; i++) {
    uint8_t *r = region->base + ops[i].region_offset;
    uint8_t *p = pool->base + ops[i].pool_offset;
    for (uint64_t done = 0; done < ops[i].len; done += PF_CHUNK_BYTES, t++) {
      uint64_t len = ops[i].len - done < PF_CHUNK_BYTES ? ops[i].len - done : PF_CHUNK_BYTES;
      tasks[t].len = len;
      if (direction == PF_DIR_REGION_TO_POOL) {
        tasks[t].src = r + done;
        tasks[t].dst = p + done;
      } else {
        tasks[t].src = p + done;
        tasks[t].dst = r + done;
      }
    }
  }
  b->region = region;
  b->pool = pool;
  b->token = token;
  b->tasks = tasks;
  b->n_tasks = n_tasks;
  atomic_init(&b->remaining, n_tasks);
  atomic_fetch_add(&pool->inflight, 1);
  if (n_tasks == 0) {
    complete(c, b);
    return PF_OK;
  }
  pthread_mutex_lock(&c->mu);
  if (c->tail) c->tail->next = b;
  else c->head = b;
  c->tail = b;
  pthread_cond_broadcast(&c->work);
  pthread_mutex_unlock(&c->mu);
  return PF_OK;
}

int pf_copier_destroy(pf_copier *c) {
  if (c == NULL) return PF_EINVAL;
  pthread_mutex_lock(&c->mu);
  while (c->active > 0) pthread_cond_wait(&c->idle, &c->mu);
  c->stopping = 1;
  pthread_cond_broadcast(&c->work);
  pthread_mutex_unlock(&c->mu);
  for (int i = 0; i < c->n_threads; i++) pthread_join(c->threads[i], NULL);
  pthread_cond_destroy(&c->idle);
  pthread_cond_destroy(&c->work);
  pthread_mutex_destroy(&c->mu);
  free(c->threads);
  free(c);
  return PF_OK;
}
