//go:build !noucx

#include "ucx_baseline.h"

#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <ucp/api/ucp.h>

typedef struct side {
  ucp_context_h ctx;
  ucp_worker_h worker;
  ucp_mem_h memh;
} side;

static ucs_status_t side_open(side *s, void *buf, uint64_t size) {
  ucp_config_t *cfg;
  ucs_status_t st = ucp_config_read(NULL, NULL, &cfg);
  if (st != UCS_OK) return st;
  ucp_params_t p = {.field_mask = UCP_PARAM_FIELD_FEATURES, .features = UCP_FEATURE_RMA};
  st = ucp_init(&p, cfg, &s->ctx);
  ucp_config_release(cfg);
  if (st != UCS_OK) return st;
  ucp_worker_params_t wp = {.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE, .thread_mode = UCS_THREAD_MODE_SINGLE};
  if ((st = ucp_worker_create(s->ctx, &wp, &s->worker)) != UCS_OK) return st;
  ucp_mem_map_params_t mp = {.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH,
                             .address = buf,
                             .length = size};
  return ucp_mem_map(s->ctx, &mp, &s->memh);
}

static void side_close(side *s) {
  if (s->memh) ucp_mem_unmap(s->ctx, s->memh);
  if (s->worker) ucp_worker_destroy(s->worker);
  if (s->ctx) ucp_cleanup(s->ctx);
}

static void get_done(void *req, ucs_status_t st, void *user) {
  uint64_t *left = user;
  if (st == UCS_OK) --*left;
  else *left = UINT64_MAX; /* failure */
  ucp_request_free(req);
}

/* Waits for a request of the two workers (progressing both; b may be
 * NULL: one worker). */
static ucs_status_t wait_req(side *a, side *b, ucs_status_ptr_t r) {
  if (!UCS_PTR_IS_PTR(r)) return UCS_PTR_STATUS(r);
  ucs_status_t st;
  while ((st = ucp_request_check_status(r)) == UCS_INPROGRESS) {
    ucp_worker_progress(a->worker);
    if (b) ucp_worker_progress(b->worker);
  }
  ucp_request_free(r);
  return st;
}

static double elapsed(const struct timespec *t0, const struct timespec *t1) {
  return (double)(t1->tv_sec - t0->tv_sec) + (double)(t1->tv_nsec - t0->tv_nsec) / 1e9;
}

static ucs_status_t run(side *a, side *b, ucp_ep_h ep, ucp_rkey_h rkey, uint64_t src, void *dst,
                        const uint64_t *roffs, uint64_t n, uint64_t ext) {
  uint64_t left = n;
  ucp_request_param_t prm = {.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA |
                                             UCP_OP_ATTR_FIELD_MEMH,
                             .cb.send = get_done,
                             .user_data = &left,
                             .memh = b->memh};
  for (uint64_t i = 0; i < n; i++) {
    ucs_status_ptr_t r = ucp_get_nbx(ep, (char *)dst + i * ext, ext, src + roffs[i], rkey, &prm);
    if (UCS_PTR_IS_ERR(r)) return UCS_PTR_STATUS(r);
    if (r == NULL) left--;
  }
  while (left != 0 && left != UINT64_MAX) {
    ucp_worker_progress(a->worker);
    ucp_worker_progress(b->worker);
  }
  return left == 0 ? UCS_OK : UCS_ERR_IO_ERROR;
}

