/*
 * The SSD I/O component (pegaflow_ssd.h): files, the engine's lifecycle,
 * batch validation and queue, and the pread/pwrite thread pool, which is
 * always built (the fallback where io_uring is absent or refused).
 */
#include "pf_ssd.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static void ssd_file_free(pf_ref *r) {
  pf_ssd_file *f = pf__ref_owner(r, pf_ssd_file, ref);
  close(f->fd);
  pthread_mutex_destroy(&f->ref.mu);
  free(f);
}

int pf_ssd_file_open(const char *path, uint64_t capacity, uint32_t flags, pf_ssd_file **out) {
  if (out == NULL) return PF_EINVAL;
  *out = NULL;
  if (path == NULL || path[0] == '\0' || capacity == 0 || capacity % PF_SSD_ALIGN != 0 ||
      capacity > (UINT64_MAX >> 2) || (flags & ~(PF_SSD_CREATE | PF_SSD_REQUIRE_DIRECT)) != 0)
    return PF_EINVAL;
  int base = O_RDWR | O_CLOEXEC | O_NOFOLLOW | ((flags & PF_SSD_CREATE) ? O_CREAT : 0);
  int direct = 1;
  int fd = open(path, base | O_DIRECT, 0600);
  if (fd < 0 && errno == EINVAL) {
    /* The file system has no O_DIRECT (e.g. tmpfs before Linux 6.6). */
    if (flags & PF_SSD_REQUIRE_DIRECT) return PF_ENOTSUP;
    direct = 0;
    fd = open(path, base, 0600);
  }
  if (fd < 0) return PF_EIO;
  struct stat st;
  if (fstat(fd, &st) != 0 || !(S_ISREG(st.st_mode) || S_ISBLK(st.st_mode))) {
    int saved = errno;
    close(fd);
    errno = saved;
    return PF_EINVAL;
  }
  pf_ssd_file *f = calloc(1, sizeof(*f));
  if (f == NULL) {
    close(fd);
    return PF_ENOMEM;
  }
  f->fd = fd;
  f->direct = direct;
  f->capacity = capacity;
  pf__ref_init(&f->ref, ssd_file_free);
  *out = f;
  return PF_OK;
}

int pf_ssd_file_direct(const pf_ssd_file *f) { return f != NULL && f->direct; }
uint64_t pf_ssd_file_capacity(const pf_ssd_file *f) { return f == NULL ? 0 : f->capacity; }

int pf_ssd_file_close(pf_ssd_file *f) {
  if (f == NULL) return PF_EINVAL;
  return pf__ref_close(&f->ref);
}

int pf__ssd_rw(int fd, int direction, uint8_t *buf, uint64_t len, uint64_t off, uint64_t done) {
  while (done < len) {
    ssize_t n = direction == PF_SSD_READ ? pread(fd, buf + done, len - done, (off_t)(off + done))
                                         : pwrite(fd, buf + done, len - done, (off_t)(off + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == ENOSPC || errno == EDQUOT) return PF_ENOSPC;
      /* O_DIRECT refuses the unaligned remainder after a read that stopped
       * at an unaligned end of file: the file ended first. */
      if (errno == EINVAL && direction == PF_SSD_READ && done % PF_SSD_ALIGN != 0) return PF_ESHORT;
      return PF_EIO;
    }
    if (n == 0) return direction == PF_SSD_READ ? PF_ESHORT : PF_EIO;
    done += (uint64_t)n;
  }
  return PF_OK;
}

int pf__ssd_take_locked(pf_ssd_engine *e, pf_ssd_batch **b, uint64_t *i) {
  pf_ssd_batch *h = e->head;
  if (h == NULL) return 0;
  *b = h;
  *i = h->next_op++;
  if (h->next_op == h->n_ops) {
    e->head = h->next;
    if (e->head == NULL) e->tail = NULL;
  }
  return 1;
}

