/*
 * C test of pegaflow_xfer: two agents in one process (UCX_TLS from the
 * environment; CTest runs it over tcp and over sm). Byte-exact batched GETs
 * of 16 KiB..2 MiB extents, a pool registered as the target, argument and
 * bounds refusals that post nothing, the blob buffer contract, cancel and
 * peer close with batches in flight, and a target agent that goes away
 * (its reads fail with PF_EPEER, never hang). Prints "xfer: N passed, N
 * failed" and exits 1 on any failure.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "pegaflow_xfer.h"
#include "pf_test.h"

#define SRC_SIZE (8u << 20)
#define DST_SIZE (8u << 20)

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static uint8_t *map(size_t size) {
  void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    perror("mmap");
    exit(2);
  }
  return p;
}

typedef struct side {
  int fds[2];
  pf_xfer_agent *agent;
  pf_xfer_mem *mem;
  uint8_t *buf;
  uint64_t size;
} side;

static void side_open(side *s, uint64_t size) {
  if (pipe2(s->fds, O_CLOEXEC | O_NONBLOCK) != 0) exit(2);
  s->size = size;
  s->buf = map(size);
  CHECK_RC(pf_xfer_agent_create(s->fds[1], &s->agent), PF_OK);
  CHECK_RC(pf_xfer_mem_register(s->agent, s->buf, size, &s->mem), PF_OK);
}

static void side_close(side *s) {
  if (s->mem) CHECK_RC(pf_xfer_mem_deregister(s->mem), PF_OK);
  if (s->agent) CHECK_RC(pf_xfer_agent_destroy(s->agent), PF_OK);
  munmap(s->buf, s->size);
  close(s->fds[0]);
  close(s->fds[1]);
  memset(s, 0, sizeof *s);
}

/* Connects dst to src and adds src's memory as region 0. */
static pf_xfer_peer *connect_to(side *dst, side *src) {
  uint64_t alen = 0, klen = 0;
  CHECK_RC(pf_xfer_agent_address(src->agent, NULL, 0, &alen), PF_OK);
  CHECK_RC(pf_xfer_mem_rkey(src->mem, NULL, 0, &klen), PF_OK);
  uint8_t *addr = malloc(alen), *rkey = malloc(klen);
  CHECK_RC(pf_xfer_agent_address(src->agent, addr, alen, &alen), PF_OK);
  CHECK_RC(pf_xfer_mem_rkey(src->mem, rkey, klen, &klen), PF_OK);
  pf_xfer_peer *p = NULL;
  CHECK_RC(pf_xfer_peer_connect(dst->agent, addr, alen, &p), PF_OK);
  uint32_t id = 99;
  CHECK_RC(pf_xfer_peer_add_region(p, rkey, klen, pf_xfer_mem_base(src->mem), pf_xfer_mem_size(src->mem), &id),
           PF_OK);
  CHECK(id == 0);
  free(addr);
  free(rkey);
  return p;
}

static int wait_one(side *s, uint64_t token, int timeout_ms) {
  pf_completion c;
  if (!read_completion(s->fds[0], &c, timeout_ms)) return 1000; /* no completion: a hang */
  CHECK(c.token == token);
  return (int)c.status;
}

/* Reads completions for tokens t0 and t1, in whichever order they come. */
static void wait_two(side *s, uint64_t t0, uint64_t t1, int *st0, int *st1) {
  *st0 = *st1 = 1000;
  for (int i = 0; i < 2; i++) {
    pf_completion c;
    if (!read_completion(s->fds[0], &c, 5000)) return;
    if (c.token == t0) *st0 = (int)c.status;
    else if (c.token == t1) *st1 = (int)c.status;
  }
}

static void test_blob_contract(side *a) {
  uint64_t len = 0;
  CHECK_RC(pf_xfer_agent_address(NULL, NULL, 0, &len), PF_EINVAL);
  CHECK_RC(pf_xfer_agent_address(a->agent, NULL, 0, NULL), PF_EINVAL);
  CHECK_RC(pf_xfer_agent_address(a->agent, NULL, 0, &len), PF_OK);
  CHECK(len > 0);
  uint8_t small[1];
  uint64_t got = 0;
  CHECK_RC(pf_xfer_agent_address(a->agent, small, 1, &got), len > 1 ? PF_ERANGE : PF_OK);
  CHECK(got == len);
  CHECK_RC(pf_xfer_mem_rkey(a->mem, NULL, 4, &got), PF_EINVAL);
  CHECK(pf_xfer_mem_size(a->mem) == a->size);
  CHECK(pf_xfer_mem_base(a->mem) == (uint64_t)(uintptr_t)a->buf);
}

