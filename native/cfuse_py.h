/*
 * The Python-facing parts of the C mount shared by cfuse.c and
 * cfuse_write.c: the Mount object, the bridge to Python, and the write
 * state of a new file (WriteState).
 */
#ifndef CFUSE_PY_H
#define CFUSE_PY_H
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "cfuse.h"

#define CF_MAX_THREADS 64

typedef struct {
    PyObject_HEAD
    struct fuse_session *se;
    PyObject *dispatch;
    pthread_t threads[CF_MAX_THREADS];
    int joined[CF_MAX_THREADS];
    int nthreads;
    atomic_int stop;
    int mounted;
    pthread_mutex_t hmu;  /* guards the list of open handles */
    cf_handle *handles;
} MountObject;

/* With the GIL held: dispatch(op, args) -> (errno, value); see cfuse.c. */
int cf_bridge(MountObject *m, const char *op, PyObject *args, PyObject **out);

/* A new file written through the C mount (cfuse_write.c). Python makes it
 * (kvfsd.cfuse_bridge) and keeps it in the file's WriteHandle; every C
 * handle open on the file holds a reference. */
typedef struct {
    PyObject_HEAD
    /* mu guards the fields marked (mu); it is never held across I/O or
     * while waiting for the GIL. Writes take tickets in the order they are
     * answered; their bytes go to disk at once, each from its own buffer,
     * and are hashed in ticket order, one at a time: the running hashes
     * belong to the write whose turn it is. The reservation table is
     * under rmu (held while Python reserves a chunk; never by Python).
     * A holder of mu while no write is in flight (quiet) owns both. */
    pthread_mutex_t mu;
    pthread_mutex_t rmu;
    pthread_cond_t turn;     /* serving moved, or an error came */
    int64_t next, serving;   /* tickets issued, and the one writing now (mu) */
    int64_t su;              /* the stripe unit: chunk i holds bytes [i*su, (i+1)*su) */
    int64_t size;            /* the end of the furthest write, or the last truncate (mu) */
    int written;             /* a write reached it (mu) */
    int error;               /* a write failed (errno): the file is never stored (mu) */
    int sealed;              /* being stored: later writes are refused (EROFS), the size is final (mu) */
    /* reserved chunks (rmu): chunk i is at res[i].off in files[res[i].file] (-1: not reserved yet) */
    struct cf_wchunk { int file; int64_t off; } *res;
    int64_t nres;
    /* the segments written into: the daemon's fd, our dup of it (the daemon
     * may close its own, never ours), and the same file opened again with
     * O_DIRECT for page-aligned writes (-1 where refused: tmpfs) */
    struct cf_wfile { int orig, fd, direct; } *files;
    int nfiles;
    /* running hashes of bytes [0, hashed), taken as in-order writes arrive */
    void *whole, *chunk;
    int64_t hashed;
    int hash_ok;             /* 0 once a write came out of order or a truncate cut them */
    unsigned char *sums;     /* digests of the full chunks hashed so far */
    int64_t nsums;
} WriteState;

extern PyTypeObject cf_WriteStateType;

/* Serve a write of buf at off, reply included (a worker thread, no GIL held). */
void cf_write(fuse_req_t req, MountObject *m, WriteState *ws, uint64_t pyfh, const char *buf, size_t size,
              off_t off);

#endif