double pfb_ucx_get_loop(void *src, uint64_t src_size, void *dst, uint64_t dst_size, const uint64_t *roffs,
                        uint64_t n, uint64_t ext, int iters) {
  side a = {0}, b = {0};
  ucp_ep_h ep = NULL;
  ucp_rkey_h rkey = NULL;
  void *packed = NULL;
  ucp_address_t *addr = NULL;
  size_t len;
  double secs = -1;
  ucs_status_t st;
  if ((st = side_open(&a, src, src_size)) != UCS_OK || (st = side_open(&b, dst, dst_size)) != UCS_OK) goto out;
  if ((st = ucp_worker_get_address(a.worker, &addr, &len)) != UCS_OK) goto out;
  /* The same error mode as the agent's endpoints: it decides the lanes. */
  ucp_ep_params_t ep_params = {.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE,
                               .address = addr,
                               .err_mode = UCP_ERR_HANDLING_MODE_PEER};
  if ((st = ucp_ep_create(b.worker, &ep_params, &ep)) != UCS_OK) goto out;
  if ((st = ucp_rkey_pack(a.ctx, a.memh, &packed, &len)) != UCS_OK) goto out;
  if ((st = ucp_ep_rkey_unpack(ep, packed, &rkey)) != UCS_OK) goto out;
  if ((st = run(&a, &b, ep, rkey, (uint64_t)(uintptr_t)src, dst, roffs, n, ext)) != UCS_OK) goto out;
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (int i = 0; i < iters; i++)
    if ((st = run(&a, &b, ep, rkey, (uint64_t)(uintptr_t)src, dst, roffs, n, ext)) != UCS_OK) goto out;
  clock_gettime(CLOCK_MONOTONIC, &t1);
  secs = elapsed(&t0, &t1);
out:
  if (secs < 0) secs = (double)(st < 0 ? st : UCS_ERR_IO_ERROR);
  if (rkey) ucp_rkey_destroy(rkey);
  if (packed) ucp_rkey_buffer_release(packed);
  if (ep) {
    ucp_request_param_t cp = {.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS, .flags = UCP_EP_CLOSE_FLAG_FORCE};
    (void)wait_req(&a, &b, ucp_ep_close_nbx(ep, &cp));
  }
  if (addr) ucp_worker_release_address(a.worker, addr);
  side_close(&b);
  side_close(&a);
  return secs;
}

/* ---- Two processes: the peer fetch's data path, plain UCX. ---- */

struct pfb_target {
  side s;
  ucp_address_t *addr;
  size_t addr_len;
  void *rkey;
  size_t rkey_len;
};

void pfb_target_close(pfb_target *t) {
  if (!t) return;
  if (t->rkey) ucp_rkey_buffer_release(t->rkey);
  if (t->addr) ucp_worker_release_address(t->s.worker, t->addr);
  side_close(&t->s);
  free(t);
}

int pfb_target_open(void *buf, uint64_t size, pfb_target **out) {
  if (!buf || size == 0 || !out) return UCS_ERR_INVALID_PARAM;
  pfb_target *t = calloc(1, sizeof *t);
  if (!t) return UCS_ERR_NO_MEMORY;
  ucs_status_t st = side_open(&t->s, buf, size);
  if (st == UCS_OK) st = ucp_worker_get_address(t->s.worker, &t->addr, &t->addr_len);
  if (st == UCS_OK) st = ucp_rkey_pack(t->s.ctx, t->s.memh, &t->rkey, &t->rkey_len);
  if (st == UCS_OK && (t->addr_len > PFB_MAX_BLOB || t->rkey_len > PFB_MAX_BLOB)) st = UCS_ERR_EXCEEDS_LIMIT;
  if (st != UCS_OK) {
    pfb_target_close(t);
    return st;
  }
  *out = t;
  return 0;
}

int64_t pfb_target_blob(pfb_target *t, int which, uint8_t *out, uint64_t cap) {
  if (!t || (which != 0 && which != 1) || (!out && cap > 0)) return UCS_ERR_INVALID_PARAM;
  const void *src = which == 0 ? (const void *)t->addr : t->rkey;
  size_t len = which == 0 ? t->addr_len : t->rkey_len;
  if (cap < len) return UCS_ERR_BUFFER_TOO_SMALL;
  memcpy(out, src, len);
  return (int64_t)len;
}

int pfb_target_serve(pfb_target *t, int stop_fd) {
  if (!t || stop_fd < 0) return UCS_ERR_INVALID_PARAM;
  struct pollfd pfd = {.fd = stop_fd, .events = POLLIN};
  for (uint64_t k = 0;; k++) {
    ucp_worker_progress(t->s.worker);
    if ((k & 1023) != 0) continue; /* a syscall per thousand progress calls */
    int r = poll(&pfd, 1, 0);
    if (r > 0) return 0;
    if (r < 0 && errno != EINTR) return UCS_ERR_IO_ERROR;
  }
}

typedef struct window {
  uint64_t inflight;
  int failed;
} window;

static void window_done(void *req, ucs_status_t st, void *user) {
  window *w = user;
  w->inflight--;
  if (st != UCS_OK) w->failed = 1;
  ucp_request_free(req);
}

