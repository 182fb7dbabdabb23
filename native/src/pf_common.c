/*
 * Backend-independent parts of pegaflow_native: error strings, refcounts,
 * argument and bounds validation, batch bookkeeping, completion records,
 * shared-memory regions and the copier lifecycle.
 */
#include "pf_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

const char *pf_strerror(int code) {
  switch (code) {
    case PF_OK: return "ok";
    case PF_EINVAL: return "invalid argument";
    case PF_ERANGE: return "offset or length out of range";
    case PF_ENOMEM: return "out of memory";
    case PF_EIO: return "i/o, mapping or device failure";
    case PF_ENOTSUP: return "not supported by this build";
    case PF_ECLOSED: return "object is closing";
    case PF_ECOPY: return "copy failed";
    case PF_ENODEV: return "no visible CUDA device with that UUID";
    default: return "unknown error";
  }
}

/* "GPU-8e3c1a2b-0d4f-...", "MIG-...", or 32 hex digits; dashes ignored.
 * Reads at most len bytes and stops at a NUL. */
int pf__parse_uuid(const char *s, uint64_t len, uint8_t out[16]) {
  if (s == NULL || len == 0 || len > 256) return PF_EINVAL;
  uint64_t i = 0;
  if (len >= 4 && (memcmp(s, "GPU-", 4) == 0 || memcmp(s, "MIG-", 4) == 0)) i = 4;
  int nibbles = 0;
  for (; i < len && s[i] != '\0'; i++) {
    char ch = s[i];
    int v;
    if (ch == '-') continue;
    if (ch >= '0' && ch <= '9') v = ch - '0';
    else if (ch >= 'a' && ch <= 'f') v = ch - 'a' + 10;
    else if (ch >= 'A' && ch <= 'F') v = ch - 'A' + 10;
    else return PF_EINVAL;
    if (nibbles == 32) return PF_EINVAL;
    if (nibbles % 2 == 0) out[nibbles / 2] = (uint8_t)(v << 4);
    else out[nibbles / 2] |= (uint8_t)v;
    nibbles++;
  }
  return nibbles == 32 ? PF_OK : PF_EINVAL;
}

/* off+len may not wrap and must stay within size. */
int pf__in_bounds(uint64_t off, uint64_t len, uint64_t size) { return len <= size && off <= size - len; }

/* ---- refcounted objects ---- */

pf_region *pf__region_new(uint8_t *base, uint64_t size, int kind, int device,
                          void (*release)(pf_region *)) {
  pf_region *r = calloc(1, sizeof *r);
  if (r == NULL) return NULL;
  r->base = base;
  r->size = size;
  r->kind = kind;
  r->device = device;
  r->release = release;
  pthread_mutex_init(&r->mu, NULL);
  return r;
}

static void region_free(pf_region *r) {
  r->release(r);
  pthread_mutex_destroy(&r->mu);
  free(r);
}

int pf__region_acquire(pf_region *r) {
  pthread_mutex_lock(&r->mu);
  int closed = r->closed;
  if (!closed) r->refs++;
  pthread_mutex_unlock(&r->mu);
  return closed ? PF_ECLOSED : PF_OK;
}

void pf__region_release(pf_region *r) {
  pthread_mutex_lock(&r->mu);
  int free_now = --r->refs == 0 && r->closed;
  pthread_mutex_unlock(&r->mu);
  if (free_now) region_free(r);
}

uint64_t pf_region_size(const pf_region *region) { return region ? region->size : 0; }

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

pf_pool *pf__pool_new(uint8_t *base, uint64_t size, int device, void (*release)(pf_pool *)) {
  pf_pool *p = calloc(1, sizeof *p);
  if (p == NULL) return NULL;
  p->base = base;
  p->size = size;
  p->device = device;
  p->release = release;
  pthread_mutex_init(&p->mu, NULL);
  return p;
}

void pf__pool_free(pf_pool *p) {
  pthread_mutex_destroy(&p->mu);
  free(p);
}

static int pool_acquire(pf_pool *p) {
  pthread_mutex_lock(&p->mu);
  int closed = p->closed;
  if (!closed) p->refs++;
  pthread_mutex_unlock(&p->mu);
  return closed ? PF_ECLOSED : PF_OK;
}

static void pool_release(pf_pool *p) {
  pthread_mutex_lock(&p->mu);
  p->refs--;
  pthread_mutex_unlock(&p->mu);
}

