/*
 * The io_uring backend of the SSD component (built when pkg-config finds
 * liburing). One thread owns the ring: it issues queued ops up to the
 * engine's depth, reaps completions, and sleeps in io_uring_wait_cqe. A
 * read of an eventfd stays queued on the ring, so a submit wakes it by
 * writing the eventfd (no polling, no condvar beside the ring). The pool
 * is registered as fixed buffers (1 GiB each, the kernel's largest) so
 * the kernel need not pin pages per op; where registration is refused
 * (RLIMIT_MEMLOCK) ops use plain reads and writes.
 */
#include "pf_ssd.h"

#include <errno.h>
#include <liburing.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <unistd.h>

#define URING_CHUNK_SHIFT 30 /* registered buffer size: 1 GiB */

typedef struct {
  pf_ssd_batch *b;
  uint64_t i;
} uring_slot;

typedef struct {
  struct io_uring ring;
  int efd;
  uint64_t efd_buf;
  uring_slot *slots; /* depth of them; free ones have b == NULL */
  int *free_ids;
  int n_free;
  pthread_t thread;
} uring_state;

int pf_ssd_uring_built(void) { return 1; }

static void arm_wake(uring_state *u) {
  struct io_uring_sqe *sqe = io_uring_get_sqe(&u->ring);
  io_uring_prep_read(sqe, u->efd, &u->efd_buf, sizeof(u->efd_buf), 0);
  io_uring_sqe_set_data64(sqe, 0);
}

static void prep_op(pf_ssd_engine *e, uring_state *u, int id) {
  uring_slot *s = &u->slots[id];
  const pf_ssd_op *op = &s->b->ops[s->i];
  uint8_t *buf = e->pool->base + op->pool_offset;
  int fd = s->b->file->fd;
  struct io_uring_sqe *sqe = io_uring_get_sqe(&u->ring);
  uint64_t chunk = op->pool_offset >> URING_CHUNK_SHIFT;
  int fixed = e->registered && ((op->pool_offset + op->len - 1) >> URING_CHUNK_SHIFT) == chunk;
  if (s->b->direction == PF_SSD_READ) {
    if (fixed) io_uring_prep_read_fixed(sqe, fd, buf, (unsigned)op->len, op->file_offset, (int)chunk);
    else io_uring_prep_read(sqe, fd, buf, (unsigned)op->len, op->file_offset);
  } else {
    if (fixed) io_uring_prep_write_fixed(sqe, fd, buf, (unsigned)op->len, op->file_offset, (int)chunk);
    else io_uring_prep_write(sqe, fd, buf, (unsigned)op->len, op->file_offset);
  }
  io_uring_sqe_set_data64(sqe, (uint64_t)id + 1);
}

/* A finished op: a short result is completed synchronously (it happens at
 * the end of a file or on a full file system, never on the hot path). */
static void reap_op(pf_ssd_engine *e, uring_state *u, int id, int res) {
  uring_slot *s = &u->slots[id];
  pf_ssd_batch *b = s->b;
  const pf_ssd_op *op = &b->ops[s->i];
  int st;
  if (res < 0) st = (res == -ENOSPC || res == -EDQUOT) ? PF_ENOSPC : PF_EIO;
  else if ((uint64_t)res == op->len) st = PF_OK;
  else st = pf__ssd_rw(b->file->fd, b->direction, e->pool->base + op->pool_offset, op->len, op->file_offset, (uint64_t)res);
  s->b = NULL;
  u->free_ids[u->n_free++] = id;
  pf__ssd_op_done(e, b, st);
}