void pf__ssd_op_done(pf_ssd_engine *e, pf_ssd_batch *b, int status) {
  if (status != PF_OK) {
    int ok = PF_OK;
    atomic_compare_exchange_strong(&b->status, &ok, status);
  }
  if (atomic_fetch_sub(&b->left, 1) != 1) return;
  /* Release before the record: a caller woken by it may close the file. */
  pf__ref_release(&b->file->ref);
  int st = atomic_load(&b->status);
  pf__write_completion(e->notify_fd, b->token, st);
  free(b->ops);
  free(b);
  pthread_mutex_lock(&e->mu);
  if (--e->active == 0) pthread_cond_broadcast(&e->idle);
  pthread_mutex_unlock(&e->mu);
}

static void *ssd_thread(void *arg) {
  pf_ssd_engine *e = arg;
  pthread_mutex_lock(&e->mu);
  for (;;) {
    pf_ssd_batch *b;
    uint64_t i;
    if (!pf__ssd_take_locked(e, &b, &i)) {
      if (e->exiting) break;
      pthread_cond_wait(&e->work, &e->mu);
      continue;
    }
    pthread_mutex_unlock(&e->mu);
    const pf_ssd_op *op = &b->ops[i];
    int st = pf__ssd_rw(b->file->fd, b->direction, e->pool->base + op->pool_offset, op->len, op->file_offset, 0);
    pf__ssd_op_done(e, b, st);
    pthread_mutex_lock(&e->mu);
  }
  pthread_mutex_unlock(&e->mu);
  return NULL;
}

static void engine_free(pf_ssd_engine *e) {
  pf__ref_release(&e->pool->ref);
  free(e->threads);
  pthread_cond_destroy(&e->idle);
  pthread_cond_destroy(&e->work);
  pthread_mutex_destroy(&e->mu);
  free(e);
}

/* Stops and joins the first n threads. */
static void stop_threads(pf_ssd_engine *e, int n) {
  pthread_mutex_lock(&e->mu);
  e->exiting = 1;
  pthread_cond_broadcast(&e->work);
  pthread_mutex_unlock(&e->mu);
  for (int i = 0; i < n; i++) pthread_join(e->threads[i], NULL);
}

static int start_threads(pf_ssd_engine *e) {
  e->threads = calloc((size_t)e->depth, sizeof(pthread_t));
  if (e->threads == NULL) return PF_ENOMEM;
  for (int i = 0; i < e->depth; i++) {
    if (pf__thread_create(&e->threads[i], ssd_thread, e) != 0) {
      stop_threads(e, i);
      return PF_ENOMEM;
    }
  }
  e->n_threads = e->depth;
  return PF_OK;
}

int pf_ssd_engine_create(pf_pool *pool, int backend, int depth, int notify_fd, pf_ssd_engine **out) {
  if (out == NULL) return PF_EINVAL;
  *out = NULL;
  if (pool == NULL || notify_fd < 0 || depth < 1 || depth > PF_SSD_MAX_DEPTH ||
      (backend != PF_SSD_AUTO && backend != PF_SSD_THREADS && backend != PF_SSD_URING))
    return PF_EINVAL;
  if (backend == PF_SSD_URING && !pf_ssd_uring_built()) return PF_ENOTSUP;
  if (pf__ref_acquire(&pool->ref) != PF_OK) return PF_ECLOSED;
  pf_ssd_engine *e = calloc(1, sizeof(*e));
  if (e == NULL) {
    pf__ref_release(&pool->ref);
    return PF_ENOMEM;
  }
  pthread_mutex_init(&e->mu, NULL);
  pthread_cond_init(&e->work, NULL);
  pthread_cond_init(&e->idle, NULL);
  e->notify_fd = notify_fd;
  e->pool = pool;
  e->depth = depth;
  int rc = PF_ENOTSUP;
  if (backend != PF_SSD_THREADS) {
    e->backend = PF_SSD_URING;
    rc = pf__ssd_uring_start(e);
  }
  if (rc != PF_OK && backend != PF_SSD_URING) {
    e->backend = PF_SSD_THREADS;
    rc = start_threads(e);
  }
  if (rc != PF_OK) {
    engine_free(e);
    return rc;
  }
  *out = e;
  return PF_OK;
}

