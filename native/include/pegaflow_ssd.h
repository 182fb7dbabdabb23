/*
 * pegaflow_ssd: batched positioned I/O between the pool and local files
 * (the SSD tier's copy engine). No policy: the caller decides what goes
 * where in which file.
 *
 *   pf_ssd_file    a file opened read-write with O_DIRECT where the file
 *                  system supports it (else buffered, reported by
 *                  pf_ssd_file_direct), and a capacity every op is checked
 *                  against.
 *   pf_ssd_engine  the I/O threads for one pool: io_uring (one ring thread,
 *                  the pool registered as fixed buffers where the kernel
 *                  and RLIMIT_MEMLOCK allow) when built with liburing, or a
 *                  thread pool running pread/pwrite (always built).
 *
 * A batch (pf_ssd_submit) is a list of (file offset, pool offset, length)
 * ops in one direction on one file. Every op is checked before any I/O is
 * issued: file offset, length and the pool address aligned to
 * PF_SSD_ALIGN, the file extent within the file's capacity, the pool extent
 * within the pool, 1..PF_SSD_MAX_OPS ops of at most PF_SSD_MAX_OP_LEN
 * bytes. On error nothing is issued and no completion is written. On PF_OK
 * exactly one pf_completion {token, status} is later written to the
 * engine's notify fd (the copier's record, pegaflow_native.h): PF_OK,
 * PF_ESHORT (a read met the end of the file), PF_ENOSPC, or PF_EIO. No byte
 * moves after the completion was written.
 *
 * Threading: every call is thread-safe. None may be called with an object
 * after its close/destroy returned. A batch holds its file: pf_ssd_file_close
 * closes the fd after the last batch using it completed.
 */
#ifndef PEGAFLOW_SSD_H
#define PEGAFLOW_SSD_H

#include <stdint.h>

#include "pegaflow_native.h"

#ifdef __cplusplus
extern "C" {
#endif

#define PF_SSD_ALIGN 4096u              /* offsets, lengths, pool addresses */
#define PF_SSD_MAX_OPS 65536u           /* ops per batch */
#define PF_SSD_MAX_OP_LEN (64u << 20)   /* bytes per op */
#define PF_SSD_MAX_DEPTH 4096           /* ring entries or threads */

/* Flags for pf_ssd_file_open. */
#define PF_SSD_CREATE 1u         /* create (mode 0600) if missing */
#define PF_SSD_REQUIRE_DIRECT 2u /* fail with PF_ENOTSUP rather than fall back to buffered I/O */

/* Engine backends. */
#define PF_SSD_AUTO 0    /* io_uring when built and the kernel allows it, else threads */
#define PF_SSD_THREADS 1 /* pread/pwrite on a thread pool */
#define PF_SSD_URING 2   /* io_uring; PF_ENOTSUP when not built or refused by the kernel */

/* Directions. */
#define PF_SSD_READ 0  /* file -> pool */
#define PF_SSD_WRITE 1 /* pool -> file */

typedef struct pf_ssd_file pf_ssd_file;
typedef struct pf_ssd_engine pf_ssd_engine;

typedef struct pf_ssd_op {
  uint64_t file_offset;
  uint64_t pool_offset;
  uint64_t len;
} pf_ssd_op;

/* 1 when this library was built with liburing. */
int pf_ssd_uring_built(void);

/* Opens path read-write (O_CLOEXEC | O_NOFOLLOW), with O_DIRECT when the
 * file system accepts it. capacity (a multiple of PF_SSD_ALIGN, > 0) bounds
 * every op's file extent; the file is not resized (the caller fallocates
 * or truncates as it sees fit). PF_EIO (errno kept) when open fails. */
int pf_ssd_file_open(const char *path, uint64_t capacity, uint32_t flags, pf_ssd_file **out);
/* 1 when the file was opened with O_DIRECT, 0 when it fell back. */
int pf_ssd_file_direct(const pf_ssd_file *f);
uint64_t pf_ssd_file_capacity(const pf_ssd_file *f);
/* Marks the file closed (later submits: PF_ECLOSED); the fd is closed once
 * the last batch using it completed. */
int pf_ssd_file_close(pf_ssd_file *f);

/* Creates an engine for pool (held until destroy: the pool cannot be
 * destroyed before). depth: threads (PF_SSD_THREADS) or ring entries
 * (PF_SSD_URING), 1..PF_SSD_MAX_DEPTH. Completions go to notify_fd. */
int pf_ssd_engine_create(pf_pool *pool, int backend, int depth, int notify_fd, pf_ssd_engine **out);
/* The backend chosen (PF_SSD_THREADS or PF_SSD_URING) and whether the pool
 * is registered with the ring as fixed buffers (0 for threads). */
int pf_ssd_engine_info(const pf_ssd_engine *e, int *backend, int *registered);
/* Validates the batch (see above) and queues it; returns without waiting. */
int pf_ssd_submit(pf_ssd_engine *e, pf_ssd_file *f, int direction, const pf_ssd_op *ops, uint64_t n_ops,
                  uint64_t token);
/* Refuses new submits, waits for every accepted batch, stops the threads,
 * releases the pool and frees the engine. */
int pf_ssd_engine_destroy(pf_ssd_engine *e);

#ifdef __cplusplus
}
#endif

#endif /* PEGAFLOW_SSD_H */
