/*
 * C boundary test of pegaflow_native: every entry point with NULL and
 * invalid arguments, bounds checks that copy nothing, completions through a
 * tiny nonblocking pipe, a shm file truncated under a copy (SIGBUS guard),
 * region close and pool destroy while copies are in flight, and destroy
 * waiting for batches, device UUIDs and IPC events (argument checks in
 * every build; a UUID round trip when a GPU is present). Prints "c_api: N passed, N failed" and exits 1 on
 * any failure. Run by CTest and by native's Go tests.
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
#include <time.h>
#include <unistd.h>

#include "pegaflow_native.h"
#include "pf_test.h"

static char tmpdir[256];

static const char *make_file(const char *name, size_t size, unsigned char seed) {
  static char path[512];
  snprintf(path, sizeof path, "%s/%s", tmpdir, name);
  int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
  if (fd < 0) {
    perror("open");
    exit(2);
  }
  unsigned char *buf = malloc(size ? size : 1);
  for (size_t i = 0; i < size; i++) buf[i] = (unsigned char)(i * 131 + seed);
  if (size && write(fd, buf, size) != (ssize_t)size) {
    perror("write");
    exit(2);
  }
  free(buf);
  close(fd);
  return path;
}

static int pipe_empty(int fd) {
  struct pollfd pfd = {.fd = fd, .events = POLLIN};
  return poll(&pfd, 1, 50) == 0;
}

static int all_zero(const unsigned char *p, size_t n) {
  for (size_t i = 0; i < n; i++)
    if (p[i]) return 0;
  return 1;
}

static void test_strings(void) {
  CHECK(pf_backend() != NULL && (!strcmp(pf_backend(), "cpu") || !strcmp(pf_backend(), "cuda")));
  for (int code = 0; code >= -8; code--) CHECK(strcmp(pf_strerror(code), "unknown error") != 0);
  CHECK(strcmp(pf_strerror(-100), "unknown error") == 0);
  CHECK(strcmp(pf_strerror(42), "unknown error") == 0);
}

static void test_pool_args(void) {
  pf_pool *p = (pf_pool *)1;
  CHECK_RC(pf_pool_create(4096, -1, -1, 0, NULL), PF_EINVAL);
  CHECK_RC(pf_pool_create(0, -1, -1, 0, &p), PF_EINVAL);
  CHECK(p == NULL);
  CHECK_RC(pf_pool_create(UINT64_MAX, -1, -1, 0, &p), PF_EINVAL);
  CHECK_RC(pf_pool_create(4096, -1, -1, 0x80, &p), PF_EINVAL);
  CHECK(pf_pool_size(NULL) == 0);
  CHECK(pf_pool_base(NULL) == NULL);
  CHECK_RC(pf_pool_destroy(NULL), PF_EINVAL);
}

static void test_region_args(void) {
  pf_region *r = (pf_region *)1;
  const char *path = make_file("small", 100, 1);
  CHECK_RC(pf_region_open_shm(path, 100, NULL), PF_EINVAL);
  CHECK_RC(pf_region_open_shm(NULL, 100, &r), PF_EINVAL);
  CHECK(r == NULL);
  CHECK_RC(pf_region_open_shm("", 100, &r), PF_EINVAL);
  CHECK_RC(pf_region_open_shm(path, 0, &r), PF_EINVAL);
  CHECK_RC(pf_region_open_shm(path, UINT64_MAX, &r), PF_EINVAL);
  CHECK_RC(pf_region_open_shm(path, 101, &r), PF_ERANGE);
  CHECK_RC(pf_region_open_shm(tmpdir, 10, &r), PF_EIO); /* a directory */
  CHECK_RC(pf_region_open_shm("/nonexistent/pegaflow/region", 10, &r), PF_EIO);
  CHECK(pf_region_size(NULL) == 0);
  CHECK_RC(pf_region_close(NULL), PF_EINVAL);
  CHECK_RC(pf_region_open_shm(path, 100, &r), PF_OK);
  CHECK(pf_region_size(r) == 100);
  CHECK_RC(pf_region_close(r), PF_OK);

  /* The fd form: same checks, size from fstat, the fd stays the caller's. */
  int fd = open(path, O_RDWR | O_CLOEXEC);
  CHECK(fd >= 0);
  CHECK_RC(pf_region_open_shm_fd(fd, 100, NULL), PF_EINVAL);
  CHECK_RC(pf_region_open_shm_fd(-1, 100, &r), PF_EINVAL);
  CHECK(r == NULL);
  CHECK_RC(pf_region_open_shm_fd(fd, 0, &r), PF_EINVAL);
  CHECK_RC(pf_region_open_shm_fd(fd, UINT64_MAX, &r), PF_EINVAL);
  CHECK_RC(pf_region_open_shm_fd(fd, 101, &r), PF_ERANGE);
  CHECK_RC(pf_region_open_shm_fd(fd, 100, &r), PF_OK);
  CHECK(fcntl(fd, F_GETFD) >= 0); /* not closed for us */
  close(fd);
  CHECK(pf_region_size(r) == 100);
  CHECK_RC(pf_region_close(r), PF_OK);
  int dfd = open(tmpdir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  CHECK(dfd >= 0);
  CHECK_RC(pf_region_open_shm_fd(dfd, 10, &r), PF_EIO); /* not a regular file */
  close(dfd);

  uint8_t handle[64] = {0};
  r = (pf_region *)1;
  if (!strcmp(pf_backend(), "cpu")) {
    CHECK_RC(pf_region_open_cuda_ipc(handle, sizeof handle, 0, 100, &r), PF_ENOTSUP);
    CHECK(r == NULL);
  } else {
    CHECK_RC(pf_region_open_cuda_ipc(NULL, sizeof handle, 0, 100, &r), PF_EINVAL);
    CHECK(r == NULL);
    CHECK_RC(pf_region_open_cuda_ipc(handle, 7, 0, 100, &r), PF_EINVAL);
    CHECK_RC(pf_region_open_cuda_ipc(handle, sizeof handle, 0, 0, &r), PF_EINVAL);
    CHECK_RC(pf_region_open_cuda_ipc(handle, sizeof handle, 0, 100, NULL), PF_EINVAL);
  }
}

