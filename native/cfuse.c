/*
 * kvfsd._cfuse: the C mount (see cfuse.h).
 *
 *   m = _cfuse.Mount(mountpoint, options, dispatch)   mounts (raises if it cannot);
 *                                                     dispatch None: the null fs (cfuse_null.c)
 *   m.start(threads)                                  serves, on that many threads
 *   m.close()                                         stops the threads, unmounts
 *   _cfuse.counters()                                 what the C side served
 *
 * Threads: each worker reads a request from /dev/fuse and handles it to
 * its reply. Object reads (cfuse_read.c) and writes of new files
 * (cfuse_write.c) are served in C without the GIL. Every other operation calls dispatch(op, args) with the
 * GIL held; dispatch (kvfsd.cfuse_bridge) runs the pyfuse3 mount's own
 * handler on the daemon's trio loop and returns (errno, value), never
 * raises. The GIL is never held while waiting for the kernel.
 *
 * Stopping: close() sets stop, then wakes each worker out of its read of
 * /dev/fuse with a signal (CF_WAKE, a no-op handler without SA_RESTART)
 * until every worker has ended; a worker in the middle of a Python call
 * finishes it first, so close() must run while the trio loop still runs
 * (kvfsd.mount_c calls it from a worker thread).
 */
#define _GNU_SOURCE
#include "cfuse_py.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

const kv_c_api *cf_kv;
cf_counters cf_stats;

#define CF_WAKE (SIGRTMIN + 4)
/* libfuse's receive buffer: FUSE_MAX_MAX_PAGES pages and a header page,
 * with room to spare; and a WRITE request's headers (fuse_in_header and
 * fuse_write_in, 40 bytes each since protocol 7.9) */
#define RECV_BUF ((256u << 12) + (8u << 12))
#define WRITE_HEADERS 80
#define MAX_THREADS CF_MAX_THREADS


/* -- the bridge to Python ------------------------------------------------- */

/* With the GIL held: dispatch(op, args) -> (errno, value). Returns the
 * errno, EIO if the bridge itself failed (logged on stderr), and a new
 * reference to value in *out when it is 0. Steals args. */
int cf_bridge(MountObject *m, const char *op, PyObject *args, PyObject **out) {
    *out = NULL;
    atomic_fetch_add_explicit(&cf_stats.py_calls, 1, memory_order_relaxed);
    if (!args) {
        PyErr_Print();
        return EIO;
    }
    PyObject *r = PyObject_CallFunction(m->dispatch, "sN", op, args);
    int err = EIO;
    PyObject *val = NULL;
    if (r && PyTuple_Check(r) && PyTuple_GET_SIZE(r) == 2 && PyLong_Check(PyTuple_GET_ITEM(r, 0))) {
        err = (int)PyLong_AsLong(PyTuple_GET_ITEM(r, 0));
        val = PyTuple_GET_ITEM(r, 1);
    } else {
        if (PyErr_Occurred()) PyErr_Print();
        fprintf(stderr, "kvfsd._cfuse: dispatch(%s) did not return (errno, value)\n", op);
    }
    if (err == 0) {
        Py_INCREF(val);
        *out = val;
    }
    Py_XDECREF(r);
    return err;
}

/* The answer of dispatch had the wrong shape: EIO (a bug, logged). */
static int bad_value(const char *op) {
    if (PyErr_Occurred()) PyErr_Print();
    fprintf(stderr, "kvfsd._cfuse: %s: unexpected value from dispatch\n", op);
    return EIO;
}

static PyObject *ctx_of(fuse_req_t req) {
    const struct fuse_ctx *c = fuse_req_ctx(req);
    return Py_BuildValue("(IIiI)", (unsigned)c->uid, (unsigned)c->gid, (int)c->pid, (unsigned)c->umask);
}

static void set_time(struct timespec *t, long long ns) {
    t->tv_sec = ns / 1000000000LL;
    t->tv_nsec = ns % 1000000000LL;
}

