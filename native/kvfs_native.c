/*
 * kvfs._native: the client data plane's hot loops in C.
 *
 * What measurement showed Python does badly (see README, "native"):
 *  - many small preadv/pwritev calls: each is a GIL round trip plus a thread
 *    pool hop per task in Python;
 *  - large copies out of the shared-memory arena: a memoryview assignment
 *    holds the GIL and uses one core;
 *  - hashing what was just read while it is still in cache.
 *
 * Every entry point releases the GIL for the whole batch and spreads the
 * work over a small persistent pool of worker threads; the calling thread
 * works too. Work is cut into pieces of at most PIECE bytes so one large
 * copy also uses every thread. A task whose bytes were all handled by one
 * thread is verified as it goes, sub-block by sub-block while the bytes are
 * in cache; a task cut into several pieces (fewer tasks than threads) is
 * hashed after all its pieces are done.
 *
 * The pool runs one batch at a time; a caller that finds it busy does its
 * batch alone on its own thread instead of waiting (several client threads
 * then still proceed in parallel).
 *
 * The API and the results are identical to kvfs._native_py (the fallback);
 * tests run the data-plane suite against both.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "directory.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

/* XXH3-128 cut into lanes, as the GPU computes it (shared with kvfs/gpu_hash.py) */
#include "xxh3_lanes.h"
#include "kv_api.h"

/* hashing loops: hash_generic.c and hash_avx2.c (see hash_impl.h) */
typedef void (*hash16_fn)(const void *, size_t, unsigned char *);
typedef int (*copy_verify_fn)(char *, const char *, size_t, const unsigned char *);
typedef int (*read_verify_fn)(int, int64_t, char *, size_t, const unsigned char *);
typedef void (*copy_plain_fn)(char *, const char *, size_t);
typedef void (*hash_chunked_fn)(char *, const char *, size_t, size_t, unsigned char *, unsigned char *);
typedef void (*hreset_fn)(void *);
typedef void (*hupdate_fn)(void *, const void *, size_t);
typedef void (*hdigest_fn)(void *, unsigned char *);
size_t kv_hstate_size_generic(void);
void kv_hreset_generic(void *);
void kv_hupdate_generic(void *, const void *, size_t);
void kv_hdigest_generic(void *, unsigned char *);
void kv_hash_chunked_generic(char *, const char *, size_t, size_t, unsigned char *, unsigned char *);
void kv_hash16_generic(const void *, size_t, unsigned char *);
int kv_copy_verify_generic(char *, const char *, size_t, const unsigned char *);
void kv_copy_plain_generic(char *, const char *, size_t);
int kv_read_verify_generic(int, int64_t, char *, size_t, const unsigned char *);
int kv_avx2_built(void);
#if defined(__x86_64__) && defined(__GNUC__)
void kv_hash16_avx2(const void *, size_t, unsigned char *);
int kv_copy_verify_avx2(char *, const char *, size_t, const unsigned char *);
void kv_copy_plain_avx2(char *, const char *, size_t);
int kv_read_verify_avx2(int, int64_t, char *, size_t, const unsigned char *);
void kv_hash_chunked_avx2(char *, const char *, size_t, size_t, unsigned char *, unsigned char *);
void kv_hreset_avx2(void *);
void kv_hupdate_avx2(void *, const void *, size_t);
void kv_hdigest_avx2(void *, unsigned char *);
#endif
static hash16_fn hash16 = kv_hash16_generic;
static copy_verify_fn copy_verify = kv_copy_verify_generic;
static copy_plain_fn copy_plain = kv_copy_plain_generic;
static read_verify_fn read_verify = kv_read_verify_generic;
static hash_chunked_fn hash_chunked = kv_hash_chunked_generic;
static hreset_fn hreset = kv_hreset_generic;
static hupdate_fn hupdate = kv_hupdate_generic;
static hdigest_fn hdigest = kv_hdigest_generic;
static const char *simd = "generic";

#define PIECE (1u << 20)       /* max bytes one thread takes at a time */
#define MAX_THREADS 64
#define INLINE_BELOW (256u << 10) /* batches smaller than this run on the caller alone */
/* A verified task in a batch of fewer tasks than threads is cut into pieces
 * of this size, copied or read by all the threads at once and hashed in
 * order as they land (chase_hash), each while it is still in cache: the
 * hash of one piece overlaps the copy of the next, where a fused task
 * (do_fused) copies and hashes on one thread, one after the other. */
#define CHASE_PIECE (256u << 10)
/* Batches being cut or run right now in this process. A chase spreads one
 * caller's task over idle cores; with another batch in flight the cores are
 * not idle, and the wake-ups and switches cost more than they bring
 * (measured: two callers' 1 MiB reads at 4.4 GB/s chased, 7.2 fused). */
static atomic_int batches_in_flight;
static int online_cpus = 1;

enum { OP_READ, OP_COPY, OP_WRITE, OP_HASH, OP_HASHC };

typedef struct {
    int fd;
    int64_t offset;
    char *dst;          /* read/copy: destination; write/hash: unused */
    const char *src;    /* copy/write/hash: source */
    size_t len;
    const unsigned char *want;  /* 16-byte expected sum or NULL */
    unsigned char got[16];      /* write/hash: computed sum */
    int status;         /* 0 ok, 1 short, 2 mismatch, -errno */
    int fused;          /* one piece, verified as it is copied/read (see do_fused) */
    size_t chunk;               /* OP_HASHC: chunk size */
    unsigned char *chunk_sums;  /* OP_HASHC: 16 bytes per chunk */
    atomic_int pieces_left;
    /* chase: pieces landed (bytes in place, or a failure recorded) and
     * hashed in piece order by whichever thread holds `hashing` */
    int chase;
    size_t first_piece, npieces;
    atomic_uchar *landed;
    atomic_int hashing;
    size_t hashed;      /* pieces hashed so far; only the holder of `hashing` touches it */
    void *hstate;       /* streaming xxh3-128, 64-byte aligned */
} task_t;

typedef struct {
    uint32_t task;
    size_t start, len;
} piece_t;

typedef struct {
    int op;
    task_t *tasks;
    size_t ntasks;
    piece_t *pieces;
    size_t npieces;
    atomic_size_t next;
    atomic_size_t done;
} batch_t;

static void finish_task(batch_t *b, task_t *t) {
    if (t->status != 0 || t->fused) return;
    if (b->op == OP_READ || b->op == OP_COPY) {
        if (t->want) {
            unsigned char got[16];
            hash16(t->dst, t->len, got);
            if (memcmp(got, t->want, 16) != 0) t->status = 2;
        }
    } else if (b->op == OP_WRITE || b->op == OP_HASH) {
        hash16(t->src, t->len, t->got);
    }
}

/* A verified task done by one thread: copied or read and hashed as it goes. */
static void do_fused(batch_t *b, task_t *t) {
    if (b->op == OP_HASHC)
        hash_chunked(t->dst, t->src, t->len, t->chunk, t->got, t->chunk_sums);
    else if (b->op == OP_COPY)
        t->status = copy_verify(t->dst, t->src, t->len, t->want);
    else
        t->status = read_verify(t->fd, t->offset, t->dst, t->len, t->want);
}

/* pread (into dst) or pwrite (from src) bytes [start, start+len) of a task
 * in full. 0 ok; a read past the end of the file is 1 (short); a write that
 * makes no progress is -ENOSPC; other failures -errno. */
