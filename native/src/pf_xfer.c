/*
 * Cross-host transfers over UCX UCP (pegaflow_xfer.h).
 *
 * Locking: one mutex per agent guards the UCX worker (created in
 * UCS_THREAD_MODE_SERIALIZED: UCX relies on us to serialise it) and every
 * field of the agent's peers, memories and batches. The progress thread
 * takes it around each ucp_worker_progress, so UCX callbacks (GET
 * completions, endpoint errors, endpoint closes) run under it too.
 *
 * Sleeping: the progress thread progresses until the worker is idle, arms
 * the worker's event fd (ucp_worker_arm) under the mutex and polls it
 * without the mutex. Whoever changes the worker's work under the mutex
 * (posts GETs, closes an endpoint, stops the agent) then calls
 * ucp_worker_signal, so a change made after the arm always wakes the poll.
 *
 * Completions are queued under the mutex and written to the notify fd
 * after it is released (flush_done), so a slow reader never stalls the
 * worker while it holds the lock.
 *
 * Window: a peer has at most PF_XFER_WINDOW_OPS GETs and about
 * PF_XFER_WINDOW_BYTES in flight; further ops wait in the peer's queue of
 * batches (FIFO) and are posted as GETs complete. This bounds UCX's own
 * queues on both sides (over TCP the target queues one reply per GET it
 * received) and keeps one huge batch from delaying a later small one on
 * the same peer by more than a window.
 *
 * Ending reads early: over TCP, UCX emulates a GET in software (the target
 * answers with active messages, ucp/rma/rma_sw.c), and UCX (1.13 and still
 * upstream) aborts the target process when the reader's endpoint goes away
 * while the target is sending replies (ucs_fatal "unexpected error:
 * Endpoint timeout", or an assertion in the TCP endpoint's pending purge).
 * So cancel and peer close never tear an endpoint down under its own GETs
 * if they can help it: they stop posting, wait (bounded, PF_XFER_DRAIN_MS)
 * for the window in flight, and only then close. A forced cancel closes at
 * once, for a peer that stopped answering.
 */
#include "pf_internal.h"
#include "pegaflow_xfer.h"

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <ucp/api/ucp.h>

#define PF_XFER_WINDOW_OPS 256u
#define PF_XFER_WINDOW_BYTES (16ull << 20)

typedef struct xfer_region {
  ucp_rkey_h rkey; /* valid until the peer is freed */
  uint64_t base, size;
} xfer_region;

typedef struct xfer_batch xfer_batch;

/* One op of a batch; the GET's user data. */
typedef struct xfer_slot {
  pf_xfer_op op;
  xfer_batch *batch;
} xfer_slot;

struct xfer_batch {
  xfer_batch *prev, *next; /* the agent's active list, then its done list */
  xfer_batch *qnext;       /* the peer's queue of batches with ops to post */
  pf_xfer_peer *peer;
  pf_xfer_mem *mem;
  xfer_region region; /* a copy: the peer's array may grow */
  uint64_t token;
  xfer_slot *slots; /* the batch's non-empty ops */
  uint64_t n_slots, posted;
  uint64_t pending; /* ops not completed (posted or not), +1 while submitting */
  int status;       /* PF_OK or the first failure */
  int cancelled;
};

struct pf_xfer_agent {
  pthread_mutex_t mu;
  pthread_cond_t changed; /* a batch finished or an endpoint close completed */
  ucp_context_h ctx;
  ucp_worker_h worker;
  int efd;
  int notify_fd;
  uint8_t *addr;
  size_t addr_len;
  pthread_t thread;
  int stopping;
  long n_peers, n_mems;
  pf_xfer_peer *peers;           /* every open peer */
  xfer_batch *active;            /* batches with GETs in flight */
  xfer_batch *done, *done_tail;  /* finished, completion not yet written */
};

struct pf_xfer_mem {
  pf_xfer_agent *agent;
  ucp_mem_h memh;
  uint8_t *base;
  uint64_t size;
  void *rkey;
  size_t rkey_len;
  pf_pool *pool; /* referenced while registered, or NULL */
  long active;   /* batches reading into it */
};