/* kvfsd.cfuse_bridge.attr_tuple's layout */
static int parse_attr(PyObject *t, struct fuse_entry_param *e) {
    unsigned long long ino, gen, rdev;
    double et, at;
    unsigned long mode, nlink, uid, gid;
    long long size, blksize, blocks, atime, mtime, ctime;
    if (!PyArg_ParseTuple(t, "KKddkkkkKLLLLLL", &ino, &gen, &et, &at, &mode, &nlink, &uid, &gid, &rdev, &size,
                          &blksize, &blocks, &atime, &mtime, &ctime))
        return -1;
    memset(e, 0, sizeof *e);
    e->ino = ino;
    e->generation = gen;
    e->entry_timeout = et;
    e->attr_timeout = at;
    e->attr.st_ino = ino;
    e->attr.st_mode = (mode_t)mode;
    e->attr.st_nlink = (nlink_t)nlink;
    e->attr.st_uid = (uid_t)uid;
    e->attr.st_gid = (gid_t)gid;
    e->attr.st_rdev = (dev_t)rdev;
    e->attr.st_size = size;
    e->attr.st_blksize = (blksize_t)blksize;
    e->attr.st_blocks = blocks;
    set_time(&e->attr.st_atim, atime);
    set_time(&e->attr.st_mtim, mtime);
    set_time(&e->attr.st_ctim, ctime);
    return 0;
}

/* The reply_* helpers are called with the GIL (state g), call dispatch,
 * release the GIL and reply. */

/* Ops whose value is an attribute tuple: reply an entry or an attr. */
static void reply_attr(fuse_req_t req, PyGILState_STATE g, const char *op, PyObject *args, int entry) {
    MountObject *m = fuse_req_userdata(req);
    struct fuse_entry_param e;
    PyObject *v;
    int err = cf_bridge(m, op, args, &v);
    if (!err && parse_attr(v, &e) < 0) err = bad_value(op);
    Py_XDECREF(v);
    PyGILState_Release(g);
    if (err)
        fuse_reply_err(req, err);
    else if (entry)
        fuse_reply_entry(req, &e);
    else
        fuse_reply_attr(req, &e.attr, e.attr_timeout);
}

/* Ops with no value: reply the errno. */
static void reply_status(fuse_req_t req, PyGILState_STATE g, const char *op, PyObject *args) {
    MountObject *m = fuse_req_userdata(req);
    PyObject *v;
    int err = cf_bridge(m, op, args, &v);
    Py_XDECREF(v);
    PyGILState_Release(g);
    fuse_reply_err(req, err);
}

/* Ops whose value is bytes (xattrs): the size, or the bytes if they fit. */
static void reply_bytes(fuse_req_t req, PyGILState_STATE g, const char *op, PyObject *args, size_t size) {
    MountObject *m = fuse_req_userdata(req);
    PyObject *v;
    int err = cf_bridge(m, op, args, &v);
    if (!err && !PyBytes_Check(v)) err = bad_value(op);
    if (!err) {
        size_t n = (size_t)PyBytes_GET_SIZE(v);
        if (size == 0)
            fuse_reply_xattr(req, n);
        else if (n > size)
            fuse_reply_err(req, ERANGE);
        else
            fuse_reply_buf(req, PyBytes_AS_STRING(v), n);
    }
    Py_XDECREF(v);
    PyGILState_Release(g);
    if (err) fuse_reply_err(req, err);
}

/* -- handles ---------------------------------------------------------------- */

static void handle_link(MountObject *m, cf_handle *h) {
    pthread_mutex_lock(&m->hmu);
    h->next = m->handles;
    if (m->handles) m->handles->prev = h;
    m->handles = h;
    pthread_mutex_unlock(&m->hmu);
}

static void handle_unlink(MountObject *m, cf_handle *h) {
    pthread_mutex_lock(&m->hmu);
    if (h->prev) h->prev->next = h->next;
    else m->handles = h->next;
    if (h->next) h->next->prev = h->prev;
    pthread_mutex_unlock(&m->hmu);
}

/* Free the C side of a handle; the GIL is held (the arena export). */
static void handle_free(cf_handle *h) {
    if (h->kind == CF_READ) {
        for (int i = 0; i < h->nfds; i++) close(h->fds[i]);
        free(h->fds);
        free(h->chunks);
        cf_read_free(h);
        free((void *)h->verified);
        free((void *)h->advised);
    }
    if (h->t0owner) {
        PyBuffer_Release((Py_buffer *)h->t0owner);
        free(h->t0owner);
    }
    Py_XDECREF((PyObject *)h->ws);
    free(h);
}

