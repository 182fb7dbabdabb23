/*
 * Internals shared by the CPU and CUDA builds of pegaflow_native.
 *
 * pf_ref.c          closable reference counts (pool, region, event).
 * pf_common.c       error strings, bounds checks, pool and region objects,
 *                   batch preparation, completion records, shm regions.
 * pf_host.c         the copier's lifecycle and its host copy engine: copy
 *                   threads that run batches between host memory (shm
 *                   regions) and the pool, with a SIGBUS guard.
 * pf_cpu.c          CPU build: mmap pool, copier = host engine only.
 * pf_cuda.c         CUDA build, memory objects: pinned pool, IPC regions,
 *                   device lookup by UUID, IPC events (pf_cuda.h).
 * pf_cuda_copier.c  CUDA build, the stream copier: per-device streams,
 *                   batched copies, completion threads; shm regions still
 *                   go through the host engine.
 * pf_xfer.c         cross-host transfers over UCX (pegaflow_xfer.h; built
 *                   when UCX is found): agent, registered memory, peers,
 *                   batched GETs, a progress thread. Calls pf_common.c.
 *
 * Calls go one way: the backends call pf_host.c and pf_common.c, pf_host.c
 * calls pf_common.c, and pf_common.c calls only pf_ref.c.
 */
#ifndef PF_INTERNAL_H
#define PF_INTERNAL_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "pegaflow_native.h"

/* Upper bounds that keep every size computation far from overflow. */
#define PF_MAX_OPS (1ull << 32)
#define PF_MAX_THREADS 256

/* ---- pf_ref.c ---- */

/* A reference count with a "closed" flag, embedded in every object a batch
 * can hold. Acquire fails once the object is closed; whoever finds it
 * closed with no reference left (the close itself, or the last release
 * after it) frees it with free_fn, exactly once. The mutex is the
 * object's only lock: refs and closed change together under it. */
typedef struct pf_ref pf_ref;
struct pf_ref {
  pthread_mutex_t mu;
  long refs; /* batches in flight that use the object */
  int closed;
  void (*free_fn)(pf_ref *); /* frees the object holding this pf_ref */
};

/* The object holding ref, a member named member of type T. */
#define pf__ref_owner(ref, T, member) ((T *)(void *)((char *)(ref) - offsetof(T, member)))

void pf__ref_init(pf_ref *r, void (*free_fn)(pf_ref *));
/* One more reference: PF_OK, or PF_ECLOSED (and none) once closed. */
int pf__ref_acquire(pf_ref *r);
/* Drops a reference; frees the object if it was closed and this was its
 * last reference. */
void pf__ref_release(pf_ref *r);
/* Closes the object, freeing it now if no reference is held (else the last
 * release does). PF_ECLOSED when it was closed already. */
int pf__ref_close(pf_ref *r);
/* Closes and frees the object only while no reference is held; PF_ECLOSED
 * (in use, or closed already) and nothing changed otherwise. */
int pf__ref_close_idle(pf_ref *r);

struct pf_pool {
  uint8_t *base;
  uint64_t size;
  int device;
  pf_ref ref; /* closed only while idle (pf_pool_destroy refuses if busy) */
  void (*release)(pf_pool *); /* frees base (backend specific) */
};

enum { PF_MEM_HOST = 0, PF_MEM_DEVICE = 1 };

struct pf_region {
  uint8_t *base;
  uint64_t size;
  int kind; /* PF_MEM_HOST or PF_MEM_DEVICE */
  int device;
  pf_ref ref; /* pf_region_close frees it after the last batch */
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
  int held;              /* pf_copier_test_hold: host threads start no slice */
  int notify_fd;
  int n_threads;
  pthread_t *threads;
  void *backend; /* CUDA: per-device streams */
};

/* ---- pf_common.c ---- */

int pf__in_bounds(uint64_t off, uint64_t len, uint64_t size);
/* Parses a device UUID (see pf_cuda_device_by_uuid) into its 16 bytes. */
int pf__parse_uuid(const char *s, uint64_t len, uint8_t out[16]);
pf_region *pf__region_new(uint8_t *base, uint64_t size, int kind, int device,
                          void (*release)(pf_region *));
pf_pool *pf__pool_new(uint8_t *base, uint64_t size, int device, void (*release)(pf_pool *));

/* Validates the arguments and every op, takes references on the region,
 * the pool and the copier, and builds a batch. Nothing is shared until it
 * returns PF_OK; on error no reference is held. */
int pf__batch_new(pf_copier *c, pf_region *region, pf_pool *pool, int direction,
                  const pf_copy_op *ops, uint64_t n_ops, uint64_t token, pf_batch **out);
/* Drops the batch's references, writes its completion record and frees it.
 * Must be called exactly once per batch, from a thread the copier owns. */
void pf__batch_finish(pf_batch *b, int status);
/* Writes one pf_completion record to fd (all or nothing on a pipe; waits
 * with poll while a nonblocking fd is full; gives up once nobody reads).
 * Shared by the copier and the xfer agent. */
void pf__write_completion(int fd, uint64_t token, int64_t status);
/* Frees a batch that was never started and drops its references without
 * writing a completion (submit failed after pf__batch_new). */
void pf__batch_abort(pf_batch *b);

/* Creates a thread with every asynchronous signal blocked, so signals meant
 * for the host program (Go's preemption, SIGPIPE from a closed notify pipe)
 * are never delivered to it. Synchronous faults stay unblocked. */
int pf__thread_create(pthread_t *t, void *(*fn)(void *), void *arg);
/* Blocks every asynchronous signal on the calling thread (the mask
 * pf__thread_create gives its threads), saving the old mask in *old. Code
 * that lets a library start threads (UCX) runs between this and
 * pthread_sigmask(SIG_SETMASK, old, NULL). */
void pf__block_async_signals(sigset_t *old);

/* ---- pf_host.c ---- */

/* Copier lifecycle shared by both builds: the copier and its host copy
 * threads (and, once per process, the SIGBUS guard). */
int pf__copier_new(int threads, int notify_fd, pf_copier **out);
/* Stops new submits and waits until every accepted batch completed. */
void pf__copier_drain(pf_copier *c);
/* After drain: stops the host threads and frees the copier. */
void pf__copier_free(pf_copier *c);
/* Queues a host-memory batch on the copier's threads. */
void pf__host_enqueue(pf_copier *c, pf_batch *b);

#endif /* PF_INTERNAL_H */