int pf_ssd_engine_info(const pf_ssd_engine *e, int *backend, int *registered) {
  if (e == NULL) return PF_EINVAL;
  if (backend != NULL) *backend = e->backend;
  if (registered != NULL) *registered = e->registered;
  return PF_OK;
}

/* Every op aligned, inside the file's capacity and the pool. */
static int validate(const pf_ssd_engine *e, const pf_ssd_file *f, const pf_ssd_op *ops, uint64_t n) {
  for (uint64_t i = 0; i < n; i++) {
    const pf_ssd_op *op = &ops[i];
    if (op->len == 0 || op->len > PF_SSD_MAX_OP_LEN) return PF_EINVAL;
    if (op->file_offset % PF_SSD_ALIGN != 0 || op->len % PF_SSD_ALIGN != 0 ||
        ((uintptr_t)e->pool->base + op->pool_offset) % PF_SSD_ALIGN != 0)
      return PF_EINVAL;
    if (!pf__in_bounds(op->file_offset, op->len, f->capacity) || !pf__in_bounds(op->pool_offset, op->len, e->pool->size))
      return PF_ERANGE;
  }
  return PF_OK;
}

int pf_ssd_submit(pf_ssd_engine *e, pf_ssd_file *f, int direction, const pf_ssd_op *ops, uint64_t n_ops,
                  uint64_t token) {
  if (e == NULL || f == NULL || ops == NULL || n_ops == 0 || n_ops > PF_SSD_MAX_OPS ||
      (direction != PF_SSD_READ && direction != PF_SSD_WRITE))
    return PF_EINVAL;
  pf_ssd_batch *b = calloc(1, sizeof(*b));
  pf_ssd_op *copy = malloc(n_ops * sizeof(*copy));
  if (b == NULL || copy == NULL) {
    free(b);
    free(copy);
    return PF_ENOMEM;
  }
  /* Validate the copy, so a caller changing ops meanwhile cannot slip one past. */
  memcpy(copy, ops, n_ops * sizeof(*copy));
  int rc = validate(e, f, copy, n_ops);
  if (rc == PF_OK) rc = pf__ref_acquire(&f->ref);
  if (rc != PF_OK) {
    free(b);
    free(copy);
    return rc;
  }
  b->file = f;
  b->direction = direction;
  b->token = token;
  b->ops = copy;
  b->n_ops = n_ops;
  atomic_init(&b->left, n_ops);
  atomic_init(&b->status, PF_OK);
  pthread_mutex_lock(&e->mu);
  if (e->stopping) {
    pthread_mutex_unlock(&e->mu);
    pf__ref_release(&f->ref);
    free(copy);
    free(b);
    return PF_ECLOSED;
  }
  e->active++;
  if (e->tail != NULL) e->tail->next = b;
  else e->head = b;
  e->tail = b;
  if (e->backend == PF_SSD_THREADS) pthread_cond_broadcast(&e->work);
  pthread_mutex_unlock(&e->mu);
  if (e->backend == PF_SSD_URING) pf__ssd_uring_wake(e);
  return PF_OK;
}

int pf_ssd_engine_destroy(pf_ssd_engine *e) {
  if (e == NULL) return PF_EINVAL;
  pthread_mutex_lock(&e->mu);
  e->stopping = 1;
  while (e->active > 0) pthread_cond_wait(&e->idle, &e->mu);
  pthread_mutex_unlock(&e->mu);
  if (e->backend == PF_SSD_URING) pf__ssd_uring_stop(e);
  else stop_threads(e, e->n_threads);
  engine_free(e);
  return PF_OK;
}

#ifndef PF_HAVE_URING
int pf_ssd_uring_built(void) { return 0; }
int pf__ssd_uring_start(pf_ssd_engine *e) {
  (void)e;
  return PF_ENOTSUP;
}
void pf__ssd_uring_wake(pf_ssd_engine *e) { (void)e; }
void pf__ssd_uring_stop(pf_ssd_engine *e) { (void)e; }
#endif