static void test_copier_args(void) {
  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) exit(2);
  pf_copier *c = (pf_copier *)1;
  CHECK_RC(pf_copier_create(1, fds[1], NULL), PF_EINVAL);
  CHECK_RC(pf_copier_create(0, fds[1], &c), PF_EINVAL);
  CHECK(c == NULL);
  CHECK_RC(pf_copier_create(-3, fds[1], &c), PF_EINVAL);
  CHECK_RC(pf_copier_create(100000, fds[1], &c), PF_EINVAL);
  CHECK_RC(pf_copier_create(1, -1, &c), PF_EINVAL);
  CHECK_RC(pf_copier_create(1, fds[0], &c), PF_EINVAL); /* read end */
  CHECK_RC(pf_copier_create(1, 987654, &c), PF_EINVAL); /* not open */
  CHECK_RC(pf_copier_destroy(NULL), PF_EINVAL);
  CHECK_RC(pf_copier_create(2, fds[1], &c), PF_OK);
  CHECK_RC(pf_copier_destroy(c), PF_OK);
  close(fds[0]);
  close(fds[1]);
}

#ifdef PF_TEST_CUDA
#include <cuda_runtime_api.h>

/* With a GPU: every visible device's UUID maps back to its ordinal, in the
 * nvidia-smi form, upper case and bare. Skipped without one. */
static void test_uuid_roundtrip(void) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    (void)cudaGetLastError();
    fprintf(stderr, "c_api: no CUDA device; UUID round trip skipped\n");
    return;
  }
  for (int d = 0; d < count; d++) {
    struct cudaDeviceProp prop;
    CHECK(cudaGetDeviceProperties(&prop, d) == cudaSuccess);
    const unsigned char *u = (const unsigned char *)prop.uuid.bytes;
    char smi[64], upper[64], bare[40];
    snprintf(smi, sizeof smi, "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", u[0],
             u[1], u[2], u[3], u[4], u[5], u[6], u[7], u[8], u[9], u[10], u[11], u[12], u[13], u[14], u[15]);
    for (size_t i = 0; i <= strlen(smi); i++) upper[i] = (char)(smi[i] >= 'a' && smi[i] <= 'f' ? smi[i] - 32 : smi[i]);
    size_t n = 0;
    for (const char *p = smi + 4; *p; p++)
      if (*p != '-') bare[n++] = *p;
    bare[n] = '\0';
    const char *forms[] = {smi, upper, bare};
    for (size_t f = 0; f < 3; f++) {
      int got = -1;
      CHECK_RC(pf_cuda_device_by_uuid(forms[f], strlen(forms[f]), &got), PF_OK);
      CHECK(got == d);
    }
  }
}
#endif

