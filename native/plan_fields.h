/*
 * What the daemon's batch loops in C share (mirror.c, put_items.c,
 * records.c, write_back.c): reading a put plan's fields, and writing a
 * record header (kvfs.format.encode_header, byte for byte).
 */
#ifndef KVFS_PLAN_FIELDS_H
#define KVFS_PLAN_FIELDS_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

/* An attribute name, interned once (v is a static PyObject *). */
#define INTERN(v, s) (v = PyUnicode_InternFromString(s))

/* Out of the cyclic collector's sight: for what a put makes per object
   and that can be in no reference cycle (tuples of numbers and bytes, a
   plan, its chunk list and chunks: nothing they hold refers back). The
   collector walked each of them at least once before (a tuple is untracked
   only once a collection has looked at it), about a tenth of a busy
   daemon's CPU. Reference counting still frees them. */
static inline void untrack(PyObject *o) {
    if (o && PyObject_GC_IsTracked(o)) PyObject_GC_UnTrack(o);
}

/* A tuple (or list) of n new references, stolen; NULL (and every one
   released) if any is NULL or memory runs out. Py_BuildValue parses its
   format on every call: these are made several times per put. */
static inline PyObject *steal_seq(int list, Py_ssize_t n, PyObject **items) {
    PyObject *seq = NULL;
    int bad = 0;
    for (Py_ssize_t i = 0; i < n; i++) bad |= items[i] == NULL;
    if (!bad) seq = list ? PyList_New(n) : PyTuple_New(n);
    if (!seq) {
        for (Py_ssize_t i = 0; i < n; i++) Py_XDECREF(items[i]);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (list) PyList_SET_ITEM(seq, i, items[i]);
        else PyTuple_SET_ITEM(seq, i, items[i]);
    }
    return seq;
}

/* v (a new reference, NULL: an error is set) as a long long, v released:
   0, an error set, if it is NULL, not an int or out of range. */
static inline int ll_of(PyObject *v, long long *out) {
    if (!v) return 0;
    if (!PyLong_Check(v)) {
        Py_DECREF(v);
        PyErr_SetString(PyExc_TypeError, "a plan's numbers are ints");
        return 0;
    }
    *out = PyLong_AsLongLong(v);
    Py_DECREF(v);
    return !(*out == -1 && PyErr_Occurred());
}

/* An int field of o as a long long (ll_of). */
static inline int attr_ll(PyObject *o, PyObject *name, long long *out) {
    return ll_of(PyObject_GetAttr(o, name), out);
}

/* ---- the put plan's C types (native/plans.c) ----
   The loops read a plan's fields from the struct when it is of these types,
   else by attribute (the Python twins, kvfs._native_py: tests hold the two
   paths alike). Fields hold new references; a deleted one is NULL. */
typedef struct {
    PyObject_HEAD
    long long stripe, seg, hdr_off, payload_off, end, length, chunk_off, idx, start;
    PyObject *checksum; /* bytes */
} ChunkPlanObject;

typedef struct {
    PyObject_HEAD
    PyObject *key; /* str */
    long long size;
    PyObject *meta; /* bytes or None */
    long long seq;
    PyObject *chunks;   /* [ChunkPlan] */
    PyObject *ok;       /* bytes: the object key */
    PyObject *hasher;   /* None or a running xxh3-128 */
    PyObject *checksum; /* bytes */
    long long t0;       /* arena extent, -1: none */
    char via_t0;
    PyObject *mem; /* None or the MemEntry publish_t0 made */
    char t0_stored;
} ObjPlanObject;

extern PyTypeObject ChunkPlanType, ObjPlanType;

/* New plans with the fields a placement gives (the rest their defaults:
   no hasher, mem None, t0 -1, not via T0), checksum given (b"" until the
   sums are known). */
PyObject *kv_chunk_plan(long long stripe, long long seg, long long hdr_off, long long payload_off, long long end,
                        long long length, long long chunk_off, long long idx, long long start, PyObject *checksum);
PyObject *kv_obj_plan(PyObject *key, long long size, PyObject *meta, long long seq, PyObject *chunks, PyObject *ok,
                      PyObject *checksum);