/* A read spec from open: (size, unit, [(fd, off, len, csum16), ...], arena view or None). */
static int parse_read_spec(cf_handle *h, PyObject *spec) {
    long long size, unit;
    PyObject *chunks, *t0;
    if (!PyArg_ParseTuple(spec, "LLO!O", &size, &unit, &PyList_Type, &chunks, &t0)) return -1;
    Py_ssize_t n = PyList_GET_SIZE(chunks);
    if (unit <= 0 || n <= 0 || n > (1 << 24)) {
        PyErr_SetString(PyExc_ValueError, "bad read spec");
        return -1;
    }
    h->kind = CF_READ;
    h->size = size;
    h->unit = unit;
    h->nchunks = (int)n;
    h->chunks = calloc((size_t)n, sizeof *h->chunks);
    h->verified = calloc((size_t)n, 1);
    h->advised = calloc((size_t)n, 1);
    cf_read_init(h);
    if (!h->chunks || !h->verified || !h->advised) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) h->chunks[i].fd = -1;
    int *orig = calloc((size_t)n, sizeof *orig);  /* the daemon's fd behind each of h->fds */
    h->fds = calloc((size_t)n, sizeof *h->fds);
    if (!orig || !h->fds) {
        free(orig);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        int fd;
        long long off, len;
        const char *csum;
        Py_ssize_t clen;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(chunks, i), "iLLy#", &fd, &off, &len, &csum, &clen)) {
            free(orig);
            return -1;
        }
        if (clen != 16 || len < 0 || off < 0 || (i < n - 1 && len != unit)) {
            PyErr_SetString(PyExc_ValueError, "bad chunk in a read spec");
            free(orig);
            return -1;
        }
        cf_chunk *c = &h->chunks[i];
        c->off = off;
        c->len = len;
        memcpy(c->csum, csum, 16);
        c->fd = -1;
        if (fd < 0) continue;  /* segment gone: reads of this chunk are EIO (unless in T0) */
        for (int j = h->nfds - 1; j >= 0 && c->fd < 0; j--)  /* an object spans few segments */
            if (orig[j] == fd) c->fd = h->fds[j];
        if (c->fd >= 0) continue;
        /* a dup of our own: the daemon may close its fd (its cache of them), never ours */
        if ((c->fd = fcntl(fd, F_DUPFD_CLOEXEC, 0)) < 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            free(orig);
            return -1;
        }
        orig[h->nfds] = fd;
        h->fds[h->nfds++] = c->fd;
    }
    free(orig);
    if (t0 != Py_None) {
        Py_buffer *b = calloc(1, sizeof *b);
        if (!b) {
            PyErr_NoMemory();
            return -1;
        }
        if (PyObject_GetBuffer(t0, b, PyBUF_SIMPLE) < 0) {
            free(b);
            return -1;
        }
        h->t0owner = b;
        if (b->len < size) {
            PyErr_SetString(PyExc_ValueError, "arena view shorter than the object");
            return -1;
        }
        h->t0 = b->buf;
    }
    return 0;
}

/* The value of open or create: (fh, direct_io, keep_cache, extra). Sets
 * fi and returns a new handle, or NULL (GIL held, error logged; a handle
 * Python made is given back). */
static cf_handle *new_handle(MountObject *m, PyObject *v, struct fuse_file_info *fi, PyObject **extra);
/* Give a handle the caller could not pass to the kernel back to Python. */
static void drop_handle(MountObject *m, cf_handle *h, uint64_t pyfh) {
    PyObject *v;
    if (h) handle_free(h);
    if (!cf_bridge(m, "release", Py_BuildValue("(K)", (unsigned long long)pyfh), &v)) Py_DECREF(v);
}

static cf_handle *new_handle(MountObject *m, PyObject *v, struct fuse_file_info *fi, PyObject **extra) {
    unsigned long long fh;
    int direct_io, keep_cache;
    if (!PyTuple_Check(v) || PyTuple_GET_SIZE(v) != 4 ||
        !PyArg_ParseTuple(v, "KppO", &fh, &direct_io, &keep_cache, extra)) {
        bad_value("open/create");
        return NULL;
    }
    cf_handle *h = calloc(1, sizeof *h);
    if (!h) {
        drop_handle(m, NULL, fh);
        return NULL;
    }
    h->pyfh = fh;
    h->kind = CF_PY;
    fi->fh = (uint64_t)(uintptr_t)h;
    fi->direct_io = direct_io;
    fi->keep_cache = keep_cache;
    return h;
}

/* The reply that handed h to the kernel returned r: unless it was sent
 * (the opener is gone, interrupted), no release will come, so h is given
 * back here. No GIL held. */
static void unless_sent(MountObject *m, cf_handle *h, int r) {
    if (r == 0) return;
    handle_unlink(m, h);
    PyGILState_STATE g = PyGILState_Ensure();
    drop_handle(m, h, h->pyfh);
    PyGILState_Release(g);
}

/* -- operations ------------------------------------------------------------ */