/* One batch: n GETs of ext bytes into dst at i*ext, from remote slots
 * *slot, *slot+1, ... (mod slots), at most max_out outstanding; returns
 * once none is outstanding. */
static ucs_status_t read_batch(side *s, ucp_ep_h ep, ucp_rkey_h rkey, uint64_t rbase, uint64_t slots, uint64_t *slot,
                               char *dst, uint64_t n, uint64_t ext, uint64_t max_out) {
  window w = {0};
  ucp_request_param_t prm = {.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA |
                                             UCP_OP_ATTR_FIELD_MEMH,
                             .cb.send = window_done,
                             .user_data = &w,
                             .memh = s->memh};
  ucs_status_t st = UCS_OK;
  uint64_t i = 0;
  while (w.inflight > 0 || (i < n && st == UCS_OK && !w.failed)) {
    while (i < n && w.inflight < max_out && st == UCS_OK && !w.failed) {
      ucs_status_ptr_t r = ucp_get_nbx(ep, dst + i * ext, ext, rbase + *slot * ext, rkey, &prm);
      if (UCS_PTR_IS_ERR(r)) st = UCS_PTR_STATUS(r); /* drain what is out, then fail */
      else if (r != NULL) w.inflight++;
      *slot = (*slot + 1) % slots;
      i++;
    }
    ucp_worker_progress(s->worker);
  }
  if (st == UCS_OK && w.failed) st = UCS_ERR_IO_ERROR;
  return st;
}

double pfb_initiator_run(const uint8_t *addr, uint64_t addr_len, const uint8_t *rkey, uint64_t rkey_len,
                         uint64_t remote_base, uint64_t remote_size, void *dst, uint64_t dst_size, uint64_t ext,
                         uint64_t window_ops, uint64_t batches) {
  /* UCX parses both blobs without a length: they come from our own child,
   * so only their sizes are checked. */
  if (!addr || !rkey || addr_len == 0 || addr_len > PFB_MAX_BLOB || rkey_len == 0 || rkey_len > PFB_MAX_BLOB ||
      !dst || ext == 0 || dst_size < ext || dst_size / ext > PFB_MAX_BATCH_OPS || remote_size < ext ||
      remote_base > UINT64_MAX - remote_size || window_ops == 0 || window_ops > PFB_MAX_WINDOW || batches == 0 ||
      batches > PFB_MAX_BATCHES)
    return UCS_ERR_INVALID_PARAM;
  uint64_t n = dst_size / ext, slots = remote_size / ext, slot = 0;
  side s = {0};
  ucp_ep_h ep = NULL;
  ucp_rkey_h rk = NULL;
  double secs = -1;
  ucs_status_t st;
  if ((st = side_open(&s, dst, dst_size)) != UCS_OK) goto out;
  ucp_ep_params_t ep_params = {.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE,
                               .address = (const ucp_address_t *)addr,
                               .err_mode = UCP_ERR_HANDLING_MODE_PEER}; /* the agent's: it decides the lanes */
  if ((st = ucp_ep_create(s.worker, &ep_params, &ep)) != UCS_OK) goto out;
  if ((st = ucp_ep_rkey_unpack(ep, rkey, &rk)) != UCS_OK) goto out;
  /* The warm-up batch connects, as a fetch's first query does. */
  if ((st = read_batch(&s, ep, rk, remote_base, slots, &slot, dst, n, ext, window_ops)) != UCS_OK) goto out;
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (uint64_t b = 0; b < batches; b++)
    if ((st = read_batch(&s, ep, rk, remote_base, slots, &slot, dst, n, ext, window_ops)) != UCS_OK) goto out;
  clock_gettime(CLOCK_MONOTONIC, &t1);
  secs = elapsed(&t0, &t1);
out:
  if (secs < 0) secs = (double)(st < 0 ? st : UCS_ERR_IO_ERROR);
  if (rk) ucp_rkey_destroy(rk);
  if (ep) {
    ucp_request_param_t cp = {.op_attr_mask = 0}; /* flush: the target is alive and idle */
    (void)wait_req(&s, NULL, ucp_ep_close_nbx(ep, &cp));
  }
  side_close(&s);
  return secs;
}
