/*
 * Closable reference counts: the one lifetime rule of every object a batch
 * can hold (pool, region, CUDA event). See pf_ref in pf_internal.h.
 */
#include "pf_internal.h"

void pf__ref_init(pf_ref *r, void (*free_fn)(pf_ref *)) {
  r->refs = 0;
  r->closed = 0;
  r->free_fn = free_fn;
  pthread_mutex_init(&r->mu, NULL);
}

/* Called once, by whoever saw the object closed and unused; nobody else
 * can reach it any more. */
static void ref_free(pf_ref *r) {
  pthread_mutex_destroy(&r->mu);
  r->free_fn(r);
}

int pf__ref_acquire(pf_ref *r) {
  pthread_mutex_lock(&r->mu);
  int closed = r->closed;
  if (!closed) r->refs++;
  pthread_mutex_unlock(&r->mu);
  return closed ? PF_ECLOSED : PF_OK;
}

void pf__ref_release(pf_ref *r) {
  pthread_mutex_lock(&r->mu);
  int last = --r->refs == 0 && r->closed;
  pthread_mutex_unlock(&r->mu);
  if (last) ref_free(r);
}

/* Both closes decide under one lock: either the object is closed now (and
 * freed if unused) or nothing changed. */
static int ref_close(pf_ref *r, int only_idle) {
  pthread_mutex_lock(&r->mu);
  int rc = r->closed || (only_idle && r->refs != 0) ? PF_ECLOSED : PF_OK;
  int last = 0;
  if (rc == PF_OK) {
    r->closed = 1;
    last = r->refs == 0;
  }
  pthread_mutex_unlock(&r->mu);
  if (last) ref_free(r);
  return rc;
}

int pf__ref_close(pf_ref *r) { return ref_close(r, 0); }

int pf__ref_close_idle(pf_ref *r) { return ref_close(r, 1); }
