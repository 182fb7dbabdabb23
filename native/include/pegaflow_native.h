/*
 * pegaflow_native: memory and copies for PegaEngine. Nothing else.
 *
 * Four objects (the UCX transfer objects are pegaflow_xfer.h's):
 *   pf_pool    the engine's host pool (cudaHostAlloc in the CUDA build; an
 *              mmap region with best-effort hugepages, mlock and NUMA binding
 *              in the CPU build).
 *   pf_region  a producer's KV memory opened by the engine (shared-memory
 *              file in the CPU build, CUDA IPC handle in the CUDA build).
 *              Every access is bounds-checked against its size.
 *   pf_copier  batched asynchronous copies between regions and the pool on
 *              native copy threads (CPU) or per-device streams (CUDA).
 *   pf_event   a producer's interprocess CUDA event (CUDA build): a batch
 *              submitted after it runs on the GPU only once the producer's
 *              stream passed the event's latest record, so the producer
 *              never synchronizes on the host to order its KV writes.
 *
 * Completion is reported by writing one pf_completion record (16 bytes, so a
 * single pipe write is atomic) to the notify fd given to pf_copier_create.
 * The Go side reads that fd through its poller, so no OS thread blocks per
 * copy.
 *
 * All functions return PF_OK (0) or a negative PF_E* code; none aborts on bad
 * input. Pointers and lengths are validated at this boundary.
 */
#ifndef PEGAFLOW_NATIVE_H
#define PEGAFLOW_NATIVE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define PF_OK 0
#define PF_EINVAL (-1)   /* bad argument: null pointer, zero size, ... */
#define PF_ERANGE (-2)   /* an offset/length falls outside a region or pool */
#define PF_ENOMEM (-3)   /* allocation failed */
#define PF_EIO (-4)      /* open/mmap/IPC failure; see errno or CUDA error */
#define PF_ENOTSUP (-5)  /* not available in this build (e.g. IPC on CPU) */
#define PF_ECLOSED (-6)  /* object is closing */
#define PF_ECOPY (-7)    /* a copy failed at run time */
#define PF_ENODEV (-8)   /* no CUDA device with that UUID is visible */
#define PF_EPEER (-9)    /* xfer: the peer failed or its connection was closed */
#define PF_ECANCELED (-10) /* xfer: the batch was cancelled */
#define PF_ESHORT (-11)  /* ssd: the file ended before a read did (truncated file) */
#define PF_ENOSPC (-12)  /* ssd: the file system is full */

/* Copy directions. */
#define PF_DIR_REGION_TO_POOL 0 /* save */
#define PF_DIR_POOL_TO_REGION 1 /* load */

typedef struct pf_pool pf_pool;
typedef struct pf_region pf_region;
typedef struct pf_copier pf_copier;
typedef struct pf_event pf_event;

/* Bytes of cudaIpcMemHandle_t and cudaIpcEventHandle_t. */
#define PF_CUDA_IPC_HANDLE_BYTES 64

typedef struct pf_copy_op {
  uint64_t region_offset;
  uint64_t pool_offset;
  uint64_t len;
} pf_copy_op;

/* Written to the notify fd when a submitted batch finishes. */
typedef struct pf_completion {
  uint64_t token;  /* the token given to pf_copier_submit */
  int64_t status;  /* PF_OK or a PF_E* code */
} pf_completion;

/* "cpu" or "cuda". */
const char *pf_backend(void);
/* Static message for a PF_E* code. */
const char *pf_strerror(int code);

/* Flags for pf_pool_create. */
#define PF_POOL_HUGEPAGES 1u /* best effort */
#define PF_POOL_MLOCK 2u     /* best effort */

/* numa_node < 0: no binding. device < 0: no CUDA device (CPU build ignores). */
int pf_pool_create(uint64_t size, int numa_node, int device, uint32_t flags, pf_pool **out);
uint64_t pf_pool_size(const pf_pool *pool);
/* Host address of the pool; valid until pf_pool_destroy. */
void *pf_pool_base(pf_pool *pool);
/* Fails with PF_ECLOSED while copies that use the pool are in flight. */
int pf_pool_destroy(pf_pool *pool);