uint64_t pf_pool_size(const pf_pool *pool) { return pool ? pool->size : 0; }
void *pf_pool_base(pf_pool *pool) { return pool ? pool->base : NULL; }

int pf_pool_destroy(pf_pool *p) {
  if (p == NULL) return PF_EINVAL;
  pthread_mutex_lock(&p->mu);
  int busy = p->refs != 0;
  if (!busy) p->closed = 1;
  pthread_mutex_unlock(&p->mu);
  if (busy) return PF_ECLOSED;
  p->release(p);
  pf__pool_free(p);
  return PF_OK;
}

/* ---- shared-memory regions (both builds) ---- */

static void shm_release(pf_region *r) { munmap(r->base, (size_t)r->size); }

int pf_region_open_shm(const char *path, uint64_t size, pf_region **out) {
  if (out == NULL) return PF_EINVAL;
  *out = NULL;
  if (path == NULL || path[0] == '\0' || size == 0 || size > (uint64_t)SIZE_MAX / 2) return PF_EINVAL;
  int fd = open(path, O_RDWR | O_CLOEXEC | O_NOCTTY);
  if (fd < 0) return PF_EIO;
  struct stat st;
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    close(fd);
    return PF_EIO;
  }
  if (st.st_size < 0 || (uint64_t)st.st_size < size) {
    close(fd);
    return PF_ERANGE;
  }
  void *base = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd); /* the mapping keeps the file alive */
  if (base == MAP_FAILED) return PF_EIO;
  pf_region *r = pf__region_new(base, size, PF_MEM_HOST, -1, shm_release);
  if (r == NULL) {
    munmap(base, (size_t)size);
    return PF_ENOMEM;
  }
  *out = r;
  return PF_OK;
}

/* ---- batches ---- */

int pf__batch_new(pf_copier *c, pf_region *region, pf_pool *pool, int direction,
                  const pf_copy_op *ops, uint64_t n_ops, uint64_t token, pf_batch **out) {
  if (out == NULL) return PF_EINVAL;
  *out = NULL;
  if (c == NULL || region == NULL || pool == NULL || (ops == NULL && n_ops > 0)) return PF_EINVAL;
  if (direction != PF_DIR_REGION_TO_POOL && direction != PF_DIR_POOL_TO_REGION) return PF_EINVAL;
  if (n_ops > PF_MAX_OPS) return PF_EINVAL;

  /* Every op is checked before anything is queued, so a bad op anywhere in
   * the batch means no byte moves. */
  uint64_t n_copy = 0, total = 0;
  for (uint64_t i = 0; i < n_ops; i++) {
    const pf_copy_op *op = &ops[i];
    if (!pf__in_bounds(op->region_offset, op->len, region->size) ||
        !pf__in_bounds(op->pool_offset, op->len, pool->size))
      return PF_ERANGE;
    if (op->len == 0) continue;
    n_copy++;
    /* Ops may overlap, so the sum is not bounded by the sizes. */
    if (__builtin_add_overflow(total, op->len, &total)) return PF_EINVAL;
  }

  pf_batch *b = calloc(1, sizeof *b);
  pf_copy_op *copy = n_copy ? malloc((size_t)n_copy * sizeof *copy) : NULL;
  if (b == NULL || (n_copy && copy == NULL)) {
    free(b);
    free(copy);
    return PF_ENOMEM;
  }
  /* Keep the copy of the ops (the caller's memory may be reused at once)
   * and merge neighbours that are adjacent on both sides. Both are in
   * range, so the merged op is too and nothing can overflow. */
  uint64_t m = 0;
  for (uint64_t i = 0; i < n_ops; i++) {
    const pf_copy_op *op = &ops[i];
    if (op->len == 0) continue;
    if (m > 0) {
      pf_copy_op *last = &copy[m - 1];
      if (last->region_offset + last->len == op->region_offset && last->pool_offset + last->len == op->pool_offset) {
        last->len += op->len;
        continue;
      }
    }
    copy[m++] = *op;
  }

  int rc = pf__region_acquire(region);
  if (rc == PF_OK) {
    rc = pool_acquire(pool);
    if (rc != PF_OK) pf__region_release(region);
  }
  if (rc == PF_OK) {
    pthread_mutex_lock(&c->mu);
    if (c->stopping) rc = PF_ECLOSED;
    else c->active++;
    pthread_mutex_unlock(&c->mu);
    if (rc != PF_OK) {
      pool_release(pool);
      pf__region_release(region);
    }
  }
  if (rc != PF_OK) {
    free(copy);
    free(b);
    return rc;
  }
  b->copier = c;
  b->region = region;
  b->pool = pool;
  b->direction = direction;
  b->token = token;
  b->ops = copy;
  b->n_ops = m;
  b->total = total;
  atomic_init(&b->remaining, total);
  atomic_init(&b->status, PF_OK);
  *out = b;
  return PF_OK;
}