static void op_init(void *userdata, struct fuse_conn_info *conn) {
    (void)userdata;
    if (conn->capable & FUSE_CAP_READDIRPLUS) conn->want |= FUSE_CAP_READDIRPLUS;
    conn->want &= ~FUSE_CAP_READDIRPLUS_AUTO;  /* always readdirplus: entries count as lookups */
    if (conn->capable & FUSE_CAP_ASYNC_READ) conn->want |= FUSE_CAP_ASYNC_READ;
    conn->max_background = 16;  /* read-ahead requests in flight: the workers load chunks in parallel */
    conn->congestion_threshold = 12;
}

static void op_lookup(fuse_req_t req, fuse_ino_t parent, const char *name) {
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *args = Py_BuildValue("(Ky#N)", (unsigned long long)parent, name, (Py_ssize_t)strlen(name), ctx_of(req));
    reply_attr(req, g, "lookup", args, 1);
}

static void forget_list(fuse_req_t req, PyObject *list) {
    MountObject *m = fuse_req_userdata(req);
    PyObject *v;
    if (!cf_bridge(m, "forget", Py_BuildValue("(N)", list), &v)) Py_DECREF(v);
}

static void op_forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup) {
    PyGILState_STATE g = PyGILState_Ensure();
    forget_list(req, Py_BuildValue("[(KK)]", (unsigned long long)ino, (unsigned long long)nlookup));
    PyGILState_Release(g);
    fuse_reply_none(req);
}

static void op_forget_multi(fuse_req_t req, size_t count, struct fuse_forget_data *forgets) {
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *list = PyList_New((Py_ssize_t)count);
    for (size_t i = 0; list && i < count; i++)
        PyList_SET_ITEM(list, (Py_ssize_t)i, Py_BuildValue("(KK)", (unsigned long long)forgets[i].ino,
                                                           (unsigned long long)forgets[i].nlookup));
    forget_list(req, list);
    PyGILState_Release(g);
    fuse_reply_none(req);
}

static void op_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
    (void)fi;
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *args = Py_BuildValue("(KN)", (unsigned long long)ino, ctx_of(req));
    reply_attr(req, g, "getattr", args, 0);
}

static void op_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set, struct fuse_file_info *fi) {
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *size = (to_set & FUSE_SET_ATTR_SIZE) ? PyLong_FromLongLong(attr->st_size) : Py_NewRef(Py_None);
    PyObject *fh = fi ? PyLong_FromUnsignedLongLong(((cf_handle *)(uintptr_t)fi->fh)->pyfh) : Py_NewRef(Py_None);
    PyObject *args = Py_BuildValue("(KNNN)", (unsigned long long)ino, size, fh, ctx_of(req));
    reply_attr(req, g, "setattr", args, 0);
}

static void op_mkdir(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode) {
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *args = Py_BuildValue("(Ky#IN)", (unsigned long long)parent, name, (Py_ssize_t)strlen(name),
                                   (unsigned)mode, ctx_of(req));
    reply_attr(req, g, "mkdir", args, 1);
}

static void name_op(fuse_req_t req, const char *op, fuse_ino_t parent, const char *name) {
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *args = Py_BuildValue("(Ky#N)", (unsigned long long)parent, name, (Py_ssize_t)strlen(name), ctx_of(req));
    reply_status(req, g, op, args);
}

static void op_unlink(fuse_req_t req, fuse_ino_t parent, const char *name) { name_op(req, "unlink", parent, name); }
static void op_rmdir(fuse_req_t req, fuse_ino_t parent, const char *name) { name_op(req, "rmdir", parent, name); }

static void op_rename(fuse_req_t req, fuse_ino_t parent, const char *name, fuse_ino_t newparent,
                      const char *newname, unsigned int flags) {
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *args = Py_BuildValue("(Ky#Ky#IN)", (unsigned long long)parent, name, (Py_ssize_t)strlen(name),
                                   (unsigned long long)newparent, newname, (Py_ssize_t)strlen(newname), flags,
                                   ctx_of(req));
    reply_status(req, g, "rename", args);
}

static void op_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
    MountObject *m = fuse_req_userdata(req);
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *v, *spec = NULL;
    cf_handle *h = NULL;
    int err = cf_bridge(m, "open", Py_BuildValue("(KiN)", (unsigned long long)ino, fi->flags, ctx_of(req)), &v);
    if (!err) {
        h = new_handle(m, v, fi, &spec);
        if (!h) {
            err = EIO;
        } else if (PyObject_TypeCheck(spec, &cf_WriteStateType)) {  /* a draft reopened for writing */
            h->kind = CF_WRITE;
            h->ws = Py_NewRef(spec);
        } else if (spec != Py_None && parse_read_spec(h, spec) < 0) {
            err = bad_value("open");
            drop_handle(m, h, h->pyfh);
            h = NULL;
        }
    }
    Py_XDECREF(v);
    PyGILState_Release(g);
    if (err) {
        fuse_reply_err(req, err);
        return;
    }
    handle_link(m, h);  /* before the reply: the kernel may release it at once */
    unless_sent(m, h, fuse_reply_open(req, fi));
}

