/*
 * The write-back's record writes (kvfsd.tiering.write_back_many): each T0
 * item's record header built here, the records sorted by segment and
 * offset, those reserved back to back coalesced into one pwritev each, and
 * every pwritev made with the GIL released. In Python this was a header
 * call, a sort key and a few list operations per record, under the GIL
 * that the event loop needs for the next put.
 *
 * Runs are bounded as in Python (kvfs/_native_py.py): under IOV_MAX iovecs and
 * RUN_BYTES bytes, because a buffered write holds the file's inode lock for
 * its whole length. The padding between two neighbouring records is their
 * own reservations' and is written as zeros.
 *
 * The Python twin (kvfs/_native_py.py: t0_write_records) is the
 * definition; the tests compare the files both write.
 */
#include "plan_fields.h"
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>

#define RUN_IOVS 1000 /* as _native_py.RUN_IOVS, RUN_BYTES */
#define RUN_BYTES (1 << 20)
#define ZEROS 8192 /* 2 pages: padding is under PAGE + RECORD_ALIGN */

typedef struct {
    long long seg, start, hdr_off, end;
    int fd;
    unsigned char *head; /* header, names, pad: PyMem_Raw */
    Py_ssize_t headlen;
    const char *src; /* the payload in the arena; NULL: the client wrote it */
    Py_ssize_t length;
    long tag;
} rec_t;

static const unsigned char zeros[ZEROS];

static int by_place(const void *a, const void *b) {
    const rec_t *x = a, *y = b;
    if (x->seg != y->seg) return x->seg < y->seg ? -1 : 1;
    return x->hdr_off < y->hdr_off ? -1 : x->hdr_off > y->hdr_off;
}

/* the MemEntry fields read here (the plan's come from plan_fields.h) */
static PyObject *A_DELETED, *A_T0;

static int names(void) {
    if (A_T0) return 1;
    return INTERN(A_DELETED, "deleted") && INTERN(A_T0, "t0");
}

static int get_bool(PyObject *o, PyObject *name, int *out) {
    PyObject *v = PyObject_GetAttr(o, name);
    if (!v) return 0;
    *out = PyObject_IsTrue(v);
    Py_DECREF(v);
    return *out >= 0;
}

typedef struct {
    rec_t *v;
    Py_ssize_t n, cap;
} recs_t;

static void recs_free(recs_t *r) {
    for (Py_ssize_t i = 0; i < r->n; i++) PyMem_RawFree(r->v[i].head);
    PyMem_RawFree(r->v);
}

static rec_t *recs_add(recs_t *r) {
    if (r->n == r->cap) {
        Py_ssize_t cap = r->cap ? 2 * r->cap : 256;
        rec_t *v = PyMem_RawRealloc(r->v, (size_t)cap * sizeof(rec_t));
        if (!v) {
            PyErr_NoMemory();
            return NULL;
        }
        r->v = v;
        r->cap = cap;
    }
    rec_t *x = &r->v[r->n++];
    memset(x, 0, sizeof *x);
    return x;
}

