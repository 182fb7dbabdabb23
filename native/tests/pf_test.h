/*
 * What the C tests share: pass/fail counting (CHECK, CHECK_RC) and reading
 * one pf_completion record with a timeout. Each test is one .c file that
 * includes this once.
 */
#ifndef PF_TEST_H
#define PF_TEST_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <unistd.h>

#include "pegaflow_native.h"

static int passed, failed;

#define CHECK(cond)                                                               \
  do {                                                                            \
    if (cond) {                                                                   \
      passed++;                                                                   \
    } else {                                                                      \
      failed++;                                                                   \
      fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);    \
    }                                                                             \
  } while (0)

#define CHECK_RC(expr, want)                                                           \
  do {                                                                                 \
    int rc_ = (expr);                                                                  \
    if (rc_ == (want)) {                                                               \
      passed++;                                                                        \
    } else {                                                                           \
      failed++;                                                                        \
      fprintf(stderr, "%s:%d: %s = %d (%s), want %d\n", __FILE__, __LINE__, #expr, rc_, \
              pf_strerror(rc_), (want));                                               \
    }                                                                                  \
  } while (0)

/* Reads one completion, waiting at most timeout_ms. Returns 1 on success. */
static inline int read_completion(int fd, pf_completion *c, int timeout_ms) {
  size_t got = 0;
  while (got < sizeof *c) {
    struct pollfd pfd = {.fd = fd, .events = POLLIN};
    if (poll(&pfd, 1, timeout_ms) <= 0) return 0;
    ssize_t n = read(fd, (char *)c + got, sizeof *c - got);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) continue;
    if (n <= 0) return 0;
    got += (size_t)n;
  }
  return 1;
}

#endif /* PF_TEST_H */