static int io_all(int write, task_t *t, size_t start, size_t len) {
    for (size_t pos = 0; pos < len;) {
        int64_t off = t->offset + (int64_t)(start + pos);
        ssize_t n = write ? pwrite(t->fd, t->src + start + pos, len - pos, off)
                          : pread(t->fd, t->dst + start + pos, len - pos, off);
        if (n < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        if (n == 0) return write ? -ENOSPC : 1;
        pos += (size_t)n;
    }
    return 0;
}

/* Hash a chase task's landed pieces in order, as long as the next one has
 * landed. Whoever lands a piece calls this; only one thread hashes a task at
 * a time (trylock). A thread that finds the lock taken leaves: the holder
 * checks again after its release, and because both the landing flag and
 * the lock are sequentially consistent, a piece that landed before the
 * failed trylock is seen by that check. So every piece is hashed, inside
 * the do_piece of some thread, before the batch counts that thread done;
 * the last hash checks the sum. A failed piece (status set) stops the
 * hashing: the task is already a failure. */
static void chase_hash(batch_t *b, task_t *t) {
    for (;;) {
        int free_ = 0;
        if (!atomic_compare_exchange_strong(&t->hashing, &free_, 1)) return;
        while (t->hashed < t->npieces && atomic_load(&t->landed[t->hashed])) {
            piece_t *q = &b->pieces[t->first_piece + t->hashed];
            /* a read hashes what it read (in cache); a copy hashes its
             * source, which the copy just loaded (its non-temporal
             * destination is not in cache): as copy_verify does */
            if (t->status == 0) hupdate(t->hstate, (b->op == OP_COPY ? t->src : t->dst) + q->start, q->len);
            if (++t->hashed == t->npieces && t->status == 0) {
                unsigned char got[16];
                hdigest(t->hstate, got);
                if (memcmp(got, t->want, 16) != 0) t->status = 2;
            }
        }
        atomic_store(&t->hashing, 0);
        if (!(t->hashed < t->npieces && atomic_load(&t->landed[t->hashed]))) return;
    }
}

static void do_piece(batch_t *b, piece_t *p) {
    task_t *t = &b->tasks[p->task];
    if (t->chase) {
        if (b->op == OP_COPY) {
            copy_plain(t->dst + p->start, t->src + p->start, p->len);
        } else {
            int st = io_all(0, t, p->start, p->len);
            if (st != 0) t->status = st;  /* any failure fails the task; which one is reported does not matter */
        }
        atomic_store(&t->landed[(size_t)(p - b->pieces) - t->first_piece], 1);
        chase_hash(b, t);
        return;
    }
    if (t->fused) {
        do_fused(b, t);
        atomic_fetch_sub(&t->pieces_left, 1);
        return;
    }
    switch (b->op) {
    case OP_COPY:
        copy_plain(t->dst + p->start, t->src + p->start, p->len);
        break;
    case OP_READ:
    case OP_WRITE:
        if (t->status == 0) t->status = io_all(b->op == OP_WRITE, t, p->start, p->len);
        break;
    case OP_HASH:
        break;
    }
    /* the thread that finishes a task's last piece hashes it */
    if (atomic_fetch_sub(&t->pieces_left, 1) == 1) finish_task(b, t);
}

static void work(batch_t *b) {
    for (;;) {
        size_t i = atomic_fetch_add(&b->next, 1);
        if (i >= b->npieces) return;
        do_piece(b, &b->pieces[i]);
        atomic_fetch_add(&b->done, 1);
    }
}

/* ---------------------------------------------------------------- the pool */
static pthread_mutex_t pool_busy = PTHREAD_MUTEX_INITIALIZER;  /* one batch at a time */
static pthread_mutex_t pool_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_cv = PTHREAD_COND_INITIALIZER;
static pthread_cond_t pool_done_cv = PTHREAD_COND_INITIALIZER;
static int pool_size = 0;
static batch_t *pool_batch = NULL;
static uint64_t pool_epoch = 0;
static int pool_want = 0;    /* workers asked to join the current batch */
static int pool_active = 0;  /* workers inside the current batch */

static void *worker_main(void *arg) {
    (void)arg;
    uint64_t seen = 0;
    pthread_mutex_lock(&pool_mu);
    for (;;) {
        while (pool_epoch == seen || pool_want <= 0) {
            if (pool_epoch != seen) seen = pool_epoch;  /* batch needs no more workers */
            pthread_cond_wait(&pool_cv, &pool_mu);
        }
        seen = pool_epoch;
        pool_want--;
        pool_active++;
        batch_t *b = pool_batch;
        pthread_mutex_unlock(&pool_mu);
        work(b);
        pthread_mutex_lock(&pool_mu);
        if (--pool_active == 0) pthread_cond_broadcast(&pool_done_cv);
    }
    return NULL;
}

static void grow_pool(int n) {
    while (pool_size < n) {
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int rc = pthread_create(&th, &attr, worker_main, NULL);
        pthread_attr_destroy(&attr);
        if (rc != 0) return;
        pool_size++;
    }
}

/* Runs the batch with up to `threads` threads (the caller included). */
static void run_batch(batch_t *b, int threads, size_t total) {
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads <= 1 || b->npieces <= 1 || total < INLINE_BELOW || pthread_mutex_trylock(&pool_busy) != 0) {
        work(b);
        return;
    }
    int helpers = threads - 1;
    if ((size_t)helpers > b->npieces - 1) helpers = (int)(b->npieces - 1);
    pthread_mutex_lock(&pool_mu);
    grow_pool(helpers);
    if (helpers > pool_size) helpers = pool_size;
    pool_batch = b;
    pool_want = helpers;
    pool_epoch++;
    pthread_cond_broadcast(&pool_cv);
    pthread_mutex_unlock(&pool_mu);
    work(b);
    pthread_mutex_lock(&pool_mu);
    pool_want = 0;  /* latecomers must not join a finished batch */
    while (pool_active > 0) pthread_cond_wait(&pool_done_cv, &pool_mu);
    pool_batch = NULL;
    pthread_mutex_unlock(&pool_mu);
    pthread_mutex_unlock(&pool_busy);
}

/* ------------------------------------------------------------ arg handling */
typedef struct {
    Py_buffer *bufs;
    size_t n;
} bufset_t;

static void release_bufs(bufset_t *s) {
    for (size_t i = 0; i < s->n; i++) PyBuffer_Release(&s->bufs[i]);
    PyMem_Free(s->bufs);
    s->bufs = NULL;
    s->n = 0;
}

static int get_bufs(PyObject *seq, Py_ssize_t n, int writable, bufset_t *out, const char *what) {
    out->bufs = PyMem_Calloc((size_t)(n ? n : 1), sizeof(Py_buffer));
    out->n = 0;
    if (!out->bufs) { PyErr_NoMemory(); return -1; }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *o = PySequence_Fast_GET_ITEM(seq, i);
        int flags = writable ? (PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) : PyBUF_C_CONTIGUOUS;
        if (PyObject_GetBuffer(o, &out->bufs[i], flags) != 0) {
            release_bufs(out);
            PyErr_Format(PyExc_TypeError, "%s[%zd] must be a %s contiguous buffer", what, i,
                         writable ? "writable" : "readable");
            return -1;
        }
        out->n++;
    }
    return 0;
}

