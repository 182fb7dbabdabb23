/*
 * The copier's lifecycle (both builds) and the host copy engine.
 *
 * Host copy engine: N threads share a FIFO of batches. A thread takes a
 * slice of the head batch (up to `grab` bytes, possibly part of one op or
 * many small ops) under the copier's mutex and copies it without the lock,
 * so a single large batch is spread over every thread while batches of
 * small blocks cost one lock round trip per slice, not per block.
 *
 * SIGBUS guard: a producer can shrink its shared-memory file while the
 * engine has it mapped; touching the lost pages raises SIGBUS. Copy threads
 * catch that fault and fail the batch with PF_ECOPY instead of killing the
 * process. Faults on any other thread go to the handler that was installed
 * before ours (Go's runtime in the engine), unchanged.
 */
#include "pf_internal.h"

#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__SSE2__)
#include <emmintrin.h>
#define PF_HAVE_STREAM 1
#endif

/* Slices are between these sizes: large enough that locking is noise next
 * to the copy, small enough that a big batch keeps every thread busy. */
#define PF_GRAB_MIN (64u << 10)
#define PF_GRAB_MAX (1u << 20)

static _Thread_local sigjmp_buf *pf_fault_env; /* set while a copy thread copies */
static struct sigaction pf_prev_bus;
static pthread_once_t pf_guard_once = PTHREAD_ONCE_INIT;

static void fault_handler(int sig, siginfo_t *info, void *uctx) {
  sigjmp_buf *env = pf_fault_env;
  if (env != NULL) {
    pf_fault_env = NULL;
    siglongjmp(*env, 1);
  }
  if (pf_prev_bus.sa_flags & SA_SIGINFO) {
    if (pf_prev_bus.sa_sigaction != NULL) {
      pf_prev_bus.sa_sigaction(sig, info, uctx);
      return;
    }
  } else if (pf_prev_bus.sa_handler != SIG_DFL && pf_prev_bus.sa_handler != SIG_IGN) {
    pf_prev_bus.sa_handler(sig);
    return;
  }
  /* Nobody else handles it: put the default action back. Returning re-runs
   * the faulting access, which now terminates the process as it would have
   * without us. */
  struct sigaction dfl;
  memset(&dfl, 0, sizeof dfl);
  dfl.sa_handler = SIG_DFL;
  sigaction(sig, &dfl, NULL);
}

static void guard_install(void) {
  struct sigaction prev, sa;
  if (sigaction(SIGBUS, NULL, &prev) != 0) return;
  pf_prev_bus = prev; /* before ours is live, so chaining never sees junk */
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = fault_handler;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESTART;
  (void)sigaction(SIGBUS, &sa, NULL);
}


/* Batches of at least this many bytes are copied with non-temporal
 * stores: they are far larger than a fair share of the cache, and the
 * destination (a pool block being saved, or a KV block being loaded for a
 * later step) is not read back by this CPU soon. Skipping the
 * read-for-ownership of every destination line measured 1.3-1.8x faster
 * than memcpy here; smaller batches keep memcpy and stay cached. */
#define PF_STREAM_MIN (1u << 20)

#ifdef PF_HAVE_STREAM
static void stream_copy(uint8_t *dst, const uint8_t *src, size_t n) {
  while (n > 0 && ((uintptr_t)dst & 15) != 0) {
    *dst++ = *src++;
    n--;
  }
  size_t i = 0;
  for (; i + 64 <= n; i += 64) {
    __m128i a = _mm_loadu_si128((const __m128i *)(src + i));
    __m128i b = _mm_loadu_si128((const __m128i *)(src + i + 16));
    __m128i c = _mm_loadu_si128((const __m128i *)(src + i + 32));
    __m128i d = _mm_loadu_si128((const __m128i *)(src + i + 48));
    _mm_stream_si128((__m128i *)(dst + i), a);
    _mm_stream_si128((__m128i *)(dst + i + 16), b);
    _mm_stream_si128((__m128i *)(dst + i + 32), c);
    _mm_stream_si128((__m128i *)(dst + i + 48), d);
  }
  memcpy(dst + i, src + i, n - i);
}
#endif