/* Maps `size` bytes of a shared-memory file. Fails with PF_ERANGE when the
 * file is smaller than size. */
int pf_region_open_shm(const char *path, uint64_t size, pf_region **out);
/* pf_region_open_shm of a file the caller opened read-write (and checked:
 * the engine opens it beneath its shm directory and checks the owner).
 * It must be a regular file of at least size bytes (fstat), else PF_EIO or
 * PF_ERANGE. The fd stays the caller's: close it after this returns (the
 * mapping keeps the file alive). */
int pf_region_open_shm_fd(int fd, uint64_t size, pf_region **out);
/* Maps a device UUID to this process's CUDA ordinal (which depends on
 * CUDA_VISIBLE_DEVICES, the UUID does not). Accepts nvidia-smi's form
 * ("GPU-8e3c1a2b-...", also "MIG-..."), or the 32 hex digits alone; dashes
 * are ignored. PF_ENODEV when no visible device has it, PF_EINVAL when it is
 * not a UUID (at most uuid_len bytes are read; a NUL ends it earlier),
 * PF_EIO when the CUDA runtime has no devices, PF_ENOTSUP in the CPU build. */
int pf_cuda_device_by_uuid(const char *uuid, uint64_t uuid_len, int *device_out);

/* Opens a CUDA IPC handle (cudaIpcMemHandle_t bytes) on `device`. */
int pf_region_open_cuda_ipc(const uint8_t *handle, uint64_t handle_len, int device, uint64_t size,
                            pf_region **out);
uint64_t pf_region_size(const pf_region *region);
/* Marks the region closed; the mapping is released when the last in-flight
 * copy that uses it completes. Later submits fail with PF_ECLOSED. */
int pf_region_close(pf_region *region);

/* threads: CPU copy threads (CPU build) or streams per direction (CUDA). */
int pf_copier_create(int threads, int notify_fd, pf_copier **out);
/* Validates every op against the region and pool sizes before any byte
 * moves; on error nothing is copied and no completion is written. On PF_OK
 * exactly one completion with `token` is written later. */
int pf_copier_submit(pf_copier *copier, pf_region *region, pf_pool *pool, int direction,
                     const pf_copy_op *ops, uint64_t n_ops, uint64_t token);
/* pf_copier_submit, but the batch's GPU copies start only after `after`
 * (NULL: no wait) reached its most recent record at the time of this call
 * (cudaStreamWaitEvent on the copy stream; the host never blocks). Records
 * the producer makes later are not waited for, so it must record before it
 * asks for the copy. Only device regions can wait: a host (shm) region with
 * an event is PF_EINVAL; any event in the CPU build is PF_ENOTSUP; a closed
 * one PF_ECLOSED. The batch holds the event until it completes. */
int pf_copier_submit_after(pf_copier *copier, pf_region *region, pf_pool *pool, int direction,
                           const pf_copy_op *ops, uint64_t n_ops, pf_event *after, uint64_t token);
/* Waits for in-flight batches, then frees the copier. */
int pf_copier_destroy(pf_copier *copier);
/* Testing only: while hold is nonzero the host copy threads start no new
 * slice, so accepted host-memory (shm) batches stay in flight and write no
 * completion: a copy that does not finish, as one stuck on a dead
 * producer's event would. hold = 0 lets them run. Device batches of the
 * CUDA build are not held. pf_copier_destroy waits for held batches. */
int pf_copier_test_hold(pf_copier *copier, int hold);

/* Opens a producer's interprocess event (cudaIpcEventHandle_t bytes, from
 * an event created with cudaEventInterprocess | cudaEventDisableTiming, e.g.
 * torch.cuda.Event(interprocess=True).ipc_handle()) on `device` (< 0:
 * device 0). PF_ENOTSUP in the CPU build; PF_EIO when the driver refuses it
 * (other process gone, no IPC support, ...). */
int pf_event_open_ipc(const uint8_t *handle, uint64_t handle_len, int device, pf_event **out);
/* Marks the event closed; it is destroyed when the last batch that waited
 * on it completes. Later submits with it fail with PF_ECLOSED. */
int pf_event_close(pf_event *event);

#ifdef __cplusplus
}
#endif

#endif /* PEGAFLOW_NATIVE_H */