/* One record per batch. 16 bytes is below PIPE_BUF, so on a pipe the write
 * is all or nothing; the loop still handles short writes on other fds. The
 * fd may be nonblocking: wait for room with poll. */
static void write_completion(int fd, uint64_t token, int64_t status) {
  pf_completion rec = {token, status};
  const uint8_t *p = (const uint8_t *)&rec;
  size_t left = sizeof rec;
  while (left > 0) {
    ssize_t n = write(fd, p, left);
    if (n > 0) {
      p += n;
      left -= (size_t)n;
    } else if (n < 0 && errno == EINTR) {
      continue;
    } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      struct pollfd pfd = {.fd = fd, .events = POLLOUT};
      (void)poll(&pfd, 1, 1000);
    } else {
      return; /* EPIPE/EBADF: nobody reads completions any more */
    }
  }
}

static void batch_release(pf_batch *b) {
  pf_copier *c = b->copier;
  pf__region_release(b->region);
  pool_release(b->pool);
  free(b->ops);
  free(b);
  pthread_mutex_lock(&c->mu);
  if (--c->active == 0) pthread_cond_broadcast(&c->idle);
  pthread_mutex_unlock(&c->mu);
}

void pf__batch_finish(pf_batch *b, int status) {
  /* References go first: a caller woken by the completion may close the
   * pool right away and must not find it still in use. */
  int fd = b->copier->notify_fd;
  uint64_t token = b->token;
  pf_copier *c = b->copier;
  pf__region_release(b->region);
  pool_release(b->pool);
  free(b->ops);
  free(b);
  write_completion(fd, token, status);
  /* Last: destroy may free the copier once active reaches zero. */
  pthread_mutex_lock(&c->mu);
  if (--c->active == 0) pthread_cond_broadcast(&c->idle);
  pthread_mutex_unlock(&c->mu);
}

void pf__batch_abort(pf_batch *b) { batch_release(b); }

/* ---- threads and copier lifecycle ---- */

int pf__thread_create(pthread_t *t, void *(*fn)(void *), void *arg) {
  sigset_t block, old;
  sigfillset(&block);
  sigdelset(&block, SIGBUS);
  sigdelset(&block, SIGSEGV);
  sigdelset(&block, SIGFPE);
  sigdelset(&block, SIGILL);
  pthread_sigmask(SIG_SETMASK, &block, &old);
  int rc = pthread_create(t, NULL, fn, arg);
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  return rc;
}

int pf__copier_new(int threads, int notify_fd, pf_copier **out) {
  if (out == NULL) return PF_EINVAL;
  *out = NULL;
  if (threads <= 0 || threads > PF_MAX_THREADS || notify_fd < 0) return PF_EINVAL;
  int fl = fcntl(notify_fd, F_GETFL);
  if (fl < 0 || (fl & O_ACCMODE) == O_RDONLY) return PF_EINVAL;
  pf__fault_guard_install();
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
    if (pf__thread_create(&c->threads[i], pf__host_worker, c) != 0) {
      c->stopping = 1;
      pf__copier_free(c);
      return PF_ENOMEM;
    }
    c->n_threads = i + 1;
  }
  *out = c;
  return PF_OK;
}

void pf__copier_drain(pf_copier *c) {
  pthread_mutex_lock(&c->mu);
  c->stopping = 1;
  while (c->active > 0) pthread_cond_wait(&c->idle, &c->mu);
  pthread_mutex_unlock(&c->mu);
}

void pf__copier_free(pf_copier *c) {
  pthread_mutex_lock(&c->mu);
  c->exiting = 1;
  pthread_cond_broadcast(&c->work);
  pthread_mutex_unlock(&c->mu);
  for (int i = 0; i < c->n_threads; i++) pthread_join(c->threads[i], NULL);
  pthread_cond_destroy(&c->idle);
  pthread_cond_destroy(&c->work);
  pthread_mutex_destroy(&c->mu);
  free(c->threads);
  free(c);
}
