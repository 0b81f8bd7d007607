/*
 * New files written through the C mount (see cfuse_py.h, WriteState).
 *
 * A write goes straight to its final place in T1, as the pyfuse3 mount's
 * does (kvfsd.stream_put): chunk i of the file is a reserved extent of a
 * segment, asked of Python (the bridge's "reserve") the first time a write
 * reaches it; the bytes are pwritten there from the request's own buffer,
 * without the GIL, and hashed as they arrive while writes come in order
 * (xxh3-128 of each chunk and of the whole), so the commit reads nothing
 * back. After an out-of-order write or a truncate the hashes are dropped
 * and the commit takes them from the segments (StreamPut._hash_back).
 *
 * A write is answered as soon as it is taken (write-behind, WRITE_BEHIND
 * writes deep, each from its own worker's request buffer: no copy), and
 * its bytes are written after, in the order writes were answered (tickets,
 * cfuse_py.h). A failed write (a full disk, no room to reserve) fails the
 * file: the next write answers its errno, and so does close(2)
 * (kvfsd.fuse_write settles the file before its commit and discards it).
 *
 * Python reads the state (size, written, error) on the loop, under mu
 * only; settle, hashes, truncate and close first wait until no write is
 * in flight (from worker threads, the GIL released).
 */
#define _GNU_SOURCE
#include "cfuse_py.h"

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void *hstate_new(void) {
    size_t n = (cf_kv->hstate_size() + 63) & ~(size_t)63;
    void *st = aligned_alloc(64, n);
    if (st) cf_kv->hreset(st);
    return st;
}