struct pf_xfer_peer {
  pf_xfer_agent *agent;
  pf_xfer_peer *prev, *next;
  ucp_ep_h ep;      /* NULL once its close started */
  int fail_code;    /* PF_OK, or what in-flight batches end with */
  int close_wanted; /* the error handler asked the progress thread to close */
  int ep_closed;    /* UCX released the endpoint */
  xfer_region *regions;
  uint32_t n_regions, cap_regions;
  long active;                /* batches on this peer */
  xfer_batch *qhead, *qtail;  /* batches with ops not yet posted */
  uint64_t inflight_ops, inflight_bytes;
};

const char *pf_xfer_backend(void) { return "ucx"; }

/* ---- lists ---- */

#define LIST_PUSH(head, x) \
  do {                     \
    (x)->prev = NULL;      \
    (x)->next = (head);    \
    if (head) (head)->prev = (x); \
    (head) = (x);          \
  } while (0)

#define LIST_UNLINK(head, x)                \
  do {                                      \
    if ((x)->prev) (x)->prev->next = (x)->next; \
    else (head) = (x)->next;                \
    if ((x)->next) (x)->next->prev = (x)->prev; \
  } while (0)

/* ---- batches (all under the agent mutex) ---- */

static void batch_finish(pf_xfer_agent *a, xfer_batch *b) {
  LIST_UNLINK(a->active, b);
  b->peer->active--;
  b->mem->active--;
  b->next = NULL;
  if (a->done_tail) a->done_tail->next = b;
  else a->done = b;
  a->done_tail = b;
  pthread_cond_broadcast(&a->changed);
}

/* UCX errors that say the op itself was wrong, not the connection. */
static int is_op_error(ucs_status_t st) {
  return st == UCS_ERR_INVALID_PARAM || st == UCS_ERR_UNSUPPORTED || st == UCS_ERR_INVALID_ADDR ||
         st == UCS_ERR_NO_MEMORY || st == UCS_ERR_NO_RESOURCE;
}

static void batch_fail(xfer_batch *b, ucs_status_t st) {
  if (b->status != PF_OK) return;
  if (b->cancelled) b->status = PF_ECANCELED;
  else if (b->peer->fail_code != PF_OK) b->status = b->peer->fail_code;
  else b->status = is_op_error(st) ? PF_ECOPY : PF_EPEER;
}

static void op_done(xfer_batch *b, int failed, ucs_status_t st) {
  if (failed) batch_fail(b, st);
  if (--b->pending == 0) batch_finish(b->peer->agent, b);
}

static void get_done(void *req, ucs_status_t st, void *user) {
  xfer_slot *s = user;
  pf_xfer_peer *p = s->batch->peer;
  if (--p->inflight_ops == 0) pthread_cond_broadcast(&p->agent->changed); /* a drain waits for it */
  p->inflight_bytes -= s->op.len;
  ucp_request_free(req);
  op_done(s->batch, st != UCS_OK, st);
}

static void queue_pop(pf_xfer_peer *p) {
  p->qhead = p->qhead->qnext;
  if (p->qhead == NULL) p->qtail = NULL;
}

/* Takes b off its peer's queue and ends its unposted ops (status set). */
static void batch_unqueue(xfer_batch *b) {
  pf_xfer_peer *p = b->peer;
  xfer_batch **link = &p->qhead, *prev = NULL;
  while (*link && *link != b) {
    prev = *link;
    link = &(*link)->qnext;
  }
  if (*link == NULL) return; /* every op posted already */
  *link = b->qnext;
  if (p->qtail == b) p->qtail = prev;
  b->pending -= b->n_slots - b->posted;
  b->posted = b->n_slots;
  if (b->pending == 0) batch_finish(p->agent, b);
}

/* Posts queued ops while the window has room; on a closed or failed peer
 * (or a failed batch) ends the unposted ops instead. Returns the number of
 * GETs posted. */
