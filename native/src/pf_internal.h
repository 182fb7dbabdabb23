/*
 * Internals shared by the CPU and CUDA builds of pegaflow_native.
 *
 * pf_common.c  error strings, refcounts, bounds checks, batch preparation,
 *              completion records, shared-memory regions.
 * pf_host.c    the host copy engine: copy threads that run batches between
 *              host memory (shm regions) and the pool, with a SIGBUS guard.
 * pf_cpu.c     CPU build: mmap pool, copier = host engine only.
 * pf_cuda.c    CUDA build: pinned pool, IPC regions, per-device streams;
 *              shm regions still go through the host engine.
 */
#ifndef PF_INTERNAL_H
#define PF_INTERNAL_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#include "pegaflow_native.h"

/* Upper bounds that keep every size computation far from overflow. */
#define PF_MAX_OPS (1ull << 32)
#define PF_MAX_THREADS 256

struct pf_pool {
  uint8_t *base;
  uint64_t size;
  int device;
  pthread_mutex_t mu;
  long refs; /* batches in flight that use the pool */
  int closed;
  void (*release)(pf_pool *); /* frees base (backend specific) */
};

enum { PF_MEM_HOST = 0, PF_MEM_DEVICE = 1 };

struct pf_region {
  uint8_t *base;
  uint64_t size;
  int kind; /* PF_MEM_HOST or PF_MEM_DEVICE */
  int device;
  pthread_mutex_t mu;
  long refs; /* batches in flight that use the region */
  int closed;
  void (*release)(pf_region *); /* unmaps base (backend specific) */
};

typedef struct pf_batch pf_batch;
struct pf_batch {
  pf_batch *next;
  pf_copier *copier;
  pf_region *region;
  pf_pool *pool;
  int direction;
  uint64_t token;
  pf_copy_op *ops; /* validated, coalesced, no zero-length op */
  uint64_t n_ops;
  uint64_t total; /* bytes */
  /* Host engine cursor, guarded by the copier's mutex. */
  uint64_t cur_op, cur_off, grab;
  atomic_uint_fast64_t remaining; /* bytes not yet copied */
  atomic_int status;              /* PF_OK or the first failure */
  void *backend;                  /* CUDA: the batch's stream and event */
};

struct pf_copier {
  pthread_mutex_t mu;
  pthread_cond_t work; /* host queue not empty, or exiting */
  pthread_cond_t idle; /* active dropped to zero */
  pf_batch *head, *tail; /* host engine queue */
  long active;           /* batches accepted and not completed */
  int stopping;          /* destroy started: no new submits */
  int exiting;           /* every batch done: threads leave */
  int notify_fd;
  int n_threads;
  pthread_t *threads;
  void *backend; /* CUDA: per-device streams */
};

/* ---- pf_common.c ---- */

int pf__in_bounds(uint64_t off, uint64_t len, uint64_t size);
/* Parses a device UUID (see pf_cuda_device_by_uuid) into its 16 bytes. */
int pf__parse_uuid(const char *s, uint64_t len, uint8_t out[16]);
int pf__region_acquire(pf_region *r);
void pf__region_release(pf_region *r);
pf_region *pf__region_new(uint8_t *base, uint64_t size, int kind, int device,
                          void (*release)(pf_region *));
pf_pool *pf__pool_new(uint8_t *base, uint64_t size, int device, void (*release)(pf_pool *));
void pf__pool_free(pf_pool *p);

/* Validates the arguments and every op, takes references on the region,
 * the pool and the copier, and builds a batch. Nothing is shared until it
 * returns PF_OK; on error no reference is held. */
int pf__batch_new(pf_copier *c, pf_region *region, pf_pool *pool, int direction,
                  const pf_copy_op *ops, uint64_t n_ops, uint64_t token, pf_batch **out);
/* Drops the batch's references, writes its completion record and frees it.
 * Must be called exactly once per batch, from a thread the copier owns. */
void pf__batch_finish(pf_batch *b, int status);
/* Frees a batch that was never started and drops its references without
 * writing a completion (submit failed after pf__batch_new). */
void pf__batch_abort(pf_batch *b);

/* Creates a thread with every asynchronous signal blocked, so signals meant
 * for the host program (Go's preemption, SIGPIPE from a closed notify pipe)
 * are never delivered to it. Synchronous faults stay unblocked. */
int pf__thread_create(pthread_t *t, void *(*fn)(void *), void *arg);

/* Copier lifecycle shared by both builds (the host engine lives here too). */
int pf__copier_new(int threads, int notify_fd, pf_copier **out);
/* Stops new submits and waits until every accepted batch completed. */
void pf__copier_drain(pf_copier *c);
/* After drain: stops the host threads and frees the copier. */
void pf__copier_free(pf_copier *c);

/* ---- pf_host.c ---- */

/* Queues a host-memory batch on the copier's threads. */
void pf__host_enqueue(pf_copier *c, pf_batch *b);
void *pf__host_worker(void *arg);
/* Installs the SIGBUS guard once per process. */
void pf__fault_guard_install(void);

#endif /* PF_INTERNAL_H */