/* How many pieces a task is cut into. A verified read/copy stays whole (and
 * is hashed as it goes) when there are enough tasks to keep every thread
 * busy; with fewer tasks than threads it is cut up for parallel copying and
 * hashed afterwards. */
static size_t piece_count(batch_t *b, task_t *t, int threads) {
    size_t len = t->len;
    t->chase = 0;  /* decided here, each batch: make_pieces cuts by what this says */
    int verify = t->want != NULL && (b->op == OP_READ || b->op == OP_COPY);
    /* Where chasing pays, measured on the 2-core VM (one caller, 8 threads,
     * 256 MiB of distinct blocks): reads of 1 MiB 4.8 GB/s chased against
     * 3.5 fused (the kernel's copy is slow, the hash a large share), of
     * 8 MiB 7.9 against 4.0; arena copies of 1 MiB 6.2 chased against 7.2
     * fused (waking helpers costs more than they save), of 8 MiB 10.2-10.8
     * against 7.4. */
    size_t chase_above = b->op == OP_READ ? CHASE_PIECE : PIECE;
    if (verify && threads > 1 && online_cpus > 1 && b->ntasks < (size_t)threads && len > chase_above &&
        atomic_load(&batches_in_flight) <= 1) {
        t->chase = 1;
        return (len + CHASE_PIECE - 1) / CHASE_PIECE;
    }
    t->fused = (verify && (b->ntasks >= (size_t)threads || len <= PIECE)) || b->op == OP_HASHC;
    if (t->fused) return 1;
    return len ? (len + PIECE - 1) / PIECE : 1;
}

/* What make_pieces allocated (also after it failed half way). */
static void free_pieces(batch_t *b) {
    for (size_t i = 0; b->tasks && i < b->ntasks; i++) {
        PyMem_Free(b->tasks[i].landed);
        free(b->tasks[i].hstate);
        b->tasks[i].landed = NULL;
        b->tasks[i].hstate = NULL;
    }
    PyMem_Free(b->pieces);
    b->pieces = NULL;
}

/* Cut tasks into pieces of at most PIECE bytes (chase tasks: CHASE_PIECE). */
static int make_pieces(batch_t *b, size_t *total, int threads) {
    size_t np = 0;
    *total = 0;
    for (size_t i = 0; i < b->ntasks; i++) {
        np += piece_count(b, &b->tasks[i], threads);
        *total += b->tasks[i].len;
    }
    b->pieces = PyMem_Calloc(np ? np : 1, sizeof(piece_t));
    if (!b->pieces) { PyErr_NoMemory(); return -1; }
    size_t p = 0;
    for (size_t i = 0; i < b->ntasks; i++) {
        size_t len = b->tasks[i].len;
        task_t *t = &b->tasks[i];
        size_t k = t->fused ? 1 : t->chase ? (len + CHASE_PIECE - 1) / CHASE_PIECE
                                           : (len ? (len + PIECE - 1) / PIECE : 1);
        size_t step = t->chase ? CHASE_PIECE : k ? (len + k - 1) / k : 0;  /* even pieces; chase: in order */
        atomic_init(&t->pieces_left, (int)k);
        if (t->chase) {
            t->first_piece = p;
            t->npieces = k;
            t->landed = PyMem_Calloc(k, sizeof(atomic_uchar));
            t->hstate = aligned_alloc(64, (kv_hstate_size_generic() + 63) & ~(size_t)63);  /* one layout for both builds */
            if (!t->landed || !t->hstate) { PyErr_NoMemory(); return -1; }
            hreset(t->hstate);
            atomic_init(&t->hashing, 0);
        }
        for (size_t j = 0; j < k; j++) {
            size_t start = j * step;
            size_t l = start >= len ? 0 : (len - start < step ? len - start : step);
            b->pieces[p].task = (uint32_t)i;
            b->pieces[p].start = start;
            b->pieces[p].len = l;
            p++;
        }
    }
    b->npieces = np;
    atomic_init(&b->next, 0);
    atomic_init(&b->done, 0);
    return 0;
}

static PyObject *status_list(batch_t *b) {
    PyObject *out = PyList_New((Py_ssize_t)b->ntasks);
    if (!out) return NULL;
    for (size_t i = 0; i < b->ntasks; i++) {
        PyObject *v = PyLong_FromLong(b->tasks[i].status);
        if (!v) { Py_DECREF(out); return NULL; }
        PyList_SET_ITEM(out, (Py_ssize_t)i, v);
    }
    return out;
}

static PyObject *sums_list(batch_t *b) {
    PyObject *out = PyList_New((Py_ssize_t)b->ntasks);
    if (!out) return NULL;
    for (size_t i = 0; i < b->ntasks; i++) {
        PyObject *v = PyBytes_FromStringAndSize((const char *)b->tasks[i].got, 16);
        if (!v) { Py_DECREF(out); return NULL; }
        PyList_SET_ITEM(out, (Py_ssize_t)i, v);
    }
    return out;
}

/* Common driver. fds/offsets may be NULL (copy, hash). sums may be NULL. */
static PyObject *drive(int op, PyObject *fds, PyObject *offsets, PyObject *dsts, PyObject *srcs,
                       PyObject *sums, int threads) {
    PyObject *fdsq = NULL, *offq = NULL, *dstq = NULL, *srcq = NULL, *sumq = NULL, *res = NULL;
    bufset_t db = {0}, sb = {0};
    batch_t b;
    memset(&b, 0, sizeof b);
    b.op = op;
    PyObject *lead = dsts ? dsts : srcs;
    PyObject *leadq = PySequence_Fast(lead, "buffers must be a sequence");
    if (!leadq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(leadq);
    Py_DECREF(leadq);
#define SEQ(var, obj, msg)                                                               \
    if (obj) {                                                                           \
        var = PySequence_Fast(obj, msg);                                                 \
        if (!var) goto done;                                                             \
        if (PySequence_Fast_GET_SIZE(var) != n) {                                        \
            PyErr_SetString(PyExc_ValueError, "all sequences must have the same length"); \
            goto done;                                                                   \
        }                                                                                \
    }
    SEQ(fdsq, fds, "fds must be a sequence")
    SEQ(offq, offsets, "offsets must be a sequence")
    SEQ(dstq, dsts, "dests must be a sequence")
    SEQ(srcq, srcs, "srcs must be a sequence")
    SEQ(sumq, sums, "sums must be a sequence")
#undef SEQ
    if (dstq && get_bufs(dstq, n, 1, &db, "dests") != 0) goto done;
    if (srcq && get_bufs(srcq, n, 0, &sb, "srcs") != 0) goto done;
    b.tasks = PyMem_Calloc((size_t)(n ? n : 1), sizeof(task_t));
    if (!b.tasks) { PyErr_NoMemory(); goto done; }
    b.ntasks = (size_t)n;
    for (Py_ssize_t i = 0; i < n; i++) {
        task_t *t = &b.tasks[i];
        if (fdsq) {
            t->fd = PyLong_AsLong(PySequence_Fast_GET_ITEM(fdsq, i));
            if (t->fd == -1 && PyErr_Occurred()) goto done;
        }
        if (offq) {
            t->offset = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(offq, i));
            if (t->offset == -1 && PyErr_Occurred()) goto done;
            if (t->offset < 0) { PyErr_SetString(PyExc_ValueError, "offsets must be >= 0"); goto done; }
        }
        if (dstq) { t->dst = db.bufs[i].buf; t->len = (size_t)db.bufs[i].len; }
        if (srcq) {
            t->src = sb.bufs[i].buf;
            if (dstq && (size_t)sb.bufs[i].len != t->len) {
                PyErr_Format(PyExc_ValueError, "srcs[%zd] and dests[%zd] differ in length", i, i);
                goto done;
            }
            t->len = (size_t)sb.bufs[i].len;
        }
        if (sumq) {
            PyObject *s = PySequence_Fast_GET_ITEM(sumq, i);
            if (s != Py_None) {
                if (!PyBytes_Check(s) || PyBytes_GET_SIZE(s) != 16) {
                    PyErr_SetString(PyExc_TypeError, "sums must be 16-byte bytes or None");
                    goto done;
                }
                t->want = (const unsigned char *)PyBytes_AS_STRING(s);
            }
        }
    }
    size_t total = 0;
    atomic_fetch_add(&batches_in_flight, 1);
    if (make_pieces(&b, &total, threads < 1 ? 1 : threads) != 0) {
        atomic_fetch_sub(&batches_in_flight, 1);
        goto done;
    }
    /* sums (bytes objects) stay referenced by sumq while the GIL is released */
    Py_BEGIN_ALLOW_THREADS
    run_batch(&b, threads, total);
    Py_END_ALLOW_THREADS
    atomic_fetch_sub(&batches_in_flight, 1);
    if (op == OP_WRITE) {
        for (size_t i = 0; i < b.ntasks; i++) {
            if (b.tasks[i].status < 0) {
                errno = -b.tasks[i].status;
                PyErr_SetFromErrno(PyExc_OSError);
                goto done;
            }
        }
        res = sums_list(&b);
    } else if (op == OP_HASH) {
        res = sums_list(&b);
    } else {
        res = status_list(&b);
    }
done:
    release_bufs(&db);
    release_bufs(&sb);
    free_pieces(&b);
    PyMem_Free(b.tasks);
    Py_XDECREF(fdsq);
    Py_XDECREF(offq);
    Py_XDECREF(dstq);
    Py_XDECREF(srcq);
    Py_XDECREF(sumq);
    return res;
}