static void test_arguments(side *a, side *b, pf_xfer_peer *p) {
  pf_xfer_agent *ag = NULL;
  pf_xfer_mem *m = NULL;
  pf_xfer_peer *pp = NULL;
  uint32_t id;
  uint8_t junk[8] = {0};
  CHECK_RC(pf_xfer_agent_create(-1, &ag), PF_EINVAL);
  CHECK_RC(pf_xfer_agent_create(1, NULL), PF_EINVAL);
  CHECK_RC(pf_xfer_agent_destroy(NULL), PF_EINVAL);
  CHECK_RC(pf_xfer_mem_register(a->agent, NULL, 4096, &m), PF_EINVAL);
  CHECK_RC(pf_xfer_mem_register(a->agent, a->buf, 0, &m), PF_EINVAL);
  CHECK_RC(pf_xfer_mem_register(a->agent, (void *)(UINTPTR_MAX - 4095), 8192, &m), PF_EINVAL);
  CHECK_RC(pf_xfer_mem_register_pool(a->agent, NULL, &m), PF_EINVAL);
  CHECK_RC(pf_xfer_mem_deregister(NULL), PF_EINVAL);
  CHECK_RC(pf_xfer_peer_connect(a->agent, NULL, 8, &pp), PF_EINVAL);
  CHECK_RC(pf_xfer_peer_connect(a->agent, junk, 0, &pp), PF_EINVAL);
  CHECK_RC(pf_xfer_peer_connect(a->agent, junk, PF_XFER_MAX_BLOB + 1ull, &pp), PF_EINVAL);
  CHECK_RC(pf_xfer_peer_add_region(p, NULL, 8, 0, 4096, &id), PF_EINVAL);
  CHECK_RC(pf_xfer_peer_add_region(p, junk, 8, 0, 0, &id), PF_EINVAL);
  CHECK_RC(pf_xfer_peer_add_region(p, junk, 8, UINT64_MAX - 10, 4096, &id), PF_EINVAL);
  CHECK_RC(pf_xfer_peer_close(NULL), PF_EINVAL);
  CHECK_RC(pf_xfer_cancel(NULL, 1, 0), PF_EINVAL);
  CHECK_RC(pf_xfer_cancel(b->agent, 12345, 1), PF_OK); /* unknown token: nothing to do */
  /* The agent refuses to go while its memory and peers are open. */
  CHECK_RC(pf_xfer_agent_destroy(b->agent), PF_ECLOSED);

  /* Refusals post nothing and write no completion. */
  uint64_t sz = a->size;
  struct {
    pf_xfer_op op;
    uint32_t region;
    int want;
  } bad[] = {
      {{sz - 4096, 0, 8192}, 0, PF_ERANGE},       /* remote extent past the advertised size */
      {{sz, 0, 1}, 0, PF_ERANGE},                 /* remote offset at the end */
      {{UINT64_MAX - 1, 0, 4096}, 0, PF_ERANGE},  /* remote offset + len wraps */
      {{0, b->size - 1, 2}, 0, PF_ERANGE},        /* local extent past the memory */
      {{0, UINT64_MAX, 1}, 0, PF_ERANGE},         /* local offset + len wraps */
      {{0, 0, sz + 1}, 0, PF_ERANGE},             /* longer than both */
      {{0, 0, 4096}, 1, PF_EINVAL},               /* no region 1 */
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    pf_xfer_op ops[2] = {{0, 0, 4096}, bad[i].op}; /* one good op first: still nothing runs */
    CHECK_RC(pf_xfer_get(p, bad[i].region, b->mem, ops, 2, 500 + i), bad[i].want);
  }
  pf_xfer_op one = {0, 0, 16};
  CHECK_RC(pf_xfer_get(NULL, 0, b->mem, &one, 1, 1), PF_EINVAL);
  CHECK_RC(pf_xfer_get(p, 0, NULL, &one, 1, 1), PF_EINVAL);
  CHECK_RC(pf_xfer_get(p, 0, b->mem, NULL, 1, 1), PF_EINVAL);
  CHECK_RC(pf_xfer_get(p, 0, b->mem, &one, PF_XFER_MAX_OPS + 1ull, 1), PF_EINVAL);
  CHECK_RC(pf_xfer_get(p, 0, a->mem, &one, 1, 1), PF_EINVAL); /* memory of another agent */
  pf_completion c;
  CHECK(!read_completion(b->fds[0], &c, 50));
}

