//go:build !noucx

#include "ucx_baseline.h"

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

/* Waits for a request of the two workers (progressing both). */
static ucs_status_t wait_req(side *a, side *b, ucs_status_ptr_t r) {
  if (!UCS_PTR_IS_PTR(r)) return UCS_PTR_STATUS(r);
  ucs_status_t st;
  while ((st = ucp_request_check_status(r)) == UCS_INPROGRESS) {
    ucp_worker_progress(a->worker);
    ucp_worker_progress(b->worker);
  }
  ucp_request_free(r);
  return st;
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
  secs = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
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
