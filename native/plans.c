/*
 * A put's plan (kvfsd.segments.ObjPlan, ChunkPlan) as C types.
 *
 * Why: a busy daemon makes one ObjPlan and one ChunkPlan per object put,
 * and its batch loops in C (mirror.c, records.c, write_back.c, put_items.c)
 * read a dozen of their fields each. As slotted dataclasses a pair cost
 * about 1 us to make (two Python __init__ frames), and every field read
 * from C went through the attribute machinery and made an int. Here making
 * them is one allocation each, and the loops read the struct
 * (plan_fields.h: PLAN_LL and friends, which fall back to attributes for
 * the Python twins, so both kinds of plan work everywhere).
 *
 * Neither type is seen by the cyclic collector: a plan refers to str,
 * bytes, ints, its list of chunks, a hasher and its MemEntry, none of which
 * refers back to it. The Python twins (kvfs/_native_py.py: ObjPlan,
 * ChunkPlan) are the definition; tests/test_native.py holds the two alike.
 */
#include "plan_fields.h"
#include <stddef.h>
#include <structmember.h>

/* ---- ChunkPlan --------------------------------------------------------- */

PyObject *kv_chunk_plan(long long stripe, long long seg, long long hdr_off, long long payload_off, long long end,
                        long long length, long long chunk_off, long long idx, long long start, PyObject *checksum) {
    ChunkPlanObject *c = PyObject_New(ChunkPlanObject, &ChunkPlanType);
    if (!c) return NULL;
    c->stripe = stripe;
    c->seg = seg;
    c->hdr_off = hdr_off;
    c->payload_off = payload_off;
    c->end = end;
    c->length = length;
    c->chunk_off = chunk_off;
    c->idx = idx;
    c->start = start;
    c->checksum = Py_NewRef(checksum);
    return (PyObject *)c;
}

/* ChunkPlan(...) from Python: the same fields, given by argument (the type
   is not subclassable: type is ChunkPlanType). */
static PyObject *cp_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    (void)type;
    static char *kwlist[] = {"stripe", "seg", "hdr_off", "payload_off", "end", "length", "chunk_off", "idx",
                             "checksum", "start", NULL};
    long long f[8], start = -1;
    PyObject *sum = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "LLLLLLLL|OL", kwlist, &f[0], &f[1], &f[2], &f[3], &f[4], &f[5], &f[6],
                                     &f[7], &sum, &start))
        return NULL;
    PyObject *empty = sum ? NULL : PyBytes_FromStringAndSize(NULL, 0);
    PyObject *c = sum || empty ? kv_chunk_plan(f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7], start, sum ? sum : empty)
                               : NULL;
    Py_XDECREF(empty);
    return c;
}