static void *uring_thread(void *arg) {
  pf_ssd_engine *e = arg;
  uring_state *u = e->uring;
  arm_wake(u);
  int inflight = 0, exiting = 0;
  for (;;) {
    pthread_mutex_lock(&e->mu);
    while (u->n_free > 0) {
      int id = u->free_ids[u->n_free - 1];
      if (!pf__ssd_take_locked(e, &u->slots[id].b, &u->slots[id].i)) break;
      u->n_free--;
      prep_op(e, u, id);
      inflight++;
    }
    exiting = e->exiting;
    pthread_mutex_unlock(&e->mu);
    if (exiting && inflight == 0) break;
    int rc = io_uring_submit_and_wait(&u->ring, 1);
    if (rc < 0 && rc != -EINTR && rc != -EAGAIN && rc != -EBUSY) {
      /* The ring itself failed: nothing sane is left to do but wait for
       * what is in flight; reaping below still finishes every op. */
      struct io_uring_cqe *c;
      if (io_uring_wait_cqe(&u->ring, &c) < 0) continue;
    }
    struct io_uring_cqe *cqe;
    unsigned head, n = 0;
    io_uring_for_each_cqe(&u->ring, head, cqe) {
      uint64_t data = io_uring_cqe_get_data64(cqe);
      if (data == 0) arm_wake(u);
      else {
        reap_op(e, u, (int)(data - 1), cqe->res);
        inflight--;
      }
      n++;
    }
    io_uring_cq_advance(&u->ring, n);
  }
  return NULL;
}

static void uring_free(uring_state *u) {
  free(u->slots);
  free(u->free_ids);
  if (u->efd >= 0) close(u->efd);
  free(u);
}

/* Registers the pool in 1 GiB buffers; best effort. */
static int register_pool(pf_ssd_engine *e, uring_state *u) {
  uint64_t n = (e->pool->size + (1ull << URING_CHUNK_SHIFT) - 1) >> URING_CHUNK_SHIFT;
  if (n > 16384) return 0;
  struct iovec *iov = calloc(n, sizeof(*iov));
  if (iov == NULL) return 0;
  for (uint64_t i = 0; i < n; i++) {
    uint64_t off = i << URING_CHUNK_SHIFT, left = e->pool->size - off;
    iov[i].iov_base = e->pool->base + off;
    iov[i].iov_len = left < (1ull << URING_CHUNK_SHIFT) ? left : (1ull << URING_CHUNK_SHIFT);
  }
  int ok = io_uring_register_buffers(&u->ring, iov, (unsigned)n) == 0;
  free(iov);
  return ok;
}

int pf__ssd_uring_start(pf_ssd_engine *e) {
  uring_state *u = calloc(1, sizeof(*u));
  if (u == NULL) return PF_ENOMEM;
  u->efd = eventfd(0, EFD_CLOEXEC);
  u->slots = calloc((size_t)e->depth, sizeof(*u->slots));
  u->free_ids = calloc((size_t)e->depth, sizeof(*u->free_ids));
  if (u->efd < 0 || u->slots == NULL || u->free_ids == NULL) {
    uring_free(u);
    return PF_ENOMEM;
  }
  for (int i = 0; i < e->depth; i++) u->free_ids[u->n_free++] = e->depth - 1 - i;
  /* depth ops plus the wake read; a seccomp'd or disabled io_uring
   * (io_uring_disabled sysctl) fails here and AUTO takes threads. */
  if (io_uring_queue_init((unsigned)e->depth + 1, &u->ring, 0) < 0) {
    uring_free(u);
    return PF_ENOTSUP;
  }
  e->registered = register_pool(e, u);
  e->uring = u;
  if (pf__thread_create(&u->thread, uring_thread, e) != 0) {
    io_uring_queue_exit(&u->ring);
    uring_free(u);
    e->uring = NULL;
    e->registered = 0;
    return PF_ENOMEM;
  }
  return PF_OK;
}

void pf__ssd_uring_wake(pf_ssd_engine *e) {
  uring_state *u = e->uring;
  uint64_t one = 1;
  while (write(u->efd, &one, sizeof(one)) < 0 && errno == EINTR) {
  }
}

void pf__ssd_uring_stop(pf_ssd_engine *e) {
  uring_state *u = e->uring;
  pthread_mutex_lock(&e->mu);
  e->exiting = 1;
  pthread_mutex_unlock(&e->mu);
  pf__ssd_uring_wake(e);
  pthread_join(u->thread, NULL);
  io_uring_queue_exit(&u->ring);
  uring_free(u);
  e->uring = NULL;
}