/* ------------------------------- reads where the directory places them */

/* The key of a segment file in the client's fd map (kvfs.dataplane.FdCache.by_id). */
#define FD_ID(seg, stripe) (((seg) << 16) | (stripe))

/* Runs a batch of tasks of one op (none: nothing). -1 with an exception set. */
static int run_tasks(int op, task_t *tasks, size_t nt, int threads) {
    if (!nt) return 0;
    batch_t b;
    memset(&b, 0, sizeof b);
    b.op = op;
    b.tasks = tasks;
    b.ntasks = nt;
    size_t total = 0;
    atomic_fetch_add(&batches_in_flight, 1);
    if (make_pieces(&b, &total, threads < 1 ? 1 : threads) != 0) {
        atomic_fetch_sub(&batches_in_flight, 1);
        free_pieces(&b);
        return -1;
    }
    if (op == OP_READ || total >= (64u << 10)) {
        Py_BEGIN_ALLOW_THREADS
        run_batch(&b, threads, total);
        Py_END_ALLOW_THREADS
    } else {
        run_batch(&b, 1, total);
    }
    atomic_fetch_sub(&batches_in_flight, 1);
    free_pieces(&b);
    return 0;
}

/* The reads of n keys the directory locates (their dests already held as
 * buffers), without a round trip: chunks in the arena are copied, chunks in
 * segment files whose fd is in `fds` (a dict: FD_ID -> fd, or NULL) are
 * read, all verified chunk by chunk; sizes[i] = the size read, -1 not
 * answerable here (the caller takes the lookup path), -2 a chunk failed
 * verification.
 *
 * Why that is safe (kvfs/directory.py): a location leaves the directory
 * before the removal generation moves for its removal, and arena bytes are
 * reused only after such a move; so bytes copied from a slot read after
 * gen_before was read, with the generation unchanged after the copy, are
 * the object's. If it moved, every read of the batch is -1. Segment files
 * are immutable and their ids never reused; each fd is dup'ed while the GIL
 * is held (the map's owner takes an fd out of the map before it closes
 * it), so a read never goes through an fd number reused meanwhile. */
static int dir_reads(Py_buffer *dir, unsigned long long nslots, Py_buffer *ns, PyObject *const *keys,
                     Py_buffer *arena, Py_buffer *dests, Py_ssize_t n, Py_buffer *gen,
                     unsigned long long gen_before, int verify, int threads, PyObject *fds, long long *sizes) {
    size_t cap = (size_t)(n ? n : 1) * DIR_MAX_CHUNKS;
    task_t *ct = PyMem_Calloc(cap, sizeof(task_t)), *rt = PyMem_Calloc(cap, sizeof(task_t));
    Py_ssize_t *cown = PyMem_Calloc(cap, sizeof(Py_ssize_t)), *rown = PyMem_Calloc(cap, sizeof(Py_ssize_t));
    /* the slots are copied out, so the sums the tasks point to stay put */
    unsigned char *slots = PyMem_Malloc((size_t)(n ? n : 1) * DIR_SLOT);
    size_t nc = 0, nr = 0;
    int rc = -1;
    if (!ct || !rt || !cown || !rown || !slots) {
        PyErr_NoMemory();
        goto out;
    }
    for (Py_ssize_t k = 0; k < n; k++) {
        sizes[k] = -1;
        unsigned char *slot = slots + (size_t)k * DIR_SLOT;
        if (kv_dir_find(dir->buf, nslots, ns->buf, (size_t)ns->len, keys[k], slot) != 1) continue;
        uint64_t size;
        int64_t t0;
        uint32_t nch;
        memcpy(&size, slot + SLOT_SIZE, 8);
        memcpy(&t0, slot + SLOT_T0, 8);
        memcpy(&nch, slot + SLOT_NCHUNKS, 4);
        if (nch > DIR_MAX_CHUNKS || size > (uint64_t)dests[k].len) continue;
        if (t0 >= 0 ? (!arena->buf || (uint64_t)t0 > (uint64_t)arena->len ||
                       size > (uint64_t)arena->len - (uint64_t)t0)
                    : !fds)
            continue;
        if (nch == 0) {
            /* more chunks than a slot keeps: from the arena the object is
             * one copy, verified against its whole-object sum; from T1 its
             * places are the daemon's to tell */
            if (t0 < 0 || size == 0) continue;
            task_t *t = &ct[nc];
            cown[nc++] = k;
            t->src = (const char *)arena->buf + t0;
            t->dst = (char *)dests[k].buf;
            t->len = size;
            t->want = verify ? slot + SLOT_SUM : NULL;
            sizes[k] = (long long)size;
            continue;
        }
        uint64_t pos = 0;
        size_t c0 = nc, r0 = nr;
        int ok = 1;
        for (uint32_t i = 0; i < nch && ok; i++) {
            const unsigned char *c = slot + DIR_HEAD + i * DIR_CHUNK;
            uint32_t stripe, len;
            uint64_t seg, off;
            memcpy(&stripe, c + CHUNK_STRIPE, 4);
            memcpy(&len, c + CHUNK_LENGTH, 4);
            memcpy(&seg, c + CHUNK_SEG, 8);
            memcpy(&off, c + CHUNK_OFFSET, 8);
            task_t *t;
            if (t0 >= 0) {
                t = &ct[nc];
                cown[nc++] = k;
                t->src = (const char *)arena->buf + t0 + pos;
            } else {
                PyObject *id = PyLong_FromUnsignedLongLong(FD_ID(seg, (uint64_t)stripe));
                PyObject *fdo = id ? PyDict_GetItemWithError(fds, id) : NULL;
                Py_XDECREF(id);
                long fd = fdo ? PyLong_AsLong(fdo) : -1;
                int d = fd >= 0 ? fcntl((int)fd, F_DUPFD_CLOEXEC, 0) : -1;
                if (PyErr_Occurred()) PyErr_Clear(); /* not this key, then */
                if (d < 0 || off > (uint64_t)INT64_MAX) {
                    if (d >= 0) close(d);
                    ok = 0;
                    break;
                }
                t = &rt[nr];
                rown[nr++] = k;
                t->fd = d;
                t->offset = (int64_t)off;
            }
            t->dst = (char *)dests[k].buf + pos;
            t->len = len;
            t->want = verify ? c + CHUNK_SUM : NULL;
            pos += len;
        }
        if (!ok || pos != size) { /* a file not open here, or a torn slot: the caller's way */
            for (size_t i = r0; i < nr; i++) close(rt[i].fd);
            memset(&ct[c0], 0, (nc - c0) * sizeof(task_t));
            memset(&rt[r0], 0, (nr - r0) * sizeof(task_t));
            nc = c0;
            nr = r0;
            continue;
        }
        sizes[k] = (long long)size;
    }
    if (run_tasks(OP_COPY, ct, nc, threads) != 0 || run_tasks(OP_READ, rt, nr, threads) != 0) goto out;
    for (size_t i = 0; i < nc; i++)
        if (ct[i].status != 0) sizes[cown[i]] = -2;
    for (size_t i = 0; i < nr; i++)
        if (rt[i].status != 0 && sizes[rown[i]] != -2) sizes[rown[i]] = rt[i].status == 2 ? -2 : -1;
    __atomic_thread_fence(__ATOMIC_ACQUIRE); /* the copies' loads before the generation's */
    if (__atomic_load_n((const uint64_t *)gen->buf, __ATOMIC_RELAXED) != gen_before)
        for (Py_ssize_t k = 0; k < n; k++) sizes[k] = -1;
    rc = 0;
out:
    for (size_t i = 0; i < nr; i++) close(rt[i].fd);
    PyMem_Free(ct);
    PyMem_Free(rt);
    PyMem_Free(cown);
    PyMem_Free(rown);
    PyMem_Free(slots);
    return rc;
}