static void test_uuid_and_event_args(void) {
  int cuda = strcmp(pf_backend(), "cuda") == 0;
  int dev = 7;
  const char *zero = "GPU-00000000-0000-0000-0000-000000000000";
  CHECK_RC(pf_cuda_device_by_uuid(zero, strlen(zero), NULL), PF_EINVAL);
  CHECK_RC(pf_cuda_device_by_uuid(NULL, 40, &dev), PF_EINVAL);
  CHECK(dev == -1);
  CHECK_RC(pf_cuda_device_by_uuid(zero, 0, &dev), PF_EINVAL);
  CHECK_RC(pf_cuda_device_by_uuid(zero, 20, &dev), PF_EINVAL);  /* cut short: only len bytes */
  CHECK_RC(pf_cuda_device_by_uuid("GPU-0000000z-0000-0000-0000-000000000000", 40, &dev), PF_EINVAL);
  CHECK_RC(pf_cuda_device_by_uuid("GPU-00000000-0000-0000-0000-0000000000000", 41, &dev), PF_EINVAL);
  CHECK_RC(pf_cuda_device_by_uuid("GPU-", 4, &dev), PF_EINVAL);
  CHECK_RC(pf_cuda_device_by_uuid(zero, 1000, &dev), PF_EINVAL); /* absurd length */
  /* A NUL ends the string before len. */
  int want = cuda ? PF_ENODEV : PF_ENOTSUP;
  int rc = pf_cuda_device_by_uuid(zero, 64, &dev);
  CHECK(rc == want || (cuda && rc == PF_EIO)); /* EIO: CUDA build without a GPU */
  CHECK(dev == -1);
  rc = pf_cuda_device_by_uuid("00000000000000000000000000000000", 32, &dev);
  CHECK(rc == want || (cuda && rc == PF_EIO));

  uint8_t handle[PF_CUDA_IPC_HANDLE_BYTES] = {0};
  pf_event *ev = (pf_event *)1;
  CHECK_RC(pf_event_open_ipc(handle, sizeof handle, 0, NULL), PF_EINVAL);
  CHECK_RC(pf_event_open_ipc(NULL, sizeof handle, 0, &ev), PF_EINVAL);
  CHECK(ev == NULL);
  CHECK_RC(pf_event_open_ipc(handle, 63, 0, &ev), PF_EINVAL);
  CHECK_RC(pf_event_open_ipc(handle, UINT64_MAX, 0, &ev), PF_EINVAL);
  /* An all-zero handle names no event: refused, never a crash. */
  CHECK_RC(pf_event_open_ipc(handle, sizeof handle, 0, &ev), cuda ? PF_EIO : PF_ENOTSUP);
  CHECK(ev == NULL);
  int no_gpu = cuda && rc == PF_EIO;
  CHECK_RC(pf_event_open_ipc(handle, sizeof handle, 1 << 20, &ev), !cuda ? PF_ENOTSUP : no_gpu ? PF_EIO : PF_EINVAL);
  CHECK_RC(pf_event_close(NULL), PF_EINVAL);

  /* Waiting on an event: device regions only. A shm region with an event
   * is refused before anything (the pool pointer is never looked at). */
  const char *path = make_file("small", 100, 1);
  pf_region *r;
  CHECK_RC(pf_region_open_shm(path, 100, &r), PF_OK);
  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) exit(2);
  pf_copier *c;
  CHECK_RC(pf_copier_create(1, fds[1], &c), PF_OK);
  pf_copy_op op = {0, 0, 10};
  pf_event *fake = (pf_event *)&op; /* never dereferenced on these paths */
  CHECK_RC(pf_copier_submit_after(c, r, (pf_pool *)&op, 0, &op, 1, fake, 1), cuda ? PF_EINVAL : PF_ENOTSUP);
  CHECK(pipe_empty(fds[0]));
  pf_pool *pool;
  if (pf_pool_create(4096, -1, -1, 0, &pool) == PF_OK) {
    /* No event: the same as pf_copier_submit. */
    pf_completion done;
    CHECK_RC(pf_copier_submit_after(c, r, pool, 0, &op, 1, NULL, 42), PF_OK);
    CHECK(read_completion(fds[0], &done, 5000) && done.token == 42 && done.status == PF_OK);
    CHECK(memcmp(pf_pool_base(pool), "\x01", 1) == 0); /* make_file's first byte is its seed */
    CHECK_RC(pf_copier_submit_after(NULL, r, pool, 0, &op, 1, NULL, 43), PF_EINVAL);
    CHECK_RC(pf_copier_destroy(c), PF_OK);
    CHECK_RC(pf_pool_destroy(pool), PF_OK);
  } else {
    CHECK_RC(pf_copier_destroy(c), PF_OK);
  }
  CHECK_RC(pf_region_close(r), PF_OK);
  close(fds[0]);
  close(fds[1]);