static unsigned peer_pump(pf_xfer_peer *p) {
  unsigned posted = 0;
  while (p->qhead) {
    xfer_batch *b = p->qhead;
    if (p->ep == NULL || p->fail_code != PF_OK || b->status != PF_OK) {
      batch_fail(b, UCS_ERR_CANCELED);
      batch_unqueue(b);
      continue;
    }
    xfer_slot *s = &b->slots[b->posted];
    if (p->inflight_ops > 0 &&
        (p->inflight_ops >= PF_XFER_WINDOW_OPS || p->inflight_bytes + s->op.len > PF_XFER_WINDOW_BYTES))
      break;
    if (++b->posted == b->n_slots) queue_pop(p);
    ucp_request_param_t prm = {
        .op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_MEMH,
        .cb.send = get_done,
        .user_data = s,
        .memh = b->mem->memh,
    };
    ucs_status_ptr_t sp = ucp_get_nbx(p->ep, b->mem->base + s->op.local_offset, (size_t)s->op.len,
                                      b->region.base + s->op.remote_offset, b->region.rkey, &prm);
    posted++;
    if (UCS_PTR_IS_PTR(sp)) {
      p->inflight_ops++;
      p->inflight_bytes += s->op.len;
    } else {
      op_done(b, UCS_PTR_STATUS(sp) != UCS_OK, UCS_PTR_STATUS(sp));
    }
  }
  return posted;
}

/* Writes the queued completions; called without the mutex. */
static void flush_done(pf_xfer_agent *a) {
  pthread_mutex_lock(&a->mu);
  xfer_batch *b = a->done;
  a->done = a->done_tail = NULL;
  pthread_mutex_unlock(&a->mu);
  while (b) {
    xfer_batch *next = b->next;
    pf__write_completion(a->notify_fd, b->token, b->status);
    free(b->slots);
    free(b);
    b = next;
  }
}

/* ---- endpoints (under the agent mutex) ---- */

static void ep_close_done(void *req, ucs_status_t st, void *user) {
  (void)st;
  pf_xfer_peer *p = user;
  p->ep_closed = 1;
  ucp_request_free(req);
  pthread_cond_broadcast(&p->agent->changed);
}

/* Force-closes p's endpoint once: UCX completes its outstanding GETs with
 * an error, then the close itself. code is what the batches end with. */
static void peer_close_ep(pf_xfer_peer *p, int code) {
  if (p->fail_code == PF_OK) p->fail_code = code;
  p->close_wanted = 0;
  if (p->ep == NULL) return;
  ucp_ep_h ep = p->ep;
  p->ep = NULL;
  ucp_request_param_t prm = {
      .op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS | UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA,
      .flags = UCP_EP_CLOSE_FLAG_FORCE,
      .cb.send = ep_close_done,
      .user_data = p,
  };
  ucs_status_ptr_t r = ucp_ep_close_nbx(ep, &prm);
  if (!UCS_PTR_IS_PTR(r)) p->ep_closed = 1;
  peer_pump(p); /* ends the ops never posted */
  ucp_worker_signal(p->agent->worker);
}

/* Stops posting on p (queued ops end with code) and waits until its GETs
 * in flight completed or PF_XFER_DRAIN_MS passed (the mutex is released
 * while waiting). */
#define PF_XFER_DRAIN_MS 1000
static void peer_drain(pf_xfer_peer *p, int code) {
  pf_xfer_agent *a = p->agent;
  if (p->fail_code == PF_OK) p->fail_code = code;
  peer_pump(p);
  struct timespec until;
  clock_gettime(CLOCK_MONOTONIC, &until);
  until.tv_sec += PF_XFER_DRAIN_MS / 1000;
  until.tv_nsec += (PF_XFER_DRAIN_MS % 1000) * 1000000L;
  if (until.tv_nsec >= 1000000000L) {
    until.tv_sec++;
    until.tv_nsec -= 1000000000L;
  }
  while (p->inflight_ops > 0 && p->ep != NULL)
    if (pthread_cond_timedwait(&a->changed, &a->mu, &until) == ETIMEDOUT) break;
}

/* UCX asks the owner of a failed endpoint to close it; that is done after
 * the progress call that reported it, not from inside UCX. */
static void ep_error(void *arg, ucp_ep_h ep, ucs_status_t st) {
  (void)ep;
  (void)st;
  pf_xfer_peer *p = arg;
  if (p->fail_code == PF_OK) p->fail_code = PF_EPEER;
  p->close_wanted = 1;
}