static void op_create(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode, struct fuse_file_info *fi) {
    MountObject *m = fuse_req_userdata(req);
    struct fuse_entry_param e;
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *v, *attr = NULL;
    cf_handle *h = NULL;
    int err = cf_bridge(m, "create", Py_BuildValue("(Ky#IiN)", (unsigned long long)parent, name,
                                                (Py_ssize_t)strlen(name), (unsigned)mode, fi->flags, ctx_of(req)), &v);
    if (!err) {
        h = new_handle(m, v, fi, &attr);
        PyObject *at, *ws;
        if (!h) {
            err = EIO;
        } else if (!PyArg_ParseTuple(attr, "OO", &at, &ws) || parse_attr(at, &e) < 0 ||
                   (ws != Py_None && !PyObject_TypeCheck(ws, &cf_WriteStateType))) {
            err = bad_value("create");
            drop_handle(m, h, h->pyfh);
            h = NULL;
        } else if (ws != Py_None) {
            h->kind = CF_WRITE;
            h->ws = Py_NewRef(ws);
        }
    }
    Py_XDECREF(v);
    PyGILState_Release(g);
    if (err) {
        fuse_reply_err(req, err);
        return;
    }
    handle_link(m, h);
    unless_sent(m, h, fuse_reply_create(req, &e, fi));
}

static void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi) {
    (void)ino;
    MountObject *m = fuse_req_userdata(req);
    cf_handle *h = (cf_handle *)(uintptr_t)fi->fh;
    if (h->kind == CF_READ) {
        int err = cf_read(req, h, size, off);
        if (err == EIO) {  /* report it as a client would: the daemon re-checks the object and drops it */
            PyGILState_STATE g = PyGILState_Ensure();
            PyObject *v;
            if (!cf_bridge(m, "bad", Py_BuildValue("(K)", (unsigned long long)h->pyfh), &v)) Py_DECREF(v);
            PyGILState_Release(g);
        }
        if (err) fuse_reply_err(req, err);
        return;
    }
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *v;
    int err = cf_bridge(m, "read", Py_BuildValue("(KLn)", (unsigned long long)h->pyfh, (long long)off, (Py_ssize_t)size), &v);
    if (!err && !PyBytes_Check(v)) err = bad_value("read");
    if (!err) fuse_reply_buf(req, PyBytes_AS_STRING(v), (size_t)PyBytes_GET_SIZE(v));
    Py_XDECREF(v);
    PyGILState_Release(g);
    if (err) fuse_reply_err(req, err);
}

static void op_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
                     struct fuse_file_info *fi) {
    (void)ino;
    MountObject *m = fuse_req_userdata(req);
    cf_handle *h = (cf_handle *)(uintptr_t)fi->fh;
    if (h->kind == CF_WRITE) {
        cf_write(req, m, (WriteState *)h->ws, h->pyfh, buf, size, off);
        return;
    }
    if (h->kind != CF_PY) {
        fuse_reply_err(req, EBADF);
        return;
    }
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *v;
    size_t n = 0;
    int err = cf_bridge(m, "write", Py_BuildValue("(KLy#)", (unsigned long long)h->pyfh, (long long)off, buf,
                                               (Py_ssize_t)size), &v);
    if (!err) {
        n = PyLong_AsSize_t(v);
        if (PyErr_Occurred() || n > size) err = bad_value("write");
    }
    Py_XDECREF(v);
    PyGILState_Release(g);
    if (err)
        fuse_reply_err(req, err);
    else
        fuse_reply_write(req, n);
}

static void op_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
    (void)ino;
    cf_handle *h = (cf_handle *)(uintptr_t)fi->fh;
    if (h->kind == CF_READ) {  /* an object opened for reading: nothing to commit */
        fuse_reply_err(req, 0);
        return;
    }
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *args = Py_BuildValue("(K)", (unsigned long long)h->pyfh);
    reply_status(req, g, "flush", args);
}

static void op_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
    (void)ino;
    MountObject *m = fuse_req_userdata(req);
    cf_handle *h = (cf_handle *)(uintptr_t)fi->fh;
    handle_unlink(m, h);
    uint64_t pyfh = h->pyfh;
    PyGILState_STATE g = PyGILState_Ensure();
    handle_free(h);
    PyObject *v;
    int err = cf_bridge(m, "release", Py_BuildValue("(K)", (unsigned long long)pyfh), &v);
    Py_XDECREF(v);
    PyGILState_Release(g);
    fuse_reply_err(req, err);
}