#ifdef PF_TEST_CUDA
  test_uuid_roundtrip();
#endif
}

/* Everything that needs a pool. */
static void test_copies(void) {
  enum { RSIZE = 1 << 20, PSIZE = 2 << 20 };
  pf_pool *pool;
  int rc = pf_pool_create(PSIZE, 0, 0, PF_POOL_HUGEPAGES | PF_POOL_MLOCK, &pool);
  if (rc != PF_OK && strcmp(pf_backend(), "cuda") == 0) {
    fprintf(stderr, "c_api: no CUDA device (%s); copy checks skipped\n", pf_strerror(rc));
    return;
  }
  CHECK_RC(rc, PF_OK);
  if (rc != PF_OK) return;
  CHECK(pf_pool_size(pool) == PSIZE);
  unsigned char *pb = pf_pool_base(pool);
  CHECK(pb != NULL && all_zero(pb, PSIZE));

  const char *path = make_file("region", RSIZE, 7);
  pf_region *r;
  CHECK_RC(pf_region_open_shm(path, RSIZE, &r), PF_OK);

  /* Nonblocking pipe shrunk to one page (256 records): completion writers
   * must wait for room instead of dropping records. */
  int fds[2];
  if (pipe2(fds, O_CLOEXEC | O_NONBLOCK) != 0) exit(2);
  (void)fcntl(fds[1], F_SETPIPE_SZ, 4096);
  pf_copier *c;
  CHECK_RC(pf_copier_create(2, fds[1], &c), PF_OK);

  pf_copy_op ok = {0, 0, 64};
  pf_copy_op bad[] = {
      {RSIZE + 1, 0, 0},                 /* offset past the end, empty */
      {RSIZE - 10, 0, 11},               /* range past the region's end */
      {0, PSIZE - 10, 11},               /* range past the pool's end */
      {16, 16, UINT64_MAX - 8},          /* length wraps */
      {UINT64_MAX, 0, 2},                /* offset wraps */
      {0, UINT64_MAX - 1, 4},            /* pool offset wraps */
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    pf_copy_op ops[2] = {ok, bad[i]};
    CHECK_RC(pf_copier_submit(c, r, pool, PF_DIR_REGION_TO_POOL, ops, 2, 1000 + i), PF_ERANGE);
    CHECK_RC(pf_copier_submit(c, r, pool, PF_DIR_POOL_TO_REGION, ops, 2, 1000 + i), PF_ERANGE);
  }
  CHECK_RC(pf_copier_submit(NULL, r, pool, 0, &ok, 1, 1), PF_EINVAL);
  CHECK_RC(pf_copier_submit(c, NULL, pool, 0, &ok, 1, 1), PF_EINVAL);
  CHECK_RC(pf_copier_submit(c, r, NULL, 0, &ok, 1, 1), PF_EINVAL);
  CHECK_RC(pf_copier_submit(c, r, pool, 0, NULL, 1, 1), PF_EINVAL);
  CHECK_RC(pf_copier_submit(c, r, pool, 2, &ok, 1, 1), PF_EINVAL);
  CHECK_RC(pf_copier_submit(c, r, pool, -1, &ok, 1, 1), PF_EINVAL);
  CHECK_RC(pf_copier_submit(c, r, pool, 0, &ok, UINT64_MAX, 1), PF_EINVAL);
  CHECK(all_zero(pb, PSIZE));
  CHECK(pipe_empty(fds[0])); /* failed submits write no completion */

  /* n_ops == 0 completes, with NULL ops too. */
  CHECK_RC(pf_copier_submit(c, r, pool, 0, NULL, 0, 77), PF_OK);
  pf_completion done;
  CHECK(read_completion(fds[0], &done, 5000) && done.token == 77 && done.status == PF_OK);

  /* A held copier keeps an accepted batch in flight (no completion, the
   * pool has a user) until released. */
  CHECK_RC(pf_copier_test_hold(NULL, 1), PF_EINVAL);
  CHECK_RC(pf_copier_test_hold(c, 1), PF_OK);
  pf_copy_op held = {0, 0, 4096};
  CHECK_RC(pf_copier_submit(c, r, pool, PF_DIR_REGION_TO_POOL, &held, 1, 78), PF_OK);
  CHECK(!read_completion(fds[0], &done, 100));
  CHECK(all_zero(pb, 4096));
  CHECK_RC(pf_copier_test_hold(c, 0), PF_OK);
  CHECK(read_completion(fds[0], &done, 5000) && done.token == 78 && done.status == PF_OK);
  memset(pb, 0, 4096);

  /* 2000 batches against a 256-record pipe nobody reads for a while. */
  enum { N = 2000 };
  static unsigned char seen[N];
  memset(seen, 0, sizeof seen);
  for (int i = 0; i < N; i++) {
    pf_copy_op op = {(uint64_t)(i % 64) * 4096, (uint64_t)i * 1024, 512};
    CHECK_RC(pf_copier_submit(c, r, pool, PF_DIR_REGION_TO_POOL, &op, i % 3 ? 1 : 0, (uint64_t)i), PF_OK);
  }
  struct timespec pause = {0, 50 * 1000 * 1000};
  nanosleep(&pause, NULL);
  int got = 0, dup = 0, bad_status = 0;
  for (int i = 0; i < N && read_completion(fds[0], &done, 5000); i++) {
    got++;
    if (done.token >= N || seen[done.token]++) dup++;
    if (done.status != PF_OK) bad_status++;
  }
  CHECK(got == N && dup == 0 && bad_status == 0);
  CHECK(pipe_empty(fds[0]));
  unsigned char *expect = malloc(RSIZE);
  int fd = open(path, O_RDONLY);
  CHECK(read(fd, expect, RSIZE) == RSIZE);
  close(fd);
  int mismatch = 0;
  for (int i = 0; i < N; i++)
    if (i % 3 && memcmp(pb + (size_t)i * 1024, expect + (size_t)(i % 64) * 4096, 512) != 0) mismatch++;
  CHECK(mismatch == 0);

  /* Load back into the file: pool -> region, scattered and adjacent ops. */
  memset(pb, 0xAB, 3 * 4096);
  pf_copy_op load[] = {{8192, 0, 4096}, {12288, 4096, 4096}, {500000, 8192, 4096}};
  CHECK_RC(pf_copier_submit(c, r, pool, PF_DIR_POOL_TO_REGION, load, 3, 5), PF_OK);
  CHECK(read_completion(fds[0], &done, 5000) && done.token == 5 && done.status == PF_OK);
  fd = open(path, O_RDONLY);
  unsigned char *now = malloc(RSIZE);
  CHECK(read(fd, now, RSIZE) == RSIZE);
  close(fd);
  unsigned char ab[4096];
  memset(ab, 0xAB, sizeof ab);
  CHECK(memcmp(now + 8192, ab, 4096) == 0 && memcmp(now + 12288, ab, 4096) == 0 && memcmp(now + 500000, ab, 4096) == 0);
  CHECK(memcmp(now, expect, 8192) == 0 && memcmp(now + 16384, expect + 16384, 500000 - 16384) == 0);
  memcpy(expect, now, RSIZE); /* the file as it is now */
  free(now);

  /* Region close and pool destroy while a copy is queued. Deterministic:
   * 300 empty batches overfill the 256-record pipe, so both copy threads
   * block writing completions and the big batch behind them cannot run
   * until the pipe is read. */
  pf_copy_op big = {0, 0, RSIZE};
  CHECK(fcntl(fds[1], F_GETPIPE_SZ) == 4096);
  for (int i = 0; i < 300; i++) CHECK_RC(pf_copier_submit(c, r, pool, 0, NULL, 0, 10000 + (uint64_t)i), PF_OK);
  memset(pb, 0, RSIZE);
  CHECK_RC(pf_copier_submit(c, r, pool, PF_DIR_REGION_TO_POOL, &big, 1, 6), PF_OK);
  nanosleep(&pause, NULL);
  CHECK_RC(pf_pool_destroy(pool), PF_ECLOSED);
  CHECK_RC(pf_region_close(r), PF_OK); /* unmapped after the copy */
  int big_ok = 0;
  for (int i = 0; i < 301 && read_completion(fds[0], &done, 5000); i++)
    if (done.token == 6) big_ok = done.status == PF_OK;
  CHECK(big_ok);
  CHECK(pipe_empty(fds[0]));
  CHECK(memcmp(pb, expect, RSIZE) == 0);

  /* A producer shrinks its file under a mapped region: SIGBUS in the copy
   * thread fails the batch with PF_ECOPY, and the process lives on. */
  path = make_file("truncated", RSIZE, 9);
  CHECK_RC(pf_region_open_shm(path, RSIZE, &r), PF_OK);
  CHECK(truncate(path, 0) == 0);
  for (int dir = 0; dir <= 1; dir++) {
    CHECK_RC(pf_copier_submit(c, r, pool, dir, &big, 1, 8), PF_OK);
    CHECK(read_completion(fds[0], &done, 5000) && done.token == 8 && done.status == PF_ECOPY);
  }
  /* The guard is re-armed: a second fault is caught the same way. */
  CHECK_RC(pf_copier_submit(c, r, pool, 0, &big, 1, 9), PF_OK);
  CHECK(read_completion(fds[0], &done, 5000) && done.token == 9 && done.status == PF_ECOPY);
  CHECK_RC(pf_region_close(r), PF_OK);
  free(expect);

  /* Destroy waits for every batch: all completions are in the pipe after. */
  path = make_file("last", RSIZE, 3);
  CHECK_RC(pf_region_open_shm(path, RSIZE, &r), PF_OK);
  for (int i = 0; i < 8; i++) {
    pf_copy_op part = {0, (uint64_t)i * (PSIZE / 8), PSIZE / 8};
    CHECK_RC(pf_copier_submit(c, r, pool, 0, &part, 1, 100 + (uint64_t)i), PF_OK);
  }
  /* Drain concurrently: destroy blocks on writes into the small pipe only
   * if more than 256 records are pending, which 8 are not. */
  CHECK_RC(pf_copier_destroy(c), PF_OK);
  int after = 0;
  while (read_completion(fds[0], &done, 0)) after++;
  CHECK(after == 8);
  CHECK_RC(pf_region_close(r), PF_OK);
  CHECK_RC(pf_pool_destroy(pool), PF_OK);
  close(fds[0]);
  close(fds[1]);
}

int main(void) {
  const char *base = getenv("TMPDIR");
  snprintf(tmpdir, sizeof tmpdir, "%s/pf_c_api_XXXXXX", base && *base ? base : "/tmp");
  if (mkdtemp(tmpdir) == NULL) {
    perror("mkdtemp");
    return 2;
  }
  test_strings();
  test_pool_args();
  test_region_args();
  test_copier_args();
  test_uuid_and_event_args();
  test_copies();
  const char *names[] = {"small", "region", "truncated", "last"};
  for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
    char path[512];
    snprintf(path, sizeof path, "%s/%s", tmpdir, names[i]);
    unlink(path);
  }
  rmdir(tmpdir);
  printf("c_api: %d passed, %d failed\n", passed, failed);
  return failed ? 1 : 0;
}