/* ---- the progress thread ---- */

static void *progress_main(void *arg) {
  pf_xfer_agent *a = arg;
  for (;;) {
    pthread_mutex_lock(&a->mu);
    unsigned n = ucp_worker_progress(a->worker);
    for (pf_xfer_peer *p = a->peers; p; p = p->next) {
      if (p->close_wanted) peer_close_ep(p, PF_EPEER);
      n += peer_pump(p);
    }
    int stop = a->stopping;
    ucs_status_t st = UCS_OK;
    if (n == 0 && !stop) st = ucp_worker_arm(a->worker);
    pthread_mutex_unlock(&a->mu);
    flush_done(a);
    if (stop) break;
    if (n != 0 || st == UCS_ERR_BUSY) continue;
    /* An arm failure other than busy is not expected; a bounded poll
     * keeps progress going (slowly) instead of sleeping forever. */
    struct pollfd pfd = {.fd = a->efd, .events = POLLIN};
    (void)poll(&pfd, 1, st == UCS_OK ? -1 : 10);
  }
  return NULL;
}

/* ---- agent ---- */

static void agent_free(pf_xfer_agent *a) {
  if (a->worker) ucp_worker_destroy(a->worker);
  if (a->ctx) ucp_cleanup(a->ctx);
  pthread_cond_destroy(&a->changed);
  pthread_mutex_destroy(&a->mu);
  free(a->addr);
  free(a);
}

/* Creates the UCX context and worker; threads UCX starts for them inherit
 * a mask with every asynchronous signal blocked (as pf__thread_create). */
static int agent_ucx_init(pf_xfer_agent *a) {
  sigset_t old;
  pf__block_async_signals(&old);
  int rc = PF_EIO;
  ucp_config_t *cfg = NULL;
  if (ucp_config_read(NULL, NULL, &cfg) != UCS_OK) goto out;
  ucp_params_t params = {
      .field_mask = UCP_PARAM_FIELD_FEATURES,
      .features = UCP_FEATURE_RMA | UCP_FEATURE_WAKEUP,
  };
  ucs_status_t st = ucp_init(&params, cfg, &a->ctx);
  ucp_config_release(cfg);
  if (st != UCS_OK) {
    a->ctx = NULL;
    goto out;
  }
  ucp_worker_params_t wp = {
      .field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE,
      .thread_mode = UCS_THREAD_MODE_SERIALIZED,
  };
  if (ucp_worker_create(a->ctx, &wp, &a->worker) != UCS_OK) {
    a->worker = NULL;
    goto out;
  }
  if (ucp_worker_get_efd(a->worker, &a->efd) != UCS_OK) goto out;
  ucp_address_t *addr;
  size_t len;
  if (ucp_worker_get_address(a->worker, &addr, &len) != UCS_OK) goto out;
  a->addr = malloc(len);
  if (a->addr == NULL) rc = PF_ENOMEM;
  else {
    memcpy(a->addr, addr, len);
    a->addr_len = len;
    rc = PF_OK;
  }
  ucp_worker_release_address(a->worker, addr);
out:
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  return rc;
}

int pf_xfer_agent_create(int notify_fd, pf_xfer_agent **out) {
  if (out == NULL) return PF_EINVAL;
  *out = NULL;
  if (notify_fd < 0) return PF_EINVAL;
  pf_xfer_agent *a = calloc(1, sizeof *a);
  if (a == NULL) return PF_ENOMEM;
  pthread_mutex_init(&a->mu, NULL);
  pthread_condattr_t ca; /* peer_drain waits on CLOCK_MONOTONIC */
  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  pthread_cond_init(&a->changed, &ca);
  pthread_condattr_destroy(&ca);
  a->notify_fd = notify_fd;
  int rc = agent_ucx_init(a);
  if (rc == PF_OK && pf__thread_create(&a->thread, progress_main, a) != 0) rc = PF_ENOMEM;
  if (rc != PF_OK) {
    agent_free(a);
    return rc;
  }
  *out = a;
  return PF_OK;
}