static int arena_read_args(Py_buffer *dir, unsigned long long nslots, Py_buffer *gen, PyObject *fds) {
    if (!kv_dir_check(dir, nslots)) return 0;
    if (fds != Py_None && !PyDict_Check(fds)) {
        PyErr_SetString(PyExc_TypeError, "fds must be a dict or None");
        return 0;
    }
    if (gen->len < 8) {
        PyErr_SetString(PyExc_ValueError, "generation buffer of at least 8 bytes");
        return 0;
    }
    return 1;
}

/* dir_read(directory, nslots, ns, key, arena, dest, generation, gen_before,
 * verify, threads, fds=None) -> size, -1 or -2: the whole of a get_into the
 * directory locates (in the arena, or in a segment file open in fds), in
 * one call (see dir_reads). */
static PyObject *py_dir_read(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer dir, ns, arena, dest, gen;
    unsigned long long nslots, gen_before;
    PyObject *key, *fds = Py_None;
    int verify, threads;
    if (!PyArg_ParseTuple(args, "y*Ky*Oz*w*y*Kpi|O", &dir, &nslots, &ns, &key, &arena, &dest, &gen, &gen_before,
                          &verify, &threads, &fds))
        return NULL;
    PyObject *res = NULL;
    long long size;
    if (arena_read_args(&dir, nslots, &gen, fds) &&
        dir_reads(&dir, nslots, &ns, &key, &arena, &dest, 1, &gen, gen_before, verify, threads,
                  fds == Py_None ? NULL : fds, &size) == 0)
        res = PyLong_FromLongLong(size);
    PyBuffer_Release(&dir);
    PyBuffer_Release(&ns);
    PyBuffer_Release(&arena);
    PyBuffer_Release(&dest);
    PyBuffer_Release(&gen);
    return res;
}

/* dir_read_many(directory, nslots, ns, keys, arena, dests, generation,
 * gen_before, verify, threads, fds=None) -> [size, -1 or -2 per key]:
 * dir_read of a batch, its copies in one pool batch and its reads in
 * another. A dest that is not a writable host
 * buffer raises TypeError (the caller takes the other path for the batch). */
static PyObject *py_dir_read_many(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer dir, ns, arena, gen;
    unsigned long long nslots, gen_before;
    PyObject *keys, *dests, *fds = Py_None;
    int verify, threads;
    if (!PyArg_ParseTuple(args, "y*Ky*Oz*Oy*Kpi|O", &dir, &nslots, &ns, &keys, &arena, &dests, &gen, &gen_before,
                          &verify, &threads, &fds))
        return NULL;
    PyObject *res = NULL, *kq = NULL, *dq = NULL;
    bufset_t db = {0};
    long long *sizes = NULL;
    if (!arena_read_args(&dir, nslots, &gen, fds)) goto done;
    if (!(kq = PySequence_Fast(keys, "keys must be a sequence"))) goto done;
    if (!(dq = PySequence_Fast(dests, "dests must be a sequence"))) goto done;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(kq);
    if (PySequence_Fast_GET_SIZE(dq) != n) {
        PyErr_SetString(PyExc_ValueError, "keys and dests must have the same length");
        goto done;
    }
    if (get_bufs(dq, n, 1, &db, "dests") != 0) goto done;
    if (!(sizes = PyMem_Malloc((size_t)(n ? n : 1) * sizeof(long long)))) {
        PyErr_NoMemory();
        goto done;
    }
    if (dir_reads(&dir, nslots, &ns, PySequence_Fast_ITEMS(kq), &arena, db.bufs, n, &gen, gen_before, verify,
                  threads, fds == Py_None ? NULL : fds, sizes) != 0)
        goto done;
    if (!(res = PyList_New(n))) goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = PyLong_FromLongLong(sizes[i]);
        if (!v) {
            Py_CLEAR(res);
            goto done;
        }
        PyList_SET_ITEM(res, i, v);
    }
done:
    PyMem_Free(sizes);
    release_bufs(&db);
    Py_XDECREF(kq);
    Py_XDECREF(dq);
    PyBuffer_Release(&dir);
    PyBuffer_Release(&ns);
    PyBuffer_Release(&arena);
    PyBuffer_Release(&gen);
    return res;
}

static PyObject *py_read_many(PyObject *self, PyObject *args) {
    PyObject *fds, *offsets, *dests, *sums;
    int threads = 1;
    if (!PyArg_ParseTuple(args, "OOOO|i", &fds, &offsets, &dests, &sums, &threads)) return NULL;
    return drive(OP_READ, fds, offsets, dests, NULL, sums, threads);
}

static PyObject *py_copy_many(PyObject *self, PyObject *args) {
    PyObject *dests, *srcs, *sums;
    int threads = 1;
    if (!PyArg_ParseTuple(args, "OOO|i", &dests, &srcs, &sums, &threads)) return NULL;
    return drive(OP_COPY, NULL, NULL, dests, srcs, sums, threads);
}

