/*
 * Backend-independent parts of pegaflow_native: error strings, argument
 * and bounds validation, pool and region objects, batch
 * bookkeeping, completion records, shared-memory regions. The copier's
 * lifecycle is pf_host.c's; nothing here calls into it.
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
    case PF_EPEER: return "peer failed or connection closed";
    case PF_ECANCELED: return "cancelled";
    case PF_ESHORT: return "short read: the file ended first";
    case PF_ENOSPC: return "no space left on the file system";
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

/* ---- pool and region objects (lifetimes: pf_ref) ---- */

static void region_free(pf_ref *ref) {
  pf_region *r = pf__ref_owner(ref, pf_region, ref);
  r->release(r);
  free(r);
}

pf_region *pf__region_new(uint8_t *base, uint64_t size, int kind, int device,
                          void (*release)(pf_region *)) {
  pf_region *r = calloc(1, sizeof *r);
  if (r == NULL) return NULL;
  *r = (pf_region){.base = base, .size = size, .kind = kind, .device = device, .release = release};
  pf__ref_init(&r->ref, region_free);
  return r;
}

uint64_t pf_region_size(const pf_region *region) { return region ? region->size : 0; }

/* Unmapped after the last batch using it. */
int pf_region_close(pf_region *r) { return r ? pf__ref_close(&r->ref) : PF_EINVAL; }

static void pool_free(pf_ref *ref) {
  pf_pool *p = pf__ref_owner(ref, pf_pool, ref);
  p->release(p);
  free(p);
}

pf_pool *pf__pool_new(uint8_t *base, uint64_t size, int device, void (*release)(pf_pool *)) {
  pf_pool *p = calloc(1, sizeof *p);
  if (p == NULL) return NULL;
  *p = (pf_pool){.base = base, .size = size, .device = device, .release = release};
  pf__ref_init(&p->ref, pool_free);
  return p;
}

uint64_t pf_pool_size(const pf_pool *pool) { return pool ? pool->size : 0; }
void *pf_pool_base(pf_pool *pool) { return pool ? pool->base : NULL; }

/* Refused while batches use it: a pool is never freed by a batch. */
int pf_pool_destroy(pf_pool *p) { return p ? pf__ref_close_idle(&p->ref) : PF_EINVAL; }

/* ---- shared-memory regions (both builds) ---- */

static void shm_release(pf_region *r) { munmap(r->base, (size_t)r->size); }

int pf_region_open_shm(const char *path, uint64_t size, pf_region **out) {
  if (out == NULL) return PF_EINVAL;
  *out = NULL;
  if (path == NULL || path[0] == '\0' || size == 0 || size > (uint64_t)SIZE_MAX / 2) return PF_EINVAL;
  int fd = open(path, O_RDWR | O_CLOEXEC | O_NOCTTY);
  if (fd < 0) return PF_EIO;
  int rc = pf_region_open_shm_fd(fd, size, out);
  close(fd); /* the mapping keeps the file alive */
  return rc;
}

int pf_region_open_shm_fd(int fd, uint64_t size, pf_region **out) {
  if (out == NULL) return PF_EINVAL;
  *out = NULL;
  if (fd < 0 || size == 0 || size > (uint64_t)SIZE_MAX / 2) return PF_EINVAL;
  /* The size comes from the file itself, never from the caller alone:
   * mapping past its end would fault on every access. */
  struct stat st;
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) return PF_EIO;
  if (st.st_size < 0 || (uint64_t)st.st_size < size) return PF_ERANGE;
  void *base = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
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

  int rc = pf__ref_acquire(&region->ref);
  if (rc == PF_OK) {
    rc = pf__ref_acquire(&pool->ref);
    if (rc != PF_OK) pf__ref_release(&region->ref);
  }
  if (rc == PF_OK) {
    pthread_mutex_lock(&c->mu);
    if (c->stopping) rc = PF_ECLOSED;
    else c->active++;
    pthread_mutex_unlock(&c->mu);
    if (rc != PF_OK) {
      pf__ref_release(&pool->ref);
      pf__ref_release(&region->ref);
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
void pf__write_completion(int fd, uint64_t token, int64_t status) {
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

/* Drops the batch's references and frees it. */
static void batch_drop(pf_batch *b) {
  pf__ref_release(&b->region->ref);
  pf__ref_release(&b->pool->ref);
  free(b->ops);
  free(b);
}

/* Last for every batch: destroy may free the copier once active reaches
 * zero. */
static void batch_done(pf_copier *c) {
  pthread_mutex_lock(&c->mu);
  if (--c->active == 0) pthread_cond_broadcast(&c->idle);
  pthread_mutex_unlock(&c->mu);
}

void pf__batch_finish(pf_batch *b, int status) {
  /* References go first: a caller woken by the completion may close the
   * pool right away and must not find it still in use. */
  pf_copier *c = b->copier;
  uint64_t token = b->token;
  batch_drop(b);
  pf__write_completion(c->notify_fd, token, status);
  batch_done(c);
}

void pf__batch_abort(pf_batch *b) {
  pf_copier *c = b->copier;
  batch_drop(b);
  batch_done(c);
}

/* ---- threads ---- */

void pf__block_async_signals(sigset_t *old) {
  sigset_t block;
  sigfillset(&block);
  sigdelset(&block, SIGBUS);
  sigdelset(&block, SIGSEGV);
  sigdelset(&block, SIGFPE);
  sigdelset(&block, SIGILL);
  pthread_sigmask(SIG_SETMASK, &block, old);
}

int pf__thread_create(pthread_t *t, void *(*fn)(void *), void *arg) {
  sigset_t old;
  pf__block_async_signals(&old);
  int rc = pthread_create(t, NULL, fn, arg);
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  return rc;
}