static void op_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
    MountObject *m = fuse_req_userdata(req);
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *v;
    int err = cf_bridge(m, "opendir", Py_BuildValue("(KN)", (unsigned long long)ino, ctx_of(req)), &v);
    if (!err) {
        fi->fh = PyLong_AsUnsignedLongLong(v);
        if (PyErr_Occurred()) err = bad_value("opendir");
    }
    Py_XDECREF(v);
    PyGILState_Release(g);
    if (err)
        fuse_reply_err(req, err);
    else
        fuse_reply_open(req, fi);
}

/* The bridge returns only entries that fit in size (it sizes them as
 * fuse_add_direntry_plus does, DIRENTPLUS_BASE): each counts as a lookup
 * on the Python side, so none may be dropped here. */
static void op_readdirplus(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi) {
    (void)ino;
    MountObject *m = fuse_req_userdata(req);
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *v;
    char *buf = NULL;
    size_t pos = 0;
    int err = cf_bridge(m, "readdirplus", Py_BuildValue("(KLn)", (unsigned long long)fi->fh, (long long)off,
                                                     (Py_ssize_t)size), &v);
    if (!err && !PyList_Check(v)) err = bad_value("readdirplus");
    if (!err && !(buf = malloc(size ? size : 1))) err = ENOMEM;
    for (Py_ssize_t i = 0; !err && i < PyList_GET_SIZE(v); i++) {
        const char *name;
        Py_ssize_t nlen;
        PyObject *attr;
        long long next;
        struct fuse_entry_param e;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(v, i), "y#OL", &name, &nlen, &attr, &next) || parse_attr(attr, &e) < 0) {
            err = bad_value("readdirplus");
            break;
        }
        size_t n = fuse_add_direntry_plus(req, buf + pos, size - pos, name, &e, next);
        if (n > size - pos) {
            err = bad_value("readdirplus (an entry did not fit)");
            break;
        }
        pos += n;
    }
    Py_XDECREF(v);
    PyGILState_Release(g);
    if (err)
        fuse_reply_err(req, err);
    else
        fuse_reply_buf(req, buf, pos);
    free(buf);
}

static void op_releasedir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
    (void)ino;
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *args = Py_BuildValue("(K)", (unsigned long long)fi->fh);
    reply_status(req, g, "releasedir", args);
}

static void op_statfs(fuse_req_t req, fuse_ino_t ino) {
    (void)ino;
    MountObject *m = fuse_req_userdata(req);
    struct statvfs s;
    memset(&s, 0, sizeof s);
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *v;
    int err = cf_bridge(m, "statfs", Py_BuildValue("(N)", ctx_of(req)), &v);
    unsigned long long bsize, frsize, blocks, bfree, bavail, files, ffree, favail, namemax;
    if (!err && !PyArg_ParseTuple(v, "KKKKKKKKK", &bsize, &frsize, &blocks, &bfree, &bavail, &files, &ffree, &favail,
                                  &namemax))
        err = bad_value("statfs");
    Py_XDECREF(v);
    PyGILState_Release(g);
    if (err) {
        fuse_reply_err(req, err);
        return;
    }
    s.f_bsize = bsize;
    s.f_frsize = frsize;
    s.f_blocks = blocks;
    s.f_bfree = bfree;
    s.f_bavail = bavail;
    s.f_files = files;
    s.f_ffree = ffree;
    s.f_favail = favail;
    s.f_namemax = namemax;
    fuse_reply_statfs(req, &s);
}

static void op_getxattr(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size) {
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *args = Py_BuildValue("(Ky#N)", (unsigned long long)ino, name, (Py_ssize_t)strlen(name), ctx_of(req));
    reply_bytes(req, g, "getxattr", args, size);
}

static void op_listxattr(fuse_req_t req, fuse_ino_t ino, size_t size) {
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *args = Py_BuildValue("(KN)", (unsigned long long)ino, ctx_of(req));
    reply_bytes(req, g, "listxattr", args, size);
}

static void op_access(fuse_req_t req, fuse_ino_t ino, int mask) {
    MountObject *m = fuse_req_userdata(req);
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *v;
    int err = cf_bridge(m, "access", Py_BuildValue("(KiN)", (unsigned long long)ino, mask, ctx_of(req)), &v);
    if (!err) err = PyObject_IsTrue(v) == 1 ? 0 : EACCES;
    Py_XDECREF(v);
    PyGILState_Release(g);
    fuse_reply_err(req, err);
}