/* The records of one plan's items (as tiering._record_writes). */
static int plan_records(recs_t *r, PyObject *nsb, PyObject *ops, long tag, const char *arena, Py_ssize_t arena_len,
                        PyObject *fds) {
    Py_ssize_t nl = PyBytes_GET_SIZE(nsb);
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(ops); i++) {
        PyObject *op = PyList_GET_ITEM(ops, i);
        if (op == Py_None) continue;
        PyObject *m = OBJ_GET(op, mem);
        if (!m) return 0;
        long long t0 = -1;
        int skip = 0, via_t0 = 0, deleted = 0;
        if (m != Py_None) {
            skip = !(get_bool(m, A_DELETED, &deleted) && attr_ll(m, A_T0, &t0));
            if (skip) {
                Py_DECREF(m);
                return 0;
            }
            skip = deleted;
        } else {
            if ((via_t0 = OBJ_TRUTH(op, via_t0)) < 0) {
                Py_DECREF(m);
                return 0;
            }
            skip = via_t0; /* not published in T0 (the key was there): nothing to write */
        }
        int from_arena = m != Py_None;
        Py_DECREF(m);
        if (skip) continue;
        long long size, seq;
        PyObject *key = NULL, *kb = NULL, *chunks = NULL;
        int good = OBJ_LL(op, size, &size) && OBJ_LL(op, seq, &seq) && (key = OBJ_GET(op, key)) &&
                   (kb = PyUnicode_AsUTF8String(key)) && (chunks = OBJ_GET(op, chunks));
        if (good && !PyList_Check(chunks)) {
            PyErr_SetString(PyExc_TypeError, "a plan's chunks are a list");
            good = 0;
        }
        Py_ssize_t kl = good ? PyBytes_GET_SIZE(kb) : 0;
        if (good && (nl > 0xffff || kl > 0xffff)) {
            PyErr_SetString(PyExc_ValueError, "names too long for a record header");
            good = 0;
        }
        Py_ssize_t nchunks = good ? PyList_GET_SIZE(chunks) : 0;
        for (Py_ssize_t j = 0; good && j < nchunks; j++) {
            PyObject *ch = PyList_GET_ITEM(chunks, j);
            long long idx, length, coff, poff, hdr, seg, start, end;
            PyObject *sum = NULL;
            good = CHUNK_LL(ch, idx, &idx) && CHUNK_LL(ch, length, &length) && CHUNK_LL(ch, chunk_off, &coff) &&
                   CHUNK_LL(ch, payload_off, &poff) && CHUNK_LL(ch, hdr_off, &hdr) && CHUNK_LL(ch, seg, &seg) &&
                   CHUNK_LL(ch, start, &start) && CHUNK_LL(ch, end, &end) && (sum = CHUNK_GET(ch, checksum));
            if (!good) break;
            Py_ssize_t headlen = (Py_ssize_t)(poff - hdr);
            Py_ssize_t pad = headlen - RECORD_HEADER - nl - kl;
            if (!PyBytes_Check(sum) || PyBytes_GET_SIZE(sum) != 16 || pad < 0 || pad > 65536 || length < 0) {
                PyErr_SetString(PyExc_ValueError, "bad record fields");
                Py_DECREF(sum);
                good = 0;
                break;
            }
            if (from_arena && (t0 < 0 || coff < 0 || t0 + coff + length > arena_len)) {
                PyErr_SetString(PyExc_ValueError, "a T0 copy outside the arena");
                Py_DECREF(sum);
                good = 0;
                break;
            }
            PyObject *segk = PyLong_FromLongLong(seg);
            PyObject *fdo = segk ? PyDict_GetItemWithError(fds, segk) : NULL;
            Py_XDECREF(segk);
            long fd = fdo ? PyLong_AsLong(fdo) : -1; /* none: its run fails (EBADF), as a closed file's would */
            if (PyErr_Occurred()) {
                Py_DECREF(sum);
                good = 0;
                break;
            }
            rec_t *x = recs_add(r);
            unsigned char *p = x ? PyMem_RawMalloc((size_t)headlen) : NULL;
            if (!p) {
                if (x) PyErr_NoMemory();
                Py_DECREF(sum);
                good = 0;
                break;
            }
            x->seg = seg;
            x->start = start;
            x->hdr_off = hdr;
            x->end = end;
            x->fd = (int)fd;
            x->head = p;
            x->headlen = headlen;
            x->src = from_arena ? arena + t0 + coff : NULL;
            x->length = (Py_ssize_t)length;
            x->tag = tag;
            kv_fill_record_head(p, PyBytes_AS_STRING(nsb), nl, PyBytes_AS_STRING(kb), kl, (uint32_t)idx,
                                (uint32_t)nchunks, (uint64_t)length, (uint64_t)size, (uint64_t)coff, (uint64_t)seq,
                                PyBytes_AS_STRING(sum));
            Py_DECREF(sum);
            memset(p + RECORD_HEADER + nl + kl, 0, (size_t)pad);
        }
        Py_XDECREF(key);
        Py_XDECREF(kb);
        Py_XDECREF(chunks);
        if (!good) return 0;
    }
    return 1;
}

/* t0_write_records(jobs, arena, fds) -> ([tags of failed writes], [bytes of each pwritev])
   jobs: [(namespace utf-8, plan items, tag)]; fds: {segment: fd} (a
   segment missing there fails its writes). */