/* Copies `take` bytes of b starting at op `op`, byte `off` within it. */
__attribute__((noinline)) static void copy_slice(const pf_batch *b, uint64_t op, uint64_t off, uint64_t take) {
  uint8_t *region = b->region->base, *pool = b->pool->base;
  int to_pool = b->direction == PF_DIR_REGION_TO_POOL;
#ifdef PF_HAVE_STREAM
  int stream = b->total >= PF_STREAM_MIN;
#endif
  while (take > 0) {
    const pf_copy_op *o = &b->ops[op];
    uint64_t n = o->len - off;
    if (n > take) n = take;
    uint8_t *r = region + o->region_offset + off, *p = pool + o->pool_offset + off;
    uint8_t *dst = to_pool ? p : r;
    const uint8_t *src = to_pool ? r : p;
#ifdef PF_HAVE_STREAM
    if (stream) stream_copy(dst, src, (size_t)n);
    else
#endif
      memcpy(dst, src, (size_t)n);
    take -= n;
    op++;
    off = 0;
  }
#ifdef PF_HAVE_STREAM
  /* Streaming stores are weakly ordered: make them globally visible before
   * the batch can be reported complete. */
  if (stream) _mm_sfence();
#endif
}

/* Runs copy_slice under the SIGBUS guard; returns PF_OK or PF_ECOPY. */
static int guarded_copy(const pf_batch *b, uint64_t op, uint64_t off, uint64_t take) {
  sigjmp_buf env;
  /* savemask=1: the handler runs with SIGBUS blocked; jumping out must
   * unblock it again or the next fault would kill the process. */
  if (sigsetjmp(env, 1) != 0) return PF_ECOPY;
  pf_fault_env = &env;
  copy_slice(b, op, off, take);
  pf_fault_env = NULL;
  return PF_OK;
}

void pf__host_enqueue(pf_copier *c, pf_batch *b) {
  uint64_t grab = b->total / (uint64_t)c->n_threads;
  if (grab < PF_GRAB_MIN) grab = PF_GRAB_MIN;
  if (grab > PF_GRAB_MAX) grab = PF_GRAB_MAX;
  b->grab = grab;
  b->cur_op = 0;
  b->cur_off = 0;
  b->next = NULL;
  pthread_mutex_lock(&c->mu);
  if (c->tail) c->tail->next = b;
  else c->head = b;
  c->tail = b;
  /* Wake only as many threads as there are slices. */
  if (b->total > grab) pthread_cond_broadcast(&c->work);
  else pthread_cond_signal(&c->work);
  pthread_mutex_unlock(&c->mu);
}

static void *host_worker(void *arg) {
  pf_copier *c = arg;
  pthread_mutex_lock(&c->mu);
  for (;;) {
    while ((c->head == NULL || c->held) && !c->exiting) pthread_cond_wait(&c->work, &c->mu);
    if (c->head == NULL) break;
    pf_batch *b = c->head;
    uint64_t op = b->cur_op, off = b->cur_off, take = 0;
    while (b->cur_op < b->n_ops && take < b->grab) {
      uint64_t left = b->ops[b->cur_op].len - b->cur_off, want = b->grab - take;
      if (left <= want) {
        take += left;
        b->cur_op++;
        b->cur_off = 0;
      } else {
        take += want;
        b->cur_off += want;
      }
    }
    if (b->cur_op == b->n_ops) {
      c->head = b->next;
      if (c->head == NULL) c->tail = NULL;
    }
    pthread_mutex_unlock(&c->mu);

    /* Only an empty batch yields an empty slice (ops are never empty). */
    int last = take == 0;
    if (take > 0) {
      /* After a fault the rest of the batch is skipped, not copied. */
      if (atomic_load(&b->status) == PF_OK && guarded_copy(b, op, off, take) != PF_OK) {
        int ok = PF_OK;
        atomic_compare_exchange_strong(&b->status, &ok, PF_ECOPY);
      }
      last = atomic_fetch_sub(&b->remaining, take) == take;
    }
    if (last) pf__batch_finish(b, atomic_load(&b->status));
    pthread_mutex_lock(&c->mu);
  }
  pthread_mutex_unlock(&c->mu);
  return NULL;
}

int pf_copier_test_hold(pf_copier *c, int hold) {
  if (c == NULL) return PF_EINVAL;
  pthread_mutex_lock(&c->mu);
  c->held = hold != 0;
  pthread_cond_broadcast(&c->work);
  pthread_mutex_unlock(&c->mu);
  return PF_OK;
}

/* ---- copier lifecycle ---- */

int pf__copier_new(int threads, int notify_fd, pf_copier **out) {
  if (out == NULL) return PF_EINVAL;
  *out = NULL;
  if (threads <= 0 || threads > PF_MAX_THREADS || notify_fd < 0) return PF_EINVAL;
  int fl = fcntl(notify_fd, F_GETFL);
  if (fl < 0 || (fl & O_ACCMODE) == O_RDONLY) return PF_EINVAL;
  pthread_once(&pf_guard_once, guard_install);
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
    if (pf__thread_create(&c->threads[i], host_worker, c) != 0) {
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