/* Reads n extents of len bytes at scattered remote offsets into packed
 * local offsets, verifies every byte, returns GB/s. */
static double get_exact(side *a, side *b, pf_xfer_peer *p, uint64_t len, uint64_t token) {
  uint64_t n = b->size / len;
  if (n > a->size / len) n = a->size / len;
  pf_xfer_op *ops = calloc(n, sizeof *ops);
  uint64_t slots = a->size / len;
  for (uint64_t i = 0; i < n; i++) {
    uint64_t slot = (i * 7 + 3) % slots; /* 7 is coprime with the power-of-two slot count */
    ops[i] = (pf_xfer_op){.remote_offset = slot * len, .local_offset = i * len, .len = len};
  }
  memset(b->buf, 0, b->size);
  double t0 = now_s();
  CHECK_RC(pf_xfer_get(p, 0, b->mem, ops, n, token), PF_OK);
  CHECK_RC(wait_one(b, token, 20000), PF_OK);
  double dt = now_s() - t0;
  int bad = 0;
  for (uint64_t i = 0; i < n && !bad; i++)
    bad = memcmp(b->buf + ops[i].local_offset, a->buf + ops[i].remote_offset, len) != 0;
  CHECK(!bad);
  free(ops);
  return (double)(n * len) / dt / 1e9;
}

static void test_pool_target(side *b) {
  pf_pool *pool = NULL;
  if (pf_pool_create(4u << 20, -1, 0, 0, &pool) != PF_OK) {
    printf("xfer: pool target skipped (no pool in this build/machine)\n");
    return;
  }
  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) exit(2);
  side a = {.fds = {fds[0], fds[1]}, .buf = pf_pool_base(pool), .size = pf_pool_size(pool)};
  CHECK_RC(pf_xfer_agent_create(fds[1], &a.agent), PF_OK);
  CHECK_RC(pf_xfer_mem_register_pool(a.agent, pool, &a.mem), PF_OK);
  CHECK_RC(pf_pool_destroy(pool), PF_ECLOSED); /* registered: held */
  for (uint64_t i = 0; i < a.size; i++) a.buf[i] = (uint8_t)(i * 13 + 5);
  pf_xfer_peer *p = connect_to(b, &a);
  get_exact(&a, b, p, 256u << 10, 77);
  CHECK_RC(pf_xfer_peer_close(p), PF_OK);
  CHECK_RC(pf_xfer_mem_deregister(a.mem), PF_OK);
  CHECK_RC(pf_xfer_agent_destroy(a.agent), PF_OK);
  CHECK_RC(pf_pool_destroy(pool), PF_OK);
  close(fds[0]);
  close(fds[1]);
}

/* A batch of 512 x 2 MiB (1 GiB, far more than a window) is still running
 * when it is cancelled; either outcome is legal for a batch racing its
 * own end, what matters is one completion, soon. */