/* Copies a blob out under the buffer contract of pf_xfer_agent_address. */
static int blob_out(const void *blob, size_t blob_len, uint8_t *buf, uint64_t cap, uint64_t *len) {
  if (len == NULL || (buf == NULL && cap > 0)) return PF_EINVAL;
  *len = blob_len;
  if (buf == NULL) return PF_OK;
  if (cap < blob_len) return PF_ERANGE;
  memcpy(buf, blob, blob_len);
  return PF_OK;
}

int pf_xfer_agent_address(pf_xfer_agent *a, uint8_t *buf, uint64_t cap, uint64_t *len) {
  if (a == NULL) return PF_EINVAL;
  return blob_out(a->addr, a->addr_len, buf, cap, len);
}

int pf_xfer_agent_destroy(pf_xfer_agent *a) {
  if (a == NULL) return PF_EINVAL;
  pthread_mutex_lock(&a->mu);
  int busy = a->n_peers > 0 || a->n_mems > 0 || a->stopping;
  if (!busy) {
    a->stopping = 1;
    ucp_worker_signal(a->worker);
  }
  pthread_mutex_unlock(&a->mu);
  if (busy) return PF_ECLOSED;
  pthread_join(a->thread, NULL);
  flush_done(a);
  agent_free(a);
  return PF_OK;
}

/* ---- registered memory ---- */

static int mem_new(pf_xfer_agent *a, void *base, uint64_t size, pf_pool *pool, pf_xfer_mem **out) {
  pf_xfer_mem *m = calloc(1, sizeof *m);
  if (m == NULL) return PF_ENOMEM;
  *m = (pf_xfer_mem){.agent = a, .base = base, .size = size, .pool = pool};
  ucp_mem_map_params_t mp = {
      .field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH | UCP_MEM_MAP_PARAM_FIELD_PROT,
      .address = base,
      .length = (size_t)size,
      /* Peers may read what a transfer exposes, never write: an RDMA NIC
       * then refuses a remote PUT into the pool whatever rkey it carries. */
      .prot = UCP_MEM_MAP_PROT_LOCAL_READ | UCP_MEM_MAP_PROT_LOCAL_WRITE | UCP_MEM_MAP_PROT_REMOTE_READ,
  };
  int rc = PF_EIO;
  pthread_mutex_lock(&a->mu);
  if (a->stopping) rc = PF_ECLOSED;
  else if (ucp_mem_map(a->ctx, &mp, &m->memh) == UCS_OK) {
    if (ucp_rkey_pack(a->ctx, m->memh, &m->rkey, &m->rkey_len) == UCS_OK) {
      a->n_mems++;
      rc = PF_OK;
    } else {
      ucp_mem_unmap(a->ctx, m->memh);
    }
  }
  pthread_mutex_unlock(&a->mu);
  if (rc != PF_OK) {
    free(m);
    return rc;
  }
  *out = m;
  return PF_OK;
}

int pf_xfer_mem_register(pf_xfer_agent *a, void *base, uint64_t size, pf_xfer_mem **out) {
  if (out == NULL) return PF_EINVAL;
  *out = NULL;
  if (a == NULL || base == NULL || size == 0 || size > (uint64_t)SIZE_MAX / 2 ||
      (uintptr_t)base > UINTPTR_MAX - size)
    return PF_EINVAL;
  return mem_new(a, base, size, NULL, out);
}

int pf_xfer_mem_register_pool(pf_xfer_agent *a, pf_pool *pool, pf_xfer_mem **out) {
  if (out == NULL) return PF_EINVAL;
  *out = NULL;
  if (a == NULL || pool == NULL) return PF_EINVAL;
  int rc = pf__ref_acquire(&pool->ref);
  if (rc != PF_OK) return rc;
  rc = mem_new(a, pool->base, pool->size, pool, out);
  if (rc != PF_OK) pf__ref_release(&pool->ref);
  return rc;
}

int pf_xfer_mem_rkey(pf_xfer_mem *m, uint8_t *buf, uint64_t cap, uint64_t *len) {
  if (m == NULL) return PF_EINVAL;
  return blob_out(m->rkey, m->rkey_len, buf, cap, len);
}

