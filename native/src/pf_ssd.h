/*
 * What the SSD I/O component's two files share: pf_ssd.c (files, engine
 * lifecycle, validation, the batch queue, the pread/pwrite thread pool)
 * and pf_ssd_uring.c (the io_uring ring thread, built with liburing).
 * pf_ssd_uring.c calls pf_ssd.c, never the other way but through the
 * three pf__ssd_uring_* hooks below.
 */
#ifndef PF_SSD_INTERNAL_H
#define PF_SSD_INTERNAL_H

#include "pf_internal.h"
#include "pegaflow_ssd.h"

struct pf_ssd_file {
  int fd;
  int direct;
  uint64_t capacity;
  pf_ref ref; /* batches hold it; the fd closes after the last */
};

typedef struct pf_ssd_batch pf_ssd_batch;
struct pf_ssd_batch {
  pf_ssd_batch *next;
  pf_ssd_file *file;
  int direction;
  uint64_t token;
  pf_ssd_op *ops; /* validated */
  uint64_t n_ops;
  uint64_t next_op;          /* next op to issue, guarded by the engine's mutex */
  atomic_uint_fast64_t left; /* ops not yet finished */
  atomic_int status;         /* PF_OK or the first failure */
};

struct pf_ssd_engine {
  pthread_mutex_t mu;
  pthread_cond_t work; /* queue not empty, or exiting (threads backend) */
  pthread_cond_t idle; /* active dropped to zero */
  pf_ssd_batch *head, *tail;
  long active;  /* batches accepted and not completed */
  int stopping; /* destroy started: no new submits */
  int exiting;  /* every batch done: threads leave */
  int notify_fd;
  pf_pool *pool; /* referenced for the engine's lifetime */
  int backend;   /* PF_SSD_THREADS or PF_SSD_URING */
  int depth;
  int registered; /* io_uring: the pool is registered as fixed buffers */
  int n_threads;
  pthread_t *threads;
  void *uring; /* pf_ssd_uring.c's state */
};

/* Under e->mu: the next op of the head batch (pops the batch once all its
 * ops were taken). 0 when the queue is empty. */
int pf__ssd_take_locked(pf_ssd_engine *e, pf_ssd_batch **b, uint64_t *i);
/* Records one finished op; the batch's last one releases its file, writes
 * its completion and frees it. Called without e->mu held. */
void pf__ssd_op_done(pf_ssd_engine *e, pf_ssd_batch *b, int status);
/* Moves len bytes between buf and the file at off with pread/pwrite until
 * done; `done` bytes are already moved (a short io_uring result). */
int pf__ssd_rw(int fd, int direction, uint8_t *buf, uint64_t len, uint64_t off, uint64_t done);

/* pf_ssd_uring.c (stubs returning PF_ENOTSUP without liburing). */
int pf__ssd_uring_start(pf_ssd_engine *e);
void pf__ssd_uring_wake(pf_ssd_engine *e);
void pf__ssd_uring_stop(pf_ssd_engine *e);

#endif /* PF_SSD_INTERNAL_H */
