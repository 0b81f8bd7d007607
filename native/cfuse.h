/*
 * The C mount (kvfsd._cfuse): libfuse's low-level API served by a pool of
 * threads inside the daemon process. The hot paths (reads of objects,
 * writes of new files) run here without the GIL; everything else (lookups, namespace changes,
 * opens, commits, stats, xattrs) is handed to Python (kvfsd.cfuse_bridge),
 * which runs the same handlers as the pyfuse3 mount (kvfsd.fuse_ops).
 *
 * cfuse.c       the module, the session, the worker threads and the bridge ops
 * cfuse_read.c  open objects: chunks verified, cached and replied from here
 * cfuse_write.c new files: written to their reserved place in T1 and hashed here
 * cfuse_py.h    what cfuse.c and cfuse_write.c share (the Python side)
 * cfuse_null.c  a filesystem that discards writes: the bench's write ceiling
 */
#ifndef CFUSE_H
#define CFUSE_H

#define FUSE_USE_VERSION 35
#include <fuse_lowlevel.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#include "kv_api.h"

extern const kv_c_api *cf_kv;  /* hashing loops of kvfs._native (set at import) */

/* counters read by kvfs stats (relaxed atomics: figures, not invariants) */
typedef struct {
    atomic_llong reads, read_bytes, chunks_loaded, chunks_private, t0_verified, bad, py_calls, writes, write_bytes, writes_direct;
} cf_counters;
extern cf_counters cf_stats;

typedef struct {
    int fd;             /* a dup of the daemon's segment fd, owned by the handle; -1: gone */
    int64_t off, len;   /* the chunk's payload in that segment */
    unsigned char csum[16];
} cf_chunk;

enum { SLOT_EMPTY, SLOT_LOADING, SLOT_READY };
typedef struct {
    int64_t ci;         /* the chunk held (or being loaded) */
    char *buf;
    size_t cap;
    int state;
    int refs;           /* replies using buf: never reloaded while > 0 */
    uint64_t used;      /* LRU tick */
} cf_slot;

#define CF_SLOTS 4

enum { CF_PY, CF_READ, CF_WRITE };

/* One open file. fi->fh is a pointer to this. Invariant: an object's
 * bytes are served only from a chunk whose xxh3-128 matched, read into a
 * buffer of this handle (T1) or checked in place in the leased arena
 * (T0, whose bytes do not change while the lease is held). */
typedef struct cf_handle {
    uint64_t pyfh;      /* the handle of the Python side (lease, release) */
    int kind;
    int64_t size, unit; /* object size; every chunk but the last is unit bytes */
    int nchunks;
    cf_chunk *chunks;
    int *fds;           /* the dups the chunks share (one per segment), closed at release */
    int nfds;
    const char *t0;     /* the object in the arena, or NULL */
    void *t0owner;      /* the Python buffer export that keeps t0 mapped (cfuse.c) */
    void *ws;           /* CF_WRITE: the file's WriteState (a reference; cfuse_write.c) */
    _Atomic unsigned char *verified;  /* T0: chunk checked */
    _Atomic unsigned char *advised;   /* T1: kernel asked to read it ahead */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    cf_slot slots[CF_SLOTS];
    uint64_t tick;
    atomic_int bad;     /* a chunk failed verification: every read is EIO */
    struct cf_handle *prev, *next;  /* every open handle (cfuse.c frees what is left at close) */
} cf_handle;

/* cfuse_null.c: the discarding filesystem (Mount with dispatch None) */
extern const struct fuse_lowlevel_ops cf_null_ops;

/* cfuse_read.c */
void cf_read_init(cf_handle *h);
/* Reply to a read of [off, off+size): 0 if replied, else an errno not yet replied. */
int cf_read(fuse_req_t req, cf_handle *h, size_t size, off_t off);
void cf_read_free(cf_handle *h);

#endif
