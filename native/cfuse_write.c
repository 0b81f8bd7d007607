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
 * A failed write (a full disk, no room to reserve) is answered with its
 * errno, and so is every later write: such a file is never stored
 * (kvfsd.fuse_write discards it at close). Writes are answered once their
 * bytes are in the segment's page cache, not queued: the reply waits for
 * one copy, and a failure reaches the very write that met it.
 *
 * Python reads the state (size, written, error) on the loop under mu,
 * which is never held across I/O; hashes and truncate take wmu, from
 * worker threads (the kernel already serialises a file's writes and
 * truncates).
 */
#define _GNU_SOURCE
#include "cfuse_py.h"

#include <errno.h>
#include <fcntl.h>
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
    pthread_mutex_init(&self->wmu, NULL);
    pthread_mutex_init(&self->mu, NULL);
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
    for (int i = 0; i < ws->ndups; i++) close(ws->dups[i]);
    ws->ndups = 0;
    for (int64_t i = 0; i < ws->nres; i++) ws->rfd[i] = -1;
}

static void WriteState_dealloc(WriteState *self) {
    if (self->whole) {  /* initialised */
        close_dups(self);
        pthread_mutex_destroy(&self->wmu);
        pthread_mutex_destroy(&self->mu);
    }
    free(self->rfd);
    free(self->roff);
    free(self->dups);
    free(self->orig);
    free(self->sums);
    free(self->whole);
    free(self->chunk);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Room for chunk i in the reservation table (wmu held): 0 or ENOMEM. */
static int grow(WriteState *ws, int64_t i) {
    if (i < ws->nres) return 0;
    int64_t n = ws->nres ? ws->nres : 16;
    while (n <= i) n *= 2;
    int *rfd = realloc(ws->rfd, (size_t)n * sizeof *rfd);
    if (rfd) ws->rfd = rfd;
    int64_t *roff = realloc(ws->roff, (size_t)n * sizeof *roff);
    if (roff) ws->roff = roff;
    int *dups = realloc(ws->dups, (size_t)n * sizeof *dups);
    if (dups) ws->dups = dups;
    int *orig = realloc(ws->orig, (size_t)n * sizeof *orig);
    if (orig) ws->orig = orig;
    if (!rfd || !roff || !dups || !orig) return ENOMEM;
    for (int64_t j = ws->nres; j < n; j++) ws->rfd[j] = -1;
    ws->nres = n;
    return 0;
}

/* Chunk i reserved (wmu held, no GIL): asks Python for its place. 0 or an errno. */
static int reserve(MountObject *m, WriteState *ws, uint64_t pyfh, int64_t i) {
    int err = grow(ws, i);
    if (err) return err;
    if (ws->rfd[i] >= 0) return 0;
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
    for (int j = 0; j < ws->ndups; j++)
        if (ws->orig[j] == fd) ws->rfd[i] = ws->dups[j];
    if (ws->rfd[i] < 0) {  /* a dup of our own: the daemon may close its fd, never ours */
        int d = fcntl(fd, F_DUPFD_CLOEXEC, 0);
        if (d < 0) return errno;
        ws->orig[ws->ndups] = fd;
        ws->dups[ws->ndups++] = d;
        ws->rfd[i] = d;
    }
    ws->roff[i] = off;
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

/* Feed bytes [off, off+n) to the running hashes (wmu held). */
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

long long cf_write(MountObject *m, WriteState *ws, uint64_t pyfh, const char *buf, size_t size, off_t off) {
    if (off < 0) return -EINVAL;
    pthread_mutex_lock(&ws->wmu);
    pthread_mutex_lock(&ws->mu);
    int err = ws->error;
    pthread_mutex_unlock(&ws->mu);
    for (size_t done = 0; !err && done < size;) {
        int64_t pos = off + (int64_t)done;
        int64_t i = pos / ws->su, within = pos % ws->su;
        size_t n = size - done < (size_t)(ws->su - within) ? size - done : (size_t)(ws->su - within);
        err = reserve(m, ws, pyfh, i);
        if (!err) err = pwrite_all(ws->rfd[i], buf + done, n, ws->roff[i] + within);
        done += n;
    }
    if (!err) hash_in(ws, buf, size, off);
    pthread_mutex_lock(&ws->mu);
    if (err) {
        ws->error = err;
    } else {
        if (off + (int64_t)size > ws->size) ws->size = off + (int64_t)size;
        ws->written = 1;
    }
    pthread_mutex_unlock(&ws->mu);
    pthread_mutex_unlock(&ws->wmu);
    if (err) return -err;
    atomic_fetch_add_explicit(&cf_stats.writes, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&cf_stats.write_bytes, (long long)size, memory_order_relaxed);
    return (long long)size;
}

/* -- what Python calls ------------------------------------------------------ */

static PyObject *WriteState_state(WriteState *self, PyObject *unused) {
    (void)unused;
    pthread_mutex_lock(&self->mu);
    long long size = self->size;
    int written = self->written, error = self->error;
    pthread_mutex_unlock(&self->mu);
    return Py_BuildValue("(Lii)", size, written, error);
}

static PyObject *WriteState_truncate(WriteState *self, PyObject *args) {
    long long size;
    if (!PyArg_ParseTuple(args, "L", &size)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&self->wmu);
    if (size != self->hashed) self->hash_ok = 0;
    pthread_mutex_lock(&self->mu);
    self->size = size;
    pthread_mutex_unlock(&self->mu);
    pthread_mutex_unlock(&self->wmu);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *WriteState_hashes(WriteState *self, PyObject *unused) {
    (void)unused;
    PyObject *out = NULL;
    /* wmu without the GIL: a writer holds wmu while it asks Python for a reservation */
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&self->wmu);
    Py_END_ALLOW_THREADS
    pthread_mutex_lock(&self->mu);
    int ok = self->hash_ok && self->hashed == self->size;
    pthread_mutex_unlock(&self->mu);
    if (ok) {
        /* digests of a copy: the states stay as they are */
        size_t n = (cf_kv->hstate_size() + 63) & ~(size_t)63;
        void *tmp = aligned_alloc(64, n);
        unsigned char whole[16], tail[16];
        PyObject *sums = PyList_New(0);
        if (tmp && sums) {
            for (int64_t i = 0; i < self->nsums; i++) {
                PyObject *b = PyBytes_FromStringAndSize((const char *)self->sums + 16 * i, 16);
                if (!b || PyList_Append(sums, b) < 0) ok = 0;
                Py_XDECREF(b);
            }
            if (self->hashed % self->su != 0 || self->hashed == 0) {  /* the partial last chunk, or the empty value's */
                memcpy(tmp, self->chunk, cf_kv->hstate_size());
                cf_kv->hdigest(tmp, tail);
                PyObject *b = PyBytes_FromStringAndSize((const char *)tail, 16);
                if (!b || PyList_Append(sums, b) < 0) ok = 0;
                Py_XDECREF(b);
            }
            memcpy(tmp, self->whole, cf_kv->hstate_size());
            cf_kv->hdigest(tmp, whole);
            if (ok) out = Py_BuildValue("(Oy#)", sums, (const char *)whole, (Py_ssize_t)16);
        }
        free(tmp);
        Py_XDECREF(sums);
        if (!out && !PyErr_Occurred()) PyErr_NoMemory();
    }
    pthread_mutex_unlock(&self->wmu);
    if (!ok && !out) {
        if (PyErr_Occurred()) return NULL;
        Py_RETURN_NONE;
    }
    return out;
}

static PyObject *WriteState_close(WriteState *self, PyObject *unused) {
    (void)unused;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&self->wmu);
    Py_END_ALLOW_THREADS
    close_dups(self);
    pthread_mutex_unlock(&self->wmu);
    Py_RETURN_NONE;
}

static PyMethodDef WriteState_methods[] = {
    {"state", (PyCFunction)WriteState_state, METH_NOARGS,
     "state() -> (size, written, errno): the file as its writes left it (errno 0: none failed)"},
    {"truncate", (PyCFunction)WriteState_truncate, METH_VARARGS,
     "truncate(size): the file's size is now size (the caller zeroed what it cut); the running hashes are "
     "dropped unless they end there"},
    {"hashes", (PyCFunction)WriteState_hashes, METH_NOARGS,
     "hashes() -> ([chunk digests], whole digest), or None if the writes did not come in order up to the size"},
    {"close", (PyCFunction)WriteState_close, METH_NOARGS,
     "close(): close the segment fds it holds (the file is stored or discarded)"},
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