static PyObject *py_write_many(PyObject *self, PyObject *args) {
    PyObject *fds, *offsets, *srcs;
    int threads = 1;
    if (!PyArg_ParseTuple(args, "OOO|i", &fds, &offsets, &srcs, &threads)) return NULL;
    return drive(OP_WRITE, fds, offsets, NULL, srcs, NULL, threads);
}

static PyObject *py_hash_many(PyObject *self, PyObject *args) {
    PyObject *bufs;
    int threads = 1;
    if (!PyArg_ParseTuple(args, "O|i", &bufs, &threads)) return NULL;
    return drive(OP_HASH, NULL, NULL, NULL, bufs, NULL, threads);
}

/* hash_chunked(bufs, chunk, threads=1) -> [(whole, [chunk sums])]: one pass
 * per buffer (see hash_impl.h); buffers spread over the threads. With
 * dsts (copy_hash_chunked) each buffer is copied there in the same pass. */
static PyObject *chunked_sums(PyObject *dsts, PyObject *bufs, Py_ssize_t chunk, int threads) {
    PyObject *seq = NULL, *dseq = NULL, *res = NULL;
    bufset_t sb = {0}, db = {0};
    batch_t b;
    memset(&b, 0, sizeof b);
    unsigned char *sums = NULL;
    if (chunk <= 0) { PyErr_SetString(PyExc_ValueError, "chunk must be > 0"); return NULL; }
    seq = PySequence_Fast(bufs, "bufs must be a sequence");
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (get_bufs(seq, n, 0, &sb, "bufs") != 0) goto done;
    if (dsts) {
        dseq = PySequence_Fast(dsts, "dsts must be a sequence");
        if (!dseq) goto done;
        if (PySequence_Fast_GET_SIZE(dseq) != n) {
            PyErr_SetString(PyExc_ValueError, "dsts and srcs differ in length");
            goto done;
        }
        if (get_bufs(dseq, n, 1, &db, "dsts") != 0) goto done;
        for (Py_ssize_t i = 0; i < n; i++)
            if (db.bufs[i].len != sb.bufs[i].len) {
                PyErr_Format(PyExc_ValueError, "dsts[%zd] is not the size of srcs[%zd]", i, i);
                goto done;
            }
    }
    b.op = OP_HASHC;
    b.tasks = PyMem_Calloc((size_t)(n ? n : 1), sizeof(task_t));
    if (!b.tasks) { PyErr_NoMemory(); goto done; }
    b.ntasks = (size_t)n;
    size_t nsums = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        size_t len = (size_t)sb.bufs[i].len;
        nsums += len <= (size_t)chunk ? 1 : (len + (size_t)chunk - 1) / (size_t)chunk;
    }
    sums = PyMem_Calloc(nsums ? nsums : 1, 16);
    if (!sums) { PyErr_NoMemory(); goto done; }
    size_t at = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        task_t *t = &b.tasks[i];
        t->src = sb.bufs[i].buf;
        t->dst = dsts ? db.bufs[i].buf : NULL;
        t->len = (size_t)sb.bufs[i].len;
        t->chunk = (size_t)chunk;
        t->chunk_sums = sums + 16 * at;
        at += t->len <= (size_t)chunk ? 1 : (t->len + (size_t)chunk - 1) / (size_t)chunk;
    }
    size_t total = 0;
    if (make_pieces(&b, &total, threads < 1 ? 1 : threads) != 0) goto done;
    Py_BEGIN_ALLOW_THREADS
    run_batch(&b, threads, total);
    Py_END_ALLOW_THREADS
    res = PyList_New(n);
    if (!res) goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        task_t *t = &b.tasks[i];
        size_t k = t->len <= (size_t)chunk ? 1 : (t->len + (size_t)chunk - 1) / (size_t)chunk;
        PyObject *cl = PyList_New((Py_ssize_t)k);
        PyObject *w = PyBytes_FromStringAndSize((const char *)t->got, 16);
        if (!cl || !w) { Py_XDECREF(cl); Py_XDECREF(w); Py_CLEAR(res); goto done; }
        for (size_t j = 0; j < k; j++) {
            PyObject *c = PyBytes_FromStringAndSize((const char *)t->chunk_sums + 16 * j, 16);
            if (!c) { Py_DECREF(cl); Py_DECREF(w); Py_CLEAR(res); goto done; }
            PyList_SET_ITEM(cl, (Py_ssize_t)j, c);
        }
        PyObject *pair = PyTuple_Pack(2, w, cl);
        Py_DECREF(w);
        Py_DECREF(cl);
        if (!pair) { Py_CLEAR(res); goto done; }
        PyList_SET_ITEM(res, i, pair);
    }
done:
    release_bufs(&sb);
    release_bufs(&db);
    free_pieces(&b);
    PyMem_Free(b.tasks);
    PyMem_Free(sums);
    Py_XDECREF(seq);
    Py_XDECREF(dseq);
    return res;
}

static PyObject *py_hash_chunked(PyObject *self, PyObject *args) {
    PyObject *bufs;
    Py_ssize_t chunk;
    int threads = 1;
    if (!PyArg_ParseTuple(args, "On|i", &bufs, &chunk, &threads)) return NULL;
    return chunked_sums(NULL, bufs, chunk, threads);
}

static PyObject *py_copy_hash_chunked(PyObject *self, PyObject *args) {
    PyObject *dsts, *bufs;
    Py_ssize_t chunk;
    int threads = 1;
    if (!PyArg_ParseTuple(args, "OOn|i", &dsts, &bufs, &chunk, &threads)) return NULL;
    return chunked_sums(dsts, bufs, chunk, threads);
}

/* lanes_hash(buf, ranges) -> [xxh3-128 digest]: the GPU's way of hashing
 * (xxh3_lanes.h: block sums of the whole buffer, then a chain per range and
 * lane) run on the CPU, so its arithmetic is tested where there is no GPU.
 * ranges: (offset, length) with offset a multiple of 1 KiB and length > 240. */
static PyObject *py_lanes_hash(PyObject *self, PyObject *args) {
    Py_buffer buf;
    PyObject *ranges, *seq = NULL, *res = NULL;
    kv_u64 *bs = NULL;
    if (!PyArg_ParseTuple(args, "y*O", &buf, &ranges)) return NULL;
    seq = PySequence_Fast(ranges, "ranges must be a sequence");
    if (!seq) goto done;
    size_t len = (size_t)buf.len, nblocks = len / KV_BLOCK;
    bs = PyMem_Calloc(nblocks ? nblocks : 1, KV_LANES * sizeof(kv_u64));
    if (!bs) { PyErr_NoMemory(); goto done; }
    for (size_t b = 0; b < nblocks; b++)
        for (int k = 0; k < 4; k++) kv_block_pair((const kv_u8 *)buf.buf, b, k, bs + KV_LANES * b);
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    res = PyList_New(n);
    if (!res) goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned long long off, rlen;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "KK", &off, &rlen)) { Py_CLEAR(res); goto done; }
        if (off % KV_BLOCK || rlen <= KV_MIDSIZE_MAX || off + rlen > len) {
            PyErr_SetString(PyExc_ValueError, "a range must start on a 1 KiB boundary, be > 240 bytes and fit");
            Py_CLEAR(res);
            goto done;
        }
        kv_u64 acc[KV_LANES];
        kv_u8 out[16];
        for (int l = 0; l < KV_LANES; l++)
            acc[l] = kv_range_lane(bs + KV_LANES * (off / KV_BLOCK), (const kv_u8 *)buf.buf + off, rlen, l);
        kv_finish128(acc, rlen, out);
        PyObject *d = PyBytes_FromStringAndSize((const char *)out, 16);
        if (!d) { Py_CLEAR(res); goto done; }
        PyList_SET_ITEM(res, i, d);
    }