static void cp_dealloc(ChunkPlanObject *c) {
    Py_XDECREF(c->checksum);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

static PyObject *cp_repr(ChunkPlanObject *c) {
    return PyUnicode_FromFormat("ChunkPlan(stripe=%lld, seg=%lld, hdr_off=%lld, payload_off=%lld, end=%lld, "
                                "length=%lld, chunk_off=%lld, idx=%lld, checksum=%R, start=%lld)",
                                c->stripe, c->seg, c->hdr_off, c->payload_off, c->end, c->length, c->chunk_off,
                                c->idx, c->checksum ? c->checksum : Py_None, c->start);
}

#define CP(f) offsetof(ChunkPlanObject, f)
static PyMemberDef cp_members[] = {
    {"stripe", T_LONGLONG, CP(stripe), 0, NULL},
    {"seg", T_LONGLONG, CP(seg), 0, NULL},
    {"hdr_off", T_LONGLONG, CP(hdr_off), 0, NULL},
    {"payload_off", T_LONGLONG, CP(payload_off), 0, NULL},
    {"end", T_LONGLONG, CP(end), 0, NULL},
    {"length", T_LONGLONG, CP(length), 0, NULL},
    {"chunk_off", T_LONGLONG, CP(chunk_off), 0, NULL},
    {"idx", T_LONGLONG, CP(idx), 0, NULL},
    {"checksum", T_OBJECT_EX, CP(checksum), 0, NULL},
    {"start", T_LONGLONG, CP(start), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

PyTypeObject ChunkPlanType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "kvfs._native.ChunkPlan",
    .tp_basicsize = sizeof(ChunkPlanObject),
    .tp_flags = Py_TPFLAGS_DEFAULT, /* no Py_TPFLAGS_HAVE_GC: never in a cycle (above) */
    .tp_doc = "ChunkPlan(stripe, seg, hdr_off, payload_off, end, length, chunk_off, idx, checksum=b'', start=-1): "
              "one chunk's reservation (kvfsd/segments.py)",
    .tp_new = cp_new,
    .tp_dealloc = (destructor)cp_dealloc,
    .tp_repr = (reprfunc)cp_repr,
    .tp_members = cp_members,
};

/* ---- ObjPlan ----------------------------------------------------------- */

PyObject *kv_obj_plan(PyObject *key, long long size, PyObject *meta, long long seq, PyObject *chunks, PyObject *ok,
                      PyObject *checksum) {
    ObjPlanObject *o = PyObject_New(ObjPlanObject, &ObjPlanType);
    if (!o) return NULL;
    o->key = Py_NewRef(key);
    o->size = size;
    o->meta = Py_NewRef(meta);
    o->seq = seq;
    o->chunks = Py_NewRef(chunks);
    o->ok = Py_NewRef(ok);
    o->hasher = Py_NewRef(Py_None);
    o->checksum = Py_NewRef(checksum);
    o->t0 = -1;
    o->via_t0 = 0;
    o->mem = Py_NewRef(Py_None);
    o->t0_stored = 0;
    return (PyObject *)o;
}

/* ObjPlan(...) from Python: kv_obj_plan, then the fields it leaves at their
   defaults (the type is not subclassable: type is ObjPlanType). */
static PyObject *op_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    (void)type;
    static char *kwlist[] = {"key", "size", "meta", "seq", "chunks", "ok", "hasher", "checksum", "t0", "via_t0",
                             "mem", "t0_stored", NULL};
    PyObject *key, *meta, *chunks, *ok = NULL, *hasher = Py_None, *sum = NULL, *mem = Py_None;
    long long size, seq, t0 = -1;
    int via_t0 = 0, t0_stored = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OLOLO|OOOLpOp", kwlist, &key, &size, &meta, &seq, &chunks, &ok, &hasher,
                                     &sum, &t0, &via_t0, &mem, &t0_stored))
        return NULL;
    PyObject *empty = PyBytes_FromStringAndSize(NULL, 0);
    ObjPlanObject *o = empty ? (ObjPlanObject *)kv_obj_plan(key, size, meta, seq, chunks, ok ? ok : empty, empty) : NULL;
    Py_XDECREF(empty);
    if (!o) return NULL;
    Py_SETREF(o->hasher, Py_NewRef(hasher));
    if (sum) Py_SETREF(o->checksum, Py_NewRef(sum));
    o->t0 = t0;
    o->via_t0 = (char)via_t0;
    Py_SETREF(o->mem, Py_NewRef(mem));
    o->t0_stored = (char)t0_stored;
    return (PyObject *)o;
}

static void op_dealloc(ObjPlanObject *o) {
    Py_XDECREF(o->key);
    Py_XDECREF(o->meta);
    Py_XDECREF(o->chunks);
    Py_XDECREF(o->ok);
    Py_XDECREF(o->hasher);
    Py_XDECREF(o->checksum);
    Py_XDECREF(o->mem);
    Py_TYPE(o)->tp_free((PyObject *)o);
}

static PyObject *op_repr(ObjPlanObject *o) {
    return PyUnicode_FromFormat("ObjPlan(key=%R, size=%lld, seq=%lld, chunks=%R, t0=%lld, via_t0=%s)",
                                o->key ? o->key : Py_None, o->size, o->seq, o->chunks ? o->chunks : Py_None, o->t0,
                                o->via_t0 ? "True" : "False");
}

/* Its chunks as the mirror keeps them: ((stripe, seg, payload_off, length, sum), ...). */
static PyObject *op_exts(ObjPlanObject *o, PyObject *unused) {
    (void)unused;
    return kv_plan_exts(o->chunks, NULL);
}

/* ((segment, record bytes from header to aligned end), ...) per chunk. */
static PyObject *op_spans(ObjPlanObject *o, PyObject *unused) {
    (void)unused;
    if (!o->chunks || !PyList_Check(o->chunks)) {
        PyErr_SetString(PyExc_TypeError, "a plan's chunks are a list");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(o->chunks);
    PyObject *out = PyTuple_New(n);
    if (!out) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        long long seg, end, hdr;
        PyObject *c = PyList_GET_ITEM(o->chunks, i);
        if (!CHUNK_LL(c, seg, &seg) || !CHUNK_LL(c, end, &end) || !CHUNK_LL(c, hdr_off, &hdr)) {
            Py_DECREF(out);
            return NULL;
        }
        PyObject *t = steal_seq(0, 2, (PyObject *[]){PyLong_FromLongLong(seg), PyLong_FromLongLong(end - hdr)});
        if (!t) {
            Py_DECREF(out);
            return NULL;
        }
        PyTuple_SET_ITEM(out, i, t);
    }
    return out;
}