static int WriteState_init(WriteState *self, PyObject *args, PyObject *kw) {
    (void)kw;
    long long su;
    if (!PyArg_ParseTuple(args, "L", &su)) return -1;
    if (su <= 0 || self->whole) {
        PyErr_SetString(PyExc_ValueError, "WriteState(stripe_unit > 0), once");
        return -1;
    }
    pthread_mutex_init(&self->mu, NULL);
    pthread_mutex_init(&self->rmu, NULL);
    pthread_cond_init(&self->turn, NULL);
    self->su = su;
    self->hash_ok = 1;
    self->whole = hstate_new();
    self->chunk = hstate_new();
    if (!self->whole || !self->chunk) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static void close_dups(WriteState *ws) {
    for (int i = 0; i < ws->nfiles; i++) {
        close(ws->files[i].fd);
        if (ws->files[i].direct >= 0) close(ws->files[i].direct);
    }
    ws->nfiles = 0;
    for (int64_t i = 0; i < ws->nres; i++) ws->res[i].file = -1;
}

static void WriteState_dealloc(WriteState *self) {
    if (self->whole) {  /* initialised */
        close_dups(self);
        pthread_mutex_destroy(&self->mu);
        pthread_mutex_destroy(&self->rmu);
        pthread_cond_destroy(&self->turn);
    }
    free(self->res);
    free(self->files);
    free(self->sums);
    free(self->whole);
    free(self->chunk);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Room for chunk i in the reservation table (rmu held): 0 or ENOMEM. */
static int grow(WriteState *ws, int64_t i) {
    if (i < ws->nres) return 0;
    int64_t n = ws->nres ? ws->nres : 16;
    while (n <= i) n *= 2;
    struct cf_wchunk *res = realloc(ws->res, (size_t)n * sizeof *res);
    if (!res) return ENOMEM;
    ws->res = res;
    for (int64_t j = ws->nres; j < n; j++) ws->res[j].file = -1;
    ws->nres = n;
    return 0;
}

/* Chunk i reserved (rmu held, no GIL): asks Python for its place. 0 or an errno. */
static int reserve(MountObject *m, WriteState *ws, uint64_t pyfh, int64_t i) {
    int err = grow(ws, i);
    if (err) return err;
    if (ws->res[i].file >= 0) return 0;
    int fd = -1;
    long long off = 0;
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *v;
    err = cf_bridge(m, "reserve", Py_BuildValue("(KL)", (unsigned long long)pyfh, (long long)i), &v);
    if (!err && !PyArg_ParseTuple(v, "iL", &fd, &off)) {
        PyErr_Print();
        err = EIO;
    }
    Py_XDECREF(v);
    PyGILState_Release(g);
    if (err) return err;
    if (fd < 0) return EIO;
    int f = 0;
    while (f < ws->nfiles && ws->files[f].orig != fd) f++;
    if (f == ws->nfiles) {  /* a segment new to this file */
        struct cf_wfile *files = realloc(ws->files, (size_t)(f + 1) * sizeof *files);
        if (!files) return ENOMEM;
        ws->files = files;
        int d = fcntl(fd, F_DUPFD_CLOEXEC, 0);
        if (d < 0) return errno;
        char path[64];
        snprintf(path, sizeof path, "/proc/self/fd/%d", d);
        ws->files[f] = (struct cf_wfile){fd, d, open(path, O_WRONLY | O_DIRECT | O_CLOEXEC)};
        ws->nfiles++;
    }
    ws->res[i] = (struct cf_wchunk){f, off};
    return 0;
}

static int pwrite_all(int fd, const char *p, size_t n, int64_t off) {
    while (n) {
        ssize_t w = pwrite(fd, p, n, off);
        if (w < 0) {
            if (errno == EINTR) continue;
            return errno;
        }
        if (w == 0) return ENOSPC;
        p += w;
        n -= (size_t)w;
        off += w;
    }
    return 0;
}

/* Feed bytes [off, off+n) to the running hashes (its turn). */
static void hash_in(WriteState *ws, const char *p, size_t n, int64_t off) {
    if (!ws->hash_ok) return;
    if (off != ws->hashed) {
        ws->hash_ok = 0;
        return;
    }
    cf_kv->hupdate(ws->whole, p, n);
    while (n) {
        size_t room = (size_t)(ws->su - ws->hashed % ws->su);
        size_t k = n < room ? n : room;
        cf_kv->hupdate(ws->chunk, p, k);
        ws->hashed += (int64_t)k;
        p += k;
        n -= k;
        if (ws->hashed % ws->su == 0) {
            unsigned char *s = realloc(ws->sums, (size_t)(ws->nsums + 1) * 16);
            if (!s) {
                ws->hash_ok = 0;
                return;
            }
            ws->sums = s;
            cf_kv->hdigest(ws->chunk, ws->sums + 16 * ws->nsums++);
            cf_kv->hreset(ws->chunk);
        }
    }
}

#define WRITE_BEHIND 2  /* writes of one file answered and not yet written, at most */

void cf_write(fuse_req_t req, MountObject *m, WriteState *ws, uint64_t pyfh, const char *buf, size_t size,
              off_t off) {
    if (off < 0) {
        fuse_reply_err(req, EINVAL);
        return;
    }
    pthread_mutex_lock(&ws->mu);
    while (!ws->error && !ws->sealed && ws->next - ws->serving >= WRITE_BEHIND)
        pthread_cond_wait(&ws->turn, &ws->mu);
    int err = ws->sealed ? EROFS : ws->error;  /* stored, or being stored: immutable */
    int64_t ticket = 0;
    if (!err) {
        if (off + (int64_t)size > ws->size) ws->size = off + (int64_t)size;
        ws->written = 1;
        ticket = ws->next++;
    }
    pthread_mutex_unlock(&ws->mu);
    if (err) {  /* an earlier write failed: so does every later one */
        fuse_reply_err(req, err);
        return;
    }
    /* Answered before the bytes are written: the writer's next read and
     * copy overlap this pwrite. The request's buffer is this worker's
     * until the handler returns. */
    fuse_reply_write(req, size);
    pthread_mutex_lock(&ws->mu);
    err = ws->error;  /* an earlier write failed: the file is lost, this one is not written */
    pthread_mutex_unlock(&ws->mu);
    /* The bytes: several writes of the file may be at this at once (each
     * to its own place, from its own buffer), so the disk sees them
     * together. */
    for (size_t done = 0; !err && done < size;) {
        int64_t pos = off + (int64_t)done;
        int64_t i = pos / ws->su, within = pos % ws->su;
        size_t n = size - done < (size_t)(ws->su - within) ? size - done : (size_t)(ws->su - within);
        pthread_mutex_lock(&ws->rmu);
        err = reserve(m, ws, pyfh, i);
        struct cf_wfile file = err ? (struct cf_wfile){-1, -1, -1} : ws->files[ws->res[i].file];
        int fd = file.fd, dfd = file.direct;
        int64_t at = err ? 0 : ws->res[i].off + within;
        pthread_mutex_unlock(&ws->rmu);
        if (!err) {
            /* page-aligned (the worker's buffer puts a write's data on a
             * page boundary, cfuse.c): straight from the request to the
             * disk, no copy into the page cache; else, or if the disk
             * refuses it, through the page cache */
            int direct = dfd >= 0 && !(((uintptr_t)(buf + done) | (uintptr_t)at | n) & 4095);
            err = direct ? pwrite_all(dfd, buf + done, n, at) : EINVAL;
            if (err == EINVAL) err = pwrite_all(fd, buf + done, n, at);
            if (!err && direct) atomic_fetch_add_explicit(&cf_stats.writes_direct, 1, memory_order_relaxed);
        }
        done += n;
    }
    /* The hashes: in the order the writes were answered, one at a time. */
    pthread_mutex_lock(&ws->mu);
    while (ws->serving != ticket) pthread_cond_wait(&ws->turn, &ws->mu);
    pthread_mutex_unlock(&ws->mu);
    if (!err) {
        hash_in(ws, buf, size, off);
        atomic_fetch_add_explicit(&cf_stats.writes, 1, memory_order_relaxed);
        atomic_fetch_add_explicit(&cf_stats.write_bytes, (long long)size, memory_order_relaxed);
    }
    pthread_mutex_lock(&ws->mu);
    if (err && !ws->error) ws->error = err;
    ws->serving++;
    pthread_cond_broadcast(&ws->turn);
    pthread_mutex_unlock(&ws->mu);
}

/* -- what Python calls ------------------------------------------------------ */

/* mu held, no write in flight (call without the GIL: it may wait). */
static void quiet(WriteState *ws) {
    pthread_mutex_lock(&ws->mu);
    while (ws->serving != ws->next) pthread_cond_wait(&ws->turn, &ws->mu);
}

static PyObject *WriteState_state(WriteState *self, PyObject *unused) {
    (void)unused;
    pthread_mutex_lock(&self->mu);
    long long size = self->size;
    int written = self->written, error = self->error;
    pthread_mutex_unlock(&self->mu);
    return Py_BuildValue("(Lii)", size, written, error);
}

static PyObject *WriteState_settle(WriteState *self, PyObject *unused) {
    (void)unused;
    Py_BEGIN_ALLOW_THREADS
    quiet(self);
    pthread_mutex_unlock(&self->mu);
    Py_END_ALLOW_THREADS
    return WriteState_state(self, NULL);
}

static PyObject *WriteState_seal(WriteState *self, PyObject *unused) {
    (void)unused;
    Py_BEGIN_ALLOW_THREADS
    quiet(self);
    self->sealed = 1;
    pthread_mutex_unlock(&self->mu);
    Py_END_ALLOW_THREADS
    return WriteState_state(self, NULL);
}

static PyObject *WriteState_truncate(WriteState *self, PyObject *args) {
    long long size;
    if (!PyArg_ParseTuple(args, "L", &size)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    quiet(self);
    if (size != self->hashed) self->hash_ok = 0;
    self->size = size;
    pthread_mutex_unlock(&self->mu);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *WriteState_hashes(WriteState *self, PyObject *unused) {
    (void)unused;
    int64_t n = 0;
    unsigned char *sums = NULL, whole[16];
    int ok;
    Py_BEGIN_ALLOW_THREADS
    quiet(self);
    ok = self->hash_ok && self->hashed == self->size;
    if (ok) {
        /* the partial last chunk (or the empty value's) is digested from a copy of its state */
        int tail = self->hashed % self->su != 0 || self->hashed == 0;
        n = self->nsums + tail;
        size_t hs = (cf_kv->hstate_size() + 63) & ~(size_t)63;
        void *tmp = aligned_alloc(64, hs);
        sums = malloc((size_t)n * 16);
        if (tmp && sums) {
            memcpy(sums, self->sums, (size_t)self->nsums * 16);
            if (tail) {
                memcpy(tmp, self->chunk, cf_kv->hstate_size());
                cf_kv->hdigest(tmp, sums + 16 * self->nsums);
            }
            memcpy(tmp, self->whole, cf_kv->hstate_size());
            cf_kv->hdigest(tmp, whole);
        } else {
            ok = 0;
        }
        free(tmp);
    }
    pthread_mutex_unlock(&self->mu);
    Py_END_ALLOW_THREADS
    PyObject *out = NULL, *list = ok ? PyList_New((Py_ssize_t)n) : NULL;
    for (int64_t i = 0; list && i < n; i++) {
        PyObject *b = PyBytes_FromStringAndSize((const char *)sums + 16 * i, 16);
        if (!b) {
            Py_CLEAR(list);
            break;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)i, b);
    }
    free(sums);
    if (list) out = Py_BuildValue("(Oy#)", list, (const char *)whole, (Py_ssize_t)16);
    Py_XDECREF(list);
    if (out || PyErr_Occurred()) return out;
    Py_RETURN_NONE;  /* not in order up to the size, or no memory: the commit reads them back */
}

static PyObject *WriteState_close(WriteState *self, PyObject *unused) {
    (void)unused;
    Py_BEGIN_ALLOW_THREADS
    quiet(self);
    close_dups(self);
    pthread_mutex_unlock(&self->mu);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef WriteState_methods[] = {
    {"state", (PyCFunction)WriteState_state, METH_NOARGS,
     "state() -> (size, written, errno): the file as the writes answered so far leave it (errno 0: none failed)"},
    {"settle", (PyCFunction)WriteState_settle, METH_NOARGS,
     "settle() -> state(), once every write answered so far is in the segments (blocking)"},
    {"seal", (PyCFunction)WriteState_seal, METH_NOARGS,
     "seal() -> state(), final: settle(), and every later write is refused (EROFS); the file is being stored"},
    {"truncate", (PyCFunction)WriteState_truncate, METH_VARARGS,
     "truncate(size): the file's size is now size (the caller zeroed what it cut); the running hashes are "
     "dropped unless they end there (blocking)"},
    {"hashes", (PyCFunction)WriteState_hashes, METH_NOARGS,
     "hashes() -> ([chunk digests], whole digest), or None if the writes did not come in order up to the size "
     "(blocking)"},
    {"close", (PyCFunction)WriteState_close, METH_NOARGS,
     "close(): close the segment fds it holds (the file is stored or discarded; blocking)"},
    {NULL, NULL, 0, NULL},
};

PyTypeObject cf_WriteStateType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "kvfsd._cfuse.WriteState",
    .tp_basicsize = sizeof(WriteState),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "WriteState(stripe_unit): a new file written through the C mount (native/cfuse_write.c)",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)WriteState_init,
    .tp_dealloc = (destructor)WriteState_dealloc,
    .tp_methods = WriteState_methods,
};