done:
    PyMem_Free(bs);
    Py_XDECREF(seq);
    PyBuffer_Release(&buf);
    return res;
}

/* ------------------------------------------------------- aligned buffers */
typedef struct {
    PyObject_HEAD
    char *mem;
    Py_ssize_t size;
    Py_ssize_t exports;
} AlignedBuffer;

static void ab_dealloc(AlignedBuffer *self) {
    free(self->mem);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int ab_getbuffer(AlignedBuffer *self, Py_buffer *view, int flags) {
    int rc = PyBuffer_FillInfo(view, (PyObject *)self, self->mem, self->size, 0, flags);
    if (rc == 0) self->exports++;
    return rc;
}

static void ab_releasebuffer(AlignedBuffer *self, Py_buffer *view) {
    (void)view;
    self->exports--;
}

static Py_ssize_t ab_len(AlignedBuffer *self) { return self->size; }

static PyBufferProcs ab_as_buffer = {(getbufferproc)ab_getbuffer, (releasebufferproc)ab_releasebuffer};
static PySequenceMethods ab_as_sequence = {.sq_length = (lenfunc)ab_len};

static PyTypeObject AlignedBufferType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kvfs._native.AlignedBuffer",
    .tp_basicsize = sizeof(AlignedBuffer),
    .tp_dealloc = (destructor)ab_dealloc,
    .tp_as_buffer = &ab_as_buffer,
    .tp_as_sequence = &ab_as_sequence,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A zero-filled, writable buffer whose address is a multiple of the alignment.",
};

static PyObject *py_aligned_buffer(PyObject *self, PyObject *args) {
    Py_ssize_t size, align = 4096;
    if (!PyArg_ParseTuple(args, "n|n", &size, &align)) return NULL;
    if (size < 0) { PyErr_SetString(PyExc_ValueError, "size must be >= 0"); return NULL; }
    if (align < (Py_ssize_t)sizeof(void *) || (align & (align - 1)) != 0) {
        PyErr_SetString(PyExc_ValueError, "alignment must be a power of two >= 8");
        return NULL;
    }
    AlignedBuffer *ab = PyObject_New(AlignedBuffer, &AlignedBufferType);
    if (!ab) return NULL;
    ab->mem = NULL;
    ab->size = size;
    ab->exports = 0;
    if (posix_memalign((void **)&ab->mem, (size_t)align, (size_t)(size ? size : 1)) != 0) {
        ab->mem = NULL;
        Py_DECREF(ab);
        return PyErr_NoMemory();
    }
    memset(ab->mem, 0, (size_t)size);
    return (PyObject *)ab;
}

PyObject *kv_dir_probe(PyObject *self, PyObject *args); /* directory.c */
PyObject *kv_dir_contains(PyObject *self, PyObject *args);
PyObject *kv_dir_put(PyObject *self, PyObject *args);
PyObject *kv_dir_del(PyObject *self, PyObject *args);
PyObject *kv_dir_put_entry(PyObject *self, PyObject *args);
PyObject *kv_dir_put_entries(PyObject *self, PyObject *args);
PyObject *kv_pack_entry(PyObject *self, PyObject *args);
PyObject *kv_record_head(PyObject *self, PyObject *args);
PyObject *kv_index_rows(PyObject *self, PyObject *args);
PyObject *kv_recv_spin(PyObject *self, PyObject *args); /* socket_wait.c */
PyObject *kv_send_held(PyObject *self, PyObject *args);
PyObject *kv_t0_publish(PyObject *self, PyObject *args); /* mirror.c */
PyObject *kv_t0_written_back(PyObject *self, PyObject *args);
PyObject *kv_release_chunks(PyObject *self, PyObject *args);
PyObject *kv_t0_evict_round(PyObject *self, PyObject *args);
PyObject *kv_t0_items(PyObject *self, PyObject *args); /* put_items.c */
PyObject *kv_t0_write_records(PyObject *self, PyObject *args); /* write_back.c */
PyObject *kv_place_items(PyObject *self, PyObject *args);      /* placement.c */
PyObject *kv_place_chunk(PyObject *self, PyObject *args);      /* placement.c */
extern PyTypeObject MemEntryType;
extern PyTypeObject T0ListType;
extern PyTypeObject ArenaAllocatorType; /* arena_alloc.c */
extern PyTypeObject ObjPlanType, ChunkPlanType;  /* plans.c */