static const struct fuse_lowlevel_ops ops = {
    .init = op_init,
    .lookup = op_lookup,
    .forget = op_forget,
    .forget_multi = op_forget_multi,
    .getattr = op_getattr,
    .setattr = op_setattr,
    .mkdir = op_mkdir,
    .unlink = op_unlink,
    .rmdir = op_rmdir,
    .rename = op_rename,
    .open = op_open,
    .create = op_create,
    .read = op_read,
    .write = op_write,
    .flush = op_flush,
    .release = op_release,
    .opendir = op_opendir,
    .readdirplus = op_readdirplus,
    .releasedir = op_releasedir,
    .statfs = op_statfs,
    .getxattr = op_getxattr,
    .listxattr = op_listxattr,
    .access = op_access,
};

/* -- workers ---------------------------------------------------------------- */

static void on_wake(int sig) { (void)sig; }

static void *worker(void *arg) {
    MountObject *m = arg;
    sigset_t only;
    sigfillset(&only);
    sigdelset(&only, CF_WAKE);
    pthread_sigmask(SIG_SETMASK, &only, NULL);  /* SIGTERM and the rest go to the daemon's own thread */
    /* The request buffer (libfuse reads a request of at most RECV_BUF bytes
     * into it) placed so that a WRITE's data lands on a page boundary: it
     * follows the two headers, WRITE_HEADERS bytes. cfuse_write.c can then
     * write it to the segment with O_DIRECT, with no copy. */
    char *base = aligned_alloc(4096, RECV_BUF + 4096);
    if (!base) return NULL;
    struct fuse_buf fbuf = {.mem = base + 4096 - WRITE_HEADERS};
    while (!atomic_load(&m->stop)) {
        int res = fuse_session_receive_buf(m->se, &fbuf);
        if (res == -EINTR || res == -EAGAIN) continue;
        if (res <= 0) break;  /* -ENODEV: unmounted */
        fuse_session_process_buf(m->se, &fbuf);
    }
    free(base);
    return NULL;
}

/* Stop and join every worker (GIL released by the caller). */
static void stop_workers(MountObject *m) {
    atomic_store(&m->stop, 1);
    fuse_session_exit(m->se);
    for (;;) {
        int alive = 0;
        for (int i = 0; i < m->nthreads; i++) {
            if (m->joined[i]) continue;
            pthread_kill(m->threads[i], CF_WAKE);
            struct timespec t;
            clock_gettime(CLOCK_REALTIME, &t);
            t.tv_nsec += 20 * 1000000L;
            if (t.tv_nsec >= 1000000000L) {
                t.tv_sec++;
                t.tv_nsec -= 1000000000L;
            }
            if (pthread_timedjoin_np(m->threads[i], NULL, &t) == 0)
                m->joined[i] = 1;
            else
                alive++;
        }
        if (!alive) break;
    }
    m->nthreads = 0;
}

/* -- the Mount type ----------------------------------------------------------- */

static int Mount_init(MountObject *self, PyObject *args, PyObject *kw) {
    (void)kw;
    const char *mountpoint, *options;
    PyObject *dispatch;
    if (!PyArg_ParseTuple(args, "ssO", &mountpoint, &options, &dispatch)) return -1;
    if (self->se) {
        PyErr_SetString(PyExc_RuntimeError, "already mounted");
        return -1;
    }
    char *argv[] = {"kvfsd", "-o", (char *)options, NULL};
    struct fuse_args fargs = FUSE_ARGS_INIT(3, argv);
    self->dispatch = Py_NewRef(dispatch);
    pthread_mutex_init(&self->hmu, NULL);
    const struct fuse_lowlevel_ops *o = dispatch == Py_None ? &cf_null_ops : &ops;
    self->se = fuse_session_new(&fargs, o, sizeof *o, self);
    if (!self->se) {
        PyErr_SetString(PyExc_RuntimeError, "fuse_session_new failed (bad mount options?)");
        return -1;
    }
    int r;
    Py_BEGIN_ALLOW_THREADS
    r = fuse_session_mount(self->se, mountpoint);
    Py_END_ALLOW_THREADS
    if (r != 0) {
        fuse_session_destroy(self->se);
        self->se = NULL;
        PyErr_Format(PyExc_RuntimeError, "fuse_session_mount(%s) failed (see the log above it)", mountpoint);
        return -1;
    }
    self->mounted = 1;
    return 0;
}