/* ((stripe, seg, payload_off, length, sum), ...) of a chunk list; with
   sums, also a new list of the chunk sums. */
PyObject *kv_plan_exts(PyObject *chunks, PyObject **sums);
int kv_plan_missing(PyObject *o, const char *name);

/* An int field of o by name, as attr_ll (the twins' path: not hot). */
static inline int attr_ll_s(PyObject *o, const char *name, long long *out) {
    return ll_of(PyObject_GetAttrString(o, name), out);
}

static inline PyObject *plan_ref(PyObject *o, PyObject *v, const char *name) {
    if (v) return Py_NewRef(v);
    kv_plan_missing(o, name);
    return NULL;
}

static inline int plan_set(PyObject *o, PyObject **slot, PyObject *v, const char *name, int typed) {
    if (!typed) return PyObject_SetAttrString(o, name, v);
    Py_XSETREF(*slot, Py_NewRef(v));
    return 0;
}

static inline int plan_set_ll(PyObject *o, long long *slot, long long v, const char *name, int typed) {
    if (typed) {
        *slot = v;
        return 0;
    }
    PyObject *x = PyLong_FromLongLong(v);
    int r = x ? PyObject_SetAttrString(o, name, x) : -1;
    Py_XDECREF(x);
    return r;
}

static inline int plan_truth(PyObject *o, const char *name) {
    PyObject *v = PyObject_GetAttrString(o, name);
    int r = v ? PyObject_IsTrue(v) : -1;
    Py_XDECREF(v);
    return r;
}

#define IS_CHUNK_PLAN(c) Py_IS_TYPE(c, &ChunkPlanType)
#define IS_OBJ_PLAN(o) Py_IS_TYPE(o, &ObjPlanType)
/* int fields: 1 and *out set, or 0 and an error */
#define CHUNK_LL(c, f, out) (IS_CHUNK_PLAN(c) ? (*(out) = ((ChunkPlanObject *)(c))->f, 1) : attr_ll_s(c, #f, out))
#define OBJ_LL(o, f, out) (IS_OBJ_PLAN(o) ? (*(out) = ((ObjPlanObject *)(o))->f, 1) : attr_ll_s(o, #f, out))
/* object fields: a new reference, or NULL and an error */
#define CHUNK_GET(c, f) (IS_CHUNK_PLAN(c) ? plan_ref(c, ((ChunkPlanObject *)(c))->f, #f) : PyObject_GetAttrString(c, #f))
#define OBJ_GET(o, f) (IS_OBJ_PLAN(o) ? plan_ref(o, ((ObjPlanObject *)(o))->f, #f) : PyObject_GetAttrString(o, #f))
/* bool fields: 1, 0, or -1 and an error */
#define OBJ_TRUTH(o, f) (IS_OBJ_PLAN(o) ? (int)((ObjPlanObject *)(o))->f : plan_truth(o, #f))
/* setters: 0, or -1 and an error */
#define OBJ_SET(o, f, v) plan_set(o, IS_OBJ_PLAN(o) ? &((ObjPlanObject *)(o))->f : NULL, v, #f, IS_OBJ_PLAN(o))
#define OBJ_SET_LL(o, f, v) plan_set_ll(o, IS_OBJ_PLAN(o) ? &((ObjPlanObject *)(o))->f : NULL, v, #f, IS_OBJ_PLAN(o))
#define OBJ_SET_BOOL(o, f, v) \
    (IS_OBJ_PLAN(o) ? (((ObjPlanObject *)(o))->f = (char)((v) != 0), 0) : PyObject_SetAttrString(o, #f, (v) ? Py_True : Py_False))

#define RECORD_HEADER 80 /* kvfs.format.HEADER_SIZE */

/* The header of a record at p (RECORD_HEADER bytes, then the names ns and
   key copied after it, its xxh3-64 over both in the header's last field).
   The caller checks the lengths fit their fields (16 bits each). */
void kv_fill_record_head(unsigned char *p, const char *ns, Py_ssize_t nl, const char *key, Py_ssize_t kl,
                         uint32_t chunk_idx, uint32_t chunk_cnt, uint64_t length, uint64_t obj_size,
                         uint64_t chunk_off, uint64_t seq, const char *checksum16);

#endif