static void test_cancel_and_close(side *a, side *b) {
  enum { N = 512 };
  pf_xfer_op *ops = calloc(N, sizeof *ops);
  for (uint64_t i = 0; i < N; i++) ops[i] = (pf_xfer_op){(i % 4) << 21, (i % 4) << 21, 2u << 20};

  /* Graceful: the window drains, the peer stays usable. */
  pf_xfer_peer *p = connect_to(b, a);
  CHECK_RC(pf_xfer_get(p, 0, b->mem, ops, N, 900), PF_OK);
  CHECK_RC(pf_xfer_cancel(b->agent, 900, 0), PF_OK);
  double t0 = now_s();
  int st = wait_one(b, 900, 5000);
  CHECK(st == PF_ECANCELED || st == PF_OK);
  CHECK(now_s() - t0 < 2);
  CHECK_RC(pf_xfer_peer_status(p), PF_OK);
  CHECK_RC(pf_xfer_get(p, 0, b->mem, ops, 1, 901), PF_OK);
  CHECK_RC(wait_one(b, 901, 5000), PF_OK);

  /* Forced: the endpoint goes, the peer reports itself failed. */
  CHECK_RC(pf_xfer_get(p, 0, b->mem, ops, N, 902), PF_OK);
  CHECK_RC(pf_xfer_get(p, 0, b->mem, ops, 1, 903), PF_OK); /* queued behind it */
  CHECK_RC(pf_xfer_cancel(b->agent, 902, 1), PF_OK);
  int st2;
  wait_two(b, 902, 903, &st, &st2);
  CHECK(st == PF_ECANCELED || st == PF_OK);
  if (st == PF_ECANCELED) {
    CHECK_RC(st2, PF_EPEER);
    CHECK_RC(pf_xfer_peer_status(p), PF_EPEER);
    CHECK_RC(pf_xfer_get(p, 0, b->mem, ops, 1, 904), PF_EPEER);
  } else {
    CHECK_RC(st2, PF_OK);
  }
  CHECK_RC(pf_xfer_peer_close(p), PF_OK);

  /* Close with batches in flight and queued: they end, then close returns. */
  p = connect_to(b, a);
  CHECK_RC(pf_xfer_get(p, 0, b->mem, ops, N, 905), PF_OK);
  CHECK_RC(pf_xfer_get(p, 0, b->mem, ops, N, 906), PF_OK);
  CHECK_RC(pf_xfer_peer_close(p), PF_OK);
  wait_two(b, 905, 906, &st, &st2);
  CHECK(st == PF_ECANCELED || st == PF_OK);
  CHECK_RC(st2, PF_ECANCELED);
  free(ops);
}

/* The target agent goes away: reads from it fail with PF_EPEER (at submit
 * or as the batch's status), within seconds, never a hang. */
static void test_peer_gone(side *b) {
  side a;
  side_open(&a, 4u << 20);
  pf_xfer_peer *p = connect_to(b, &a);
  pf_xfer_op op = {0, 0, 1u << 20};
  CHECK_RC(pf_xfer_get(p, 0, b->mem, &op, 1, 950), PF_OK);
  CHECK_RC(wait_one(b, 950, 10000), PF_OK); /* connected */
  side_close(&a);
  double t0 = now_s();
  int st = PF_OK;
  for (int i = 0; i < 200 && st == PF_OK; i++) {
    int rc = pf_xfer_get(p, 0, b->mem, &op, 1, 951 + (uint64_t)i);
    st = rc == PF_OK ? wait_one(b, 951 + (uint64_t)i, 30000) : rc;
    if (st == PF_OK) usleep(50000);
  }
  printf("xfer: target gone -> %s after %.2fs\n", pf_strerror(st), now_s() - t0);
  CHECK_RC(st, PF_EPEER);
  CHECK_RC(pf_xfer_peer_status(p), PF_EPEER);
  CHECK_RC(pf_xfer_peer_close(p), PF_OK);
}

int main(void) {
  const char *tls = getenv("UCX_TLS");
  printf("xfer: %s, UCX_TLS=%s\n", pf_xfer_backend(), tls ? tls : "(default)");
  side a, b;
  side_open(&a, SRC_SIZE);
  side_open(&b, DST_SIZE);
  for (uint64_t i = 0; i < a.size; i++) a.buf[i] = (uint8_t)(i * 131 + (i >> 12));
  pf_xfer_peer *p = connect_to(&b, &a);

  test_blob_contract(&a);
  test_arguments(&a, &b, p);
  uint64_t token = 1;
  for (uint64_t len = 16u << 10; len <= 2u << 20; len *= 2) {
    double gbps = get_exact(&a, &b, p, len, token++);
    printf("xfer: %7llu KiB extents: %.2f GB/s\n", (unsigned long long)(len >> 10), gbps);
  }
  /* An empty batch and zero-length ops complete at once. */
  pf_xfer_op zero = {0, 0, 0};
  CHECK_RC(pf_xfer_get(p, 0, b.mem, NULL, 0, 300), PF_OK);
  CHECK_RC(wait_one(&b, 300, 1000), PF_OK);
  CHECK_RC(pf_xfer_get(p, 0, b.mem, &zero, 1, 301), PF_OK);
  CHECK_RC(wait_one(&b, 301, 1000), PF_OK);
  CHECK_RC(pf_xfer_peer_close(p), PF_OK);

  test_pool_target(&b);
  test_cancel_and_close(&a, &b);
  test_peer_gone(&b);

  side_close(&a);
  side_close(&b);
  printf("xfer: %d passed, %d failed\n", passed, failed);
  return failed ? 1 : 0;
}