static PyObject *Mount_start(MountObject *self, PyObject *args) {
    int n;
    if (!PyArg_ParseTuple(args, "i", &n)) return NULL;
    if (!self->se || self->nthreads) {
        PyErr_SetString(PyExc_RuntimeError, "not mounted, or already started");
        return NULL;
    }
    if (n < 1 || n > MAX_THREADS) {
        PyErr_Format(PyExc_ValueError, "threads must be 1..%d", MAX_THREADS);
        return NULL;
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_wake;  /* no SA_RESTART: a read of /dev/fuse returns EINTR */
    sigemptyset(&sa.sa_mask);
    sigaction(CF_WAKE, &sa, NULL);
    for (int i = 0; i < n; i++) {
        if (pthread_create(&self->threads[i], NULL, worker, self) != 0) {
            Py_BEGIN_ALLOW_THREADS
            stop_workers(self);
            Py_END_ALLOW_THREADS
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        self->joined[i] = 0;
        self->nthreads = i + 1;
        pthread_setname_np(self->threads[i], "kvfs-fuse");
    }
    Py_RETURN_NONE;
}

static void do_close(MountObject *self) {
    if (!self->se) return;
    Py_BEGIN_ALLOW_THREADS
    if (self->nthreads) stop_workers(self);
    if (self->mounted) fuse_session_unmount(self->se);
    fuse_session_destroy(self->se);
    Py_END_ALLOW_THREADS
    self->se = NULL;
    self->mounted = 0;
    /* handles the kernel never released (the connection is gone now) */
    while (self->handles) {
        cf_handle *h = self->handles;
        self->handles = h->next;
        handle_free(h);
    }
}

static PyObject *Mount_close(MountObject *self, PyObject *unused) {
    (void)unused;
    do_close(self);
    Py_RETURN_NONE;
}

static void Mount_dealloc(MountObject *self) {
    do_close(self);
    Py_XDECREF(self->dispatch);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Mount_methods[] = {
    {"start", (PyCFunction)Mount_start, METH_VARARGS, "start(threads): serve the mount on that many threads"},
    {"close", (PyCFunction)Mount_close, METH_NOARGS,
     "close(): stop the workers (each finishes its request), unmount; call it while the trio loop runs"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject MountType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "kvfsd._cfuse.Mount",
    .tp_basicsize = sizeof(MountObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Mount(mountpoint, options, dispatch): the store mounted with libfuse's low-level API",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Mount_init,
    .tp_dealloc = (destructor)Mount_dealloc,
    .tp_methods = Mount_methods,
};

static PyObject *py_counters(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    return Py_BuildValue("{sLsLsLsLsLsLsLsLsLsL}", "writes_direct", (long long)atomic_load(&cf_stats.writes_direct),
                         "writes", (long long)atomic_load(&cf_stats.writes), "write_bytes",
                         (long long)atomic_load(&cf_stats.write_bytes), "reads", (long long)atomic_load(&cf_stats.reads), "read_bytes",
                         (long long)atomic_load(&cf_stats.read_bytes), "chunks_loaded",
                         (long long)atomic_load(&cf_stats.chunks_loaded), "chunks_private",
                         (long long)atomic_load(&cf_stats.chunks_private), "t0_chunks_verified",
                         (long long)atomic_load(&cf_stats.t0_verified), "bad_chunks",
                         (long long)atomic_load(&cf_stats.bad), "python_calls",
                         (long long)atomic_load(&cf_stats.py_calls));
}

static PyMethodDef methods[] = {
    {"counters", py_counters, METH_NOARGS, "counters() -> what the C side served since import"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "kvfsd._cfuse",
                                    "the C mount: libfuse's low-level API (native/cfuse.c)", -1, methods};

PyMODINIT_FUNC PyInit__cfuse(void) {
    cf_kv = PyCapsule_Import(KV_C_API_CAPSULE, 0);
    if (!cf_kv) return NULL;
    if (cf_kv->version != KV_C_API_VERSION) {
        PyErr_SetString(PyExc_ImportError, "kvfs._native and kvfsd._cfuse were built from different sources");
        return NULL;
    }
    if (PyType_Ready(&MountType) < 0 || PyType_Ready(&cf_WriteStateType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    if (PyModule_AddObjectRef(m, "Mount", (PyObject *)&MountType) < 0 ||
        PyModule_AddObjectRef(m, "WriteState", (PyObject *)&cf_WriteStateType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    /* bytes of a readdirplus entry with an empty name; an entry takes
     * (DIRENTPLUS_BASE + len(name) + 7) & ~7 */
    PyModule_AddIntConstant(m, "DIRENTPLUS_BASE", (long)fuse_add_direntry_plus(NULL, NULL, 0, "", NULL, 0));
    PyModule_AddIntConstant(m, "FUSE_VERSION", fuse_version());
    return m;
}