uint64_t pf_xfer_mem_base(const pf_xfer_mem *m) { return m ? (uint64_t)(uintptr_t)m->base : 0; }
uint64_t pf_xfer_mem_size(const pf_xfer_mem *m) { return m ? m->size : 0; }

int pf_xfer_mem_deregister(pf_xfer_mem *m) {
  if (m == NULL) return PF_EINVAL;
  pf_xfer_agent *a = m->agent;
  pthread_mutex_lock(&a->mu);
  while (m->active > 0) pthread_cond_wait(&a->changed, &a->mu);
  ucp_rkey_buffer_release(m->rkey);
  ucp_mem_unmap(a->ctx, m->memh);
  a->n_mems--;
  pthread_mutex_unlock(&a->mu);
  if (m->pool) pf__ref_release(&m->pool->ref);
  free(m);
  return PF_OK;
}

/* ---- peers ---- */

int pf_xfer_peer_connect(pf_xfer_agent *a, const uint8_t *addr, uint64_t addr_len, pf_xfer_peer **out) {
  if (out == NULL) return PF_EINVAL;
  *out = NULL;
  if (a == NULL || addr == NULL || addr_len == 0 || addr_len > PF_XFER_MAX_BLOB) return PF_EINVAL;
  pf_xfer_peer *p = calloc(1, sizeof *p);
  if (p == NULL) return PF_ENOMEM;
  p->agent = a;
  ucp_ep_params_t ep = {
      .field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                    UCP_EP_PARAM_FIELD_ERR_HANDLER,
      .address = (const ucp_address_t *)addr,
      .err_mode = UCP_ERR_HANDLING_MODE_PEER,
      .err_handler = {.cb = ep_error, .arg = p},
  };
  int rc = PF_OK;
  pthread_mutex_lock(&a->mu);
  if (a->stopping) rc = PF_ECLOSED;
  else if (ucp_ep_create(a->worker, &ep, &p->ep) != UCS_OK) rc = PF_EIO;
  if (rc == PF_OK) {
    LIST_PUSH(a->peers, p);
    a->n_peers++;
    ucp_worker_signal(a->worker);
  }
  pthread_mutex_unlock(&a->mu);
  if (rc != PF_OK) {
    free(p);
    return rc;
  }
  *out = p;
  return PF_OK;
}

int pf_xfer_peer_add_region(pf_xfer_peer *p, const uint8_t *rkey, uint64_t rkey_len, uint64_t remote_base,
                            uint64_t size, uint32_t *id) {
  if (id == NULL) return PF_EINVAL;
  *id = 0;
  if (p == NULL || rkey == NULL || rkey_len == 0 || rkey_len > PF_XFER_MAX_BLOB || size == 0 ||
      remote_base > UINT64_MAX - size)
    return PF_EINVAL;
  pf_xfer_agent *a = p->agent;
  int rc = PF_OK;
  pthread_mutex_lock(&a->mu);
  if (p->ep == NULL) rc = PF_EPEER;
  else if (p->n_regions == PF_XFER_MAX_REGIONS) rc = PF_ERANGE;
  else if (p->n_regions == p->cap_regions) {
    uint32_t cap = p->cap_regions ? p->cap_regions * 2 : 8;
    xfer_region *r = realloc(p->regions, cap * sizeof *r);
    if (r == NULL) rc = PF_ENOMEM;
    else {
      p->regions = r;
      p->cap_regions = cap;
    }
  }
  ucp_rkey_h rk = NULL;
  if (rc == PF_OK && ucp_ep_rkey_unpack(p->ep, rkey, &rk) != UCS_OK) rc = PF_EINVAL;
  if (rc == PF_OK) {
    p->regions[p->n_regions] = (xfer_region){.rkey = rk, .base = remote_base, .size = size};
    *id = p->n_regions++;
  }
  pthread_mutex_unlock(&a->mu);
  return rc;
}