PyObject *kv_t0_write_records(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *jobs, *fds;
    Py_buffer arena;
    if (!PyArg_ParseTuple(args, "O!y*O!", &PyList_Type, &jobs, &arena, &PyDict_Type, &fds)) return NULL;
    if (!names()) {
        PyBuffer_Release(&arena);
        return NULL;
    }
    recs_t r = {NULL, 0, 0};
    PyObject *result = NULL;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(jobs); i++) {
        PyObject *job = PyList_GET_ITEM(jobs, i);
        PyObject *nsb, *ops;
        long tag;
        if (!PyArg_ParseTuple(job, "SO!l", &nsb, &PyList_Type, &ops, &tag) ||
            !plan_records(&r, nsb, ops, tag, arena.buf, arena.len, fds))
            goto out;
    }
    qsort(r.v, (size_t)r.n, sizeof(rec_t), by_place);
    /* runs: [first rec, last rec) with their byte counts and outcomes */
    Py_ssize_t *run_at = PyMem_RawMalloc(((size_t)r.n + 1) * sizeof(Py_ssize_t));
    long long *run_bytes = PyMem_RawMalloc(((size_t)r.n + 1) * sizeof(long long));
    char *run_ok = PyMem_RawMalloc((size_t)r.n + 1);
    struct iovec *iov = PyMem_RawMalloc((RUN_IOVS + 3) * sizeof(struct iovec));
    if (!run_at || !run_bytes || !run_ok || !iov) {
        PyErr_NoMemory();
        goto free_runs;
    }
    Py_ssize_t nruns = 0;
    Py_BEGIN_ALLOW_THREADS
    Py_ssize_t i = 0;
    while (i < r.n) {
        rec_t *first = &r.v[i];
        long long off = first->hdr_off, at = off, end = first->end;
        int cnt = 0;
        Py_ssize_t j = i;
        while (j < r.n) {
            rec_t *x = &r.v[j];
            long long pad = x->hdr_off - at;
            long long n = x->headlen + (x->src ? x->length : 0);
            int bufs = 1 + (x->src && x->length ? 1 : 0);
            if (j > i && (x->seg != first->seg || x->start != end || cnt + bufs + 1 >= RUN_IOVS ||
                          at - off + n > RUN_BYTES || pad < 0 || pad > ZEROS))
                break;
            if (j > i && pad) {
                iov[cnt].iov_base = (void *)zeros;
                iov[cnt++].iov_len = (size_t)pad;
            }
            iov[cnt].iov_base = x->head;
            iov[cnt++].iov_len = (size_t)x->headlen;
            if (x->src && x->length) {
                iov[cnt].iov_base = (void *)x->src;
                iov[cnt++].iov_len = (size_t)x->length;
            }
            at = x->hdr_off + n;
            end = x->end;
            j++;
        }
        ssize_t w = pwritev(first->fd, iov, cnt, (off_t)off);
        run_at[nruns] = i;
        run_bytes[nruns] = at - off;
        run_ok[nruns] = w == at - off;
        nruns++;
        i = j;
    }
    run_at[nruns] = r.n;
    Py_END_ALLOW_THREADS
    PyObject *failed = PyList_New(0), *sizes = PyList_New(nruns);
    int good = failed && sizes;
    for (Py_ssize_t k = 0; good && k < nruns; k++) {
        PyObject *b = PyLong_FromLongLong(run_bytes[k]);
        if (!b) {
            good = 0;
            break;
        }
        PyList_SET_ITEM(sizes, k, b);
        if (run_ok[k]) continue;
        for (Py_ssize_t x = run_at[k]; good && x < run_at[k + 1]; x++) {
            PyObject *t = PyLong_FromLong(r.v[x].tag);
            good = t && PyList_Append(failed, t) == 0;
            Py_XDECREF(t);
        }
    }
    if (good) result = PyTuple_Pack(2, failed, sizes);
    Py_XDECREF(failed);
    Py_XDECREF(sizes);
free_runs:
    PyMem_RawFree(run_at);
    PyMem_RawFree(run_bytes);
    PyMem_RawFree(run_ok);
    PyMem_RawFree(iov);
out:
    recs_free(&r);
    PyBuffer_Release(&arena);
    return result;
}