static PyMethodDef methods[] = {
    {"dir_probe", kv_dir_probe, METH_VARARGS,
     "dir_probe(directory, nslots, ns, keys, prefix=False) -> bytes: per key 0 absent, 1 present, "
     "2 not a plain ASCII key (left to Python), 3 unknown (its slot kept changing); with prefix, "
     "stops after the first key that is not 1 (see kvfs/directory.py)"},
    {"dir_contains", kv_dir_contains, METH_VARARGS,
     "dir_contains(directory, nslots, ns, keys) -> ([bool], seen): dir_probe as a list of bools (True: "
     "present), and a bitmask of the other states met (1 << state)"},
    {"dir_put", kv_dir_put, METH_VARARGS,
     "dir_put(directory, nslots, hash, size, seq, checksum, t0, flags, extents) -> 1 took a free slot, "
     "0 updated its slot, -1 its buckets are full (the daemon's writer side; kvfs/directory.py)"},
    {"dir_put_entry", kv_dir_put_entry, METH_VARARGS,
     "dir_put_entry(directory, nslots, object key, mirror entry) -> dir_put of the entry's size, seq, checksum, t0, "
     "flags (in T1 unless dirty) and extents under the key hash of the object key"},
    {"dir_put_entries", kv_dir_put_entries, METH_VARARGS,
     "dir_put_entries(directory, nslots, object keys, entries, displace=False, current=None, yield_gil=True) -> "
     "(slots taken, slots taken from other keys, entries left out): dir_put_entry of each (with current, a dict, "
     "only of those that are current[key]; a batch of 8 or more placed without the GIL unless yield_gil is false)"},
    {"pack_entry", kv_pack_entry, METH_VARARGS,
     "pack_entry(size, checksum, seq, created, atime, meta, rows) -> the index entry: msgpack of the list of them"},
    {"record_head", kv_record_head, METH_VARARGS,
     "record_head(names, ns_len, chunk_idx, chunk_cnt, length, obj_size, chunk_off, seq, checksum, pad) -> "
     "a record's header, its names and pad zero bytes"},
    {"t0_publish", kv_t0_publish, METH_VARARGS,
     "t0_publish(ns, ops, lru, dirty, now) -> (object keys, entries, journal rows, new bytes, [ops already "
     "stored]): publish_t0's loop, a dirty MemEntry per new T0 item (native/mirror.c)"},
    {"t0_written_back", kv_t0_written_back, METH_VARARGS,
     "t0_written_back(ns, done, lru, t0_lru, t0_dirty) -> (object keys, entries, journal rows, bytes, "
     "{seg: [live bytes, records]}, [(op, entry) gone]): the write-back's mirror loop (native/mirror.c)"},
    {"t0_items", kv_t0_items, METH_VARARGS,
     "t0_items(items, nsp, lru, stripe_unit, span0, normalize_key, encode_meta, error) -> (fresh, sizes, need): "
     "a put_t0 batch's items checked in one pass (native/put_items.c)"},
    {"t0_write_records", kv_t0_write_records, METH_VARARGS,
     "t0_write_records(jobs, arena, fds) -> ([failed tags], [bytes per pwritev]): the write-back's records, "
     "headers built, neighbours coalesced, written with the GIL released (native/write_back.c)"},
    {"index_rows", kv_index_rows, METH_VARARGS,
     "index_rows(ops, live, now) -> ([(object key, entry)], [(segobj key, object key)], [owner]): the index rows "
     "of a batch's live items, as encode_entry writes them (native/records.c)"},
    {"t0_evict_round", kv_t0_evict_round, METH_VARARGS,
     "t0_evict_round(lru, leased, need) -> (keys, entries, arena offsets, bytes): one eviction round "
     "of T0 (native/mirror.c)"},
    {"place_items", kv_place_items, METH_VARARGS,
     "place_items(items, at, nl, stripe_unit, segment_size, nstripes, state, open_seg, segs, touched, segment_for, "
     "new_hasher, out, carve=None, res=None, error=ValueError) -> None: the placement layer's loop, a plan per item "
     "appended to out (native/placement.c; kvfs._native_py.place_items is the definition)"},
    {"place_chunk", kv_place_chunk, METH_VARARGS,
     "place_chunk(seg, stripe, nl, kl, i, length, stripe_unit) -> ChunkPlan: chunk i reserved at the end of seg "
     "(kvfs._native_py.place_chunk)"},
    {"release_chunks", kv_release_chunks, METH_VARARGS,
     "release_chunks(ops, segs) -> ([segments touched], [arena extents never published]): a plan's chunk "
     "reservations released (native/mirror.c)"},
    {"dir_del", kv_dir_del, METH_VARARGS,
     "dir_del(directory, nslots, hash) -> byte offset of the slot it freed, -1 if in none"},
    {"dir_read", py_dir_read, METH_VARARGS,
     "dir_read(directory, nslots, ns, key, arena, dest, generation, gen_before, verify, threads, fds=None) -> "
     "size read into dest from the arena or the segment files open in fds ({(seg << 16) | stripe: fd}), "
     "-1 not answerable that way (or the generation moved), -2 a chunk failed verification "
     "(see kvfs/directory.py)"},
    {"dir_read_many", py_dir_read_many, METH_VARARGS,
     "dir_read_many(directory, nslots, ns, keys, arena, dests, generation, gen_before, verify, threads, "
     "fds=None) -> [dir_read's answer per key], the copies in one batch and the reads in another"},
    {"read_many", py_read_many, METH_VARARGS,
     "read_many(fds, offsets, dests, sums, threads=1) -> [status]: pread each dest fully; verify "
     "xxh3-128 where a sum is given. status 0 ok, 1 short file, 2 mismatch, -errno."},
    {"copy_many", py_copy_many, METH_VARARGS,
     "copy_many(dests, srcs, sums, threads=1) -> [status]: memcpy each src into its dest, then "
     "verify the dest where a sum is given. status 0 ok, 2 mismatch."},
    {"write_many", py_write_many, METH_VARARGS,
     "write_many(fds, offsets, srcs, threads=1) -> [sum]: pwrite each src fully; return each "
     "one's xxh3-128 digest. Raises OSError on the first failure."},
    {"hash_many", py_hash_many, METH_VARARGS, "hash_many(bufs, threads=1) -> [xxh3-128 digest]"},
    {"hash_chunked", py_hash_chunked, METH_VARARGS,
     "hash_chunked(bufs, chunk, threads=1) -> [(whole digest, [chunk digests])] in one pass per buffer"},
    {"copy_hash_chunked", py_copy_hash_chunked, METH_VARARGS,
     "copy_hash_chunked(dsts, srcs, chunk, threads=1) -> hash_chunked(srcs, ...), each src copied to its dst "
     "in the same pass"},
    {"lanes_hash", py_lanes_hash, METH_VARARGS,
     "lanes_hash(buf, ranges) -> [xxh3-128 digest of buf[off:off+len]], computed the way the GPU does"},
    {"recv_spin", kv_recv_spin, METH_VARARGS,
     "recv_spin(sock, buf, spin_ns) -> bytes received into buf (0: closed): polls the socket for up to "
     "spin_ns, then blocks; the GIL is released throughout (native/socket_wait.c)"},
    {"send_held", kv_send_held, METH_VARARGS,
     "send_held(fd, data) -> bytes sent, 0 if the buffer is full: a non-blocking send(2) without giving up the GIL"},
    {"aligned_buffer", py_aligned_buffer, METH_VARARGS,
     "aligned_buffer(size, alignment=4096) -> writable zeroed buffer at an aligned address"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "kvfs._native",
                                    "kvfs data-plane hot loops (see native/kvfs_native.c)", -1, methods};

PyMODINIT_FUNC PyInit__native(void) {
    if (PyType_Ready(&AlignedBufferType) < 0 || PyType_Ready(&MemEntryType) < 0 || PyType_Ready(&T0ListType) < 0 ||
        PyType_Ready(&ArenaAllocatorType) < 0 || PyType_Ready(&ObjPlanType) < 0 || PyType_Ready(&ChunkPlanType) < 0)
        return NULL;
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    if (kv_avx2_built() && __builtin_cpu_supports("avx2")) {
        hash16 = kv_hash16_avx2;
        copy_verify = kv_copy_verify_avx2;
        copy_plain = kv_copy_plain_avx2;
        read_verify = kv_read_verify_avx2;
        hash_chunked = kv_hash_chunked_avx2;
        hreset = kv_hreset_avx2;
        hupdate = kv_hupdate_avx2;
        hdigest = kv_hdigest_avx2;
        simd = "avx2";
    }
#endif
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    online_cpus = ncpu > 1 ? (int)(ncpu > MAX_THREADS ? MAX_THREADS : ncpu) : 1;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    if (PyModule_AddObjectRef(m, "MemEntry", (PyObject *)&MemEntryType) < 0 ||
        PyModule_AddObjectRef(m, "T0List", (PyObject *)&T0ListType) < 0 ||
        PyModule_AddObjectRef(m, "ArenaAllocator", (PyObject *)&ArenaAllocatorType) < 0 ||
        PyModule_AddObjectRef(m, "ObjPlan", (PyObject *)&ObjPlanType) < 0 ||
        PyModule_AddObjectRef(m, "ChunkPlan", (PyObject *)&ChunkPlanType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    static kv_c_api api;
    api = (kv_c_api){KV_C_API_VERSION, hash16, read_verify, kv_hstate_size_generic, hreset, hupdate, hdigest};
    PyObject *cap = PyCapsule_New(&api, KV_C_API_CAPSULE, NULL);
    int bad = !cap || PyModule_AddObjectRef(m, "_C_API", cap) < 0;
    Py_XDECREF(cap);
    if (bad) {
        Py_DECREF(m);
        return NULL;
    }
    PyModule_AddIntConstant(m, "MAX_THREADS", MAX_THREADS);
    PyModule_AddStringConstant(m, "SIMD", simd);
    return m;
}