int pf_xfer_peer_status(pf_xfer_peer *p) {
  if (p == NULL) return PF_EINVAL;
  pthread_mutex_lock(&p->agent->mu);
  int rc = p->ep == NULL || p->fail_code != PF_OK ? PF_EPEER : PF_OK;
  pthread_mutex_unlock(&p->agent->mu);
  return rc;
}

int pf_xfer_peer_close(pf_xfer_peer *p) {
  if (p == NULL) return PF_EINVAL;
  pf_xfer_agent *a = p->agent;
  pthread_mutex_lock(&a->mu);
  peer_drain(p, PF_ECANCELED);
  peer_close_ep(p, PF_ECANCELED);
  while (!p->ep_closed || p->active > 0) pthread_cond_wait(&a->changed, &a->mu);
  for (uint32_t i = 0; i < p->n_regions; i++) ucp_rkey_destroy(p->regions[i].rkey);
  LIST_UNLINK(a->peers, p);
  a->n_peers--;
  pthread_mutex_unlock(&a->mu);
  flush_done(a);
  free(p->regions);
  free(p);
  return PF_OK;
}

/* ---- batches ---- */

int pf_xfer_get(pf_xfer_peer *p, uint32_t region, pf_xfer_mem *m, const pf_xfer_op *ops, uint64_t n_ops,
                uint64_t token) {
  if (p == NULL || m == NULL || (ops == NULL && n_ops > 0) || n_ops > PF_XFER_MAX_OPS) return PF_EINVAL;
  pf_xfer_agent *a = p->agent;
  if (m->agent != a) return PF_EINVAL;
  uint64_t n_slots = 0;
  for (uint64_t i = 0; i < n_ops; i++) n_slots += ops[i].len != 0;
  xfer_batch *b = calloc(1, sizeof *b);
  xfer_slot *slots = n_slots ? malloc((size_t)n_slots * sizeof *slots) : NULL;
  if (b == NULL || (n_slots && slots == NULL)) {
    free(b);
    free(slots);
    return PF_ENOMEM;
  }
  pthread_mutex_lock(&a->mu);
  int rc = PF_OK;
  if (region >= p->n_regions) rc = PF_EINVAL;
  /* Every extent against the advertised remote size and the local size
   * before anything is posted: over TCP the remote side would not refuse
   * a read outside its registration. */
  for (uint64_t i = 0, j = 0; rc == PF_OK && i < n_ops; i++) {
    if (!pf__in_bounds(ops[i].remote_offset, ops[i].len, p->regions[region].size) ||
        !pf__in_bounds(ops[i].local_offset, ops[i].len, m->size))
      rc = PF_ERANGE;
    else if (ops[i].len != 0)
      slots[j++] = (xfer_slot){.op = ops[i], .batch = b};
  }
  if (rc == PF_OK && (p->ep == NULL || p->fail_code != PF_OK)) rc = PF_EPEER;
  if (rc != PF_OK) {
    pthread_mutex_unlock(&a->mu);
    free(slots);
    free(b);
    return rc;
  }
  *b = (xfer_batch){.peer = p, .mem = m, .region = p->regions[region], .token = token, .slots = slots,
                    .n_slots = n_slots, .pending = n_slots + 1, .status = PF_OK};
  LIST_PUSH(a->active, b);
  p->active++;
  m->active++;
  if (n_slots > 0) {
    if (p->qtail) p->qtail->qnext = b;
    else p->qhead = b;
    p->qtail = b;
    peer_pump(p);
  }
  if (--b->pending == 0) batch_finish(a, b);
  ucp_worker_signal(a->worker);
  pthread_mutex_unlock(&a->mu);
  flush_done(a);
  return PF_OK;
}

int pf_xfer_cancel(pf_xfer_agent *a, uint64_t token, int force) {
  if (a == NULL) return PF_EINVAL;
  pthread_mutex_lock(&a->mu);
  for (xfer_batch *b = a->active; b; b = b->next) {
    if (b->token != token) continue;
    b->cancelled = 1;
    batch_fail(b, UCS_ERR_CANCELED);
    if (force) peer_close_ep(b->peer, PF_EPEER);
    else batch_unqueue(b);
    break;
  }
  pthread_mutex_unlock(&a->mu);
  flush_done(a);
  return PF_OK;
}