#define OP(f) offsetof(ObjPlanObject, f)
static PyMemberDef op_members[] = {
    {"key", T_OBJECT_EX, OP(key), 0, NULL},
    {"size", T_LONGLONG, OP(size), 0, NULL},
    {"meta", T_OBJECT_EX, OP(meta), 0, NULL},
    {"seq", T_LONGLONG, OP(seq), 0, NULL},
    {"chunks", T_OBJECT_EX, OP(chunks), 0, NULL},
    {"ok", T_OBJECT_EX, OP(ok), 0, NULL},
    {"hasher", T_OBJECT_EX, OP(hasher), 0, NULL},
    {"checksum", T_OBJECT_EX, OP(checksum), 0, NULL},
    {"t0", T_LONGLONG, OP(t0), 0, NULL},
    {"via_t0", T_BOOL, OP(via_t0), 0, NULL},
    {"mem", T_OBJECT_EX, OP(mem), 0, NULL},
    {"t0_stored", T_BOOL, OP(t0_stored), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyMethodDef op_methods[] = {
    {"exts", (PyCFunction)op_exts, METH_NOARGS,
     "its chunks as the mirror keeps them: ((stripe, seg, payload_off, length, sum), ...)"},
    {"spans", (PyCFunction)op_spans, METH_NOARGS, "((segment, record bytes from header to aligned end), ...)"},
    {NULL, NULL, 0, NULL},
};

PyTypeObject ObjPlanType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "kvfs._native.ObjPlan",
    .tp_basicsize = sizeof(ObjPlanObject),
    .tp_flags = Py_TPFLAGS_DEFAULT, /* no Py_TPFLAGS_HAVE_GC: never in a cycle (above) */
    .tp_doc = "ObjPlan(key, size, meta, seq, chunks, ok=b'', hasher=None, checksum=b'', t0=-1, via_t0=False, "
              "mem=None, t0_stored=False): one object's put plan (kvfsd/segments.py)",
    .tp_new = op_new,
    .tp_dealloc = (destructor)op_dealloc,
    .tp_repr = (reprfunc)op_repr,
    .tp_members = op_members,
    .tp_methods = op_methods,
};

/* ---- what the batch loops share ---------------------------------------- */

/* (exts tuple, and into *sums if given a new list of the chunk sums) of a
   plan's chunk list: ((stripe, seg, payload_off, length, sum), ...). */
PyObject *kv_plan_exts(PyObject *chunks, PyObject **sums) {
    if (!chunks || !PyList_Check(chunks)) {
        PyErr_SetString(PyExc_TypeError, "a plan's chunks are a list");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(chunks);
    PyObject *exts = PyTuple_New(n);
    if (sums) *sums = PyList_New(n);
    if (!exts || (sums && !*sums)) goto fail;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *c = PyList_GET_ITEM(chunks, i);
        long long stripe, seg, poff, len;
        PyObject *sum = NULL;
        if (!CHUNK_LL(c, stripe, &stripe) || !CHUNK_LL(c, seg, &seg) || !CHUNK_LL(c, payload_off, &poff) ||
            !CHUNK_LL(c, length, &len) || !(sum = CHUNK_GET(c, checksum)))
            goto fail;
        if (sums) PyList_SET_ITEM(*sums, i, Py_NewRef(sum));
        PyObject *t = steal_seq(0, 5, (PyObject *[]){PyLong_FromLongLong(stripe), PyLong_FromLongLong(seg),
                                                      PyLong_FromLongLong(poff), PyLong_FromLongLong(len), sum});
        if (!t) goto fail;
        untrack(t);
        PyTuple_SET_ITEM(exts, i, t);
    }
    untrack(exts);
    return exts;
fail:
    Py_XDECREF(exts);
    if (sums) Py_CLEAR(*sums);
    return NULL;
}

/* A field that is missing from a plan of the C type (deleted): the same
   AttributeError the generic path gives. */
int kv_plan_missing(PyObject *o, const char *name) {
    PyErr_Format(PyExc_AttributeError, "'%s' object has no attribute '%s'", Py_TYPE(o)->tp_name, name);
    return 0;
}
