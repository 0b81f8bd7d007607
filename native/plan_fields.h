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

/* An int field of o as a long long: 0, an error set, if it is missing, not
   an int or out of range. */
static inline int attr_ll(PyObject *o, PyObject *name, long long *out) {
    PyObject *v = PyObject_GetAttr(o, name);
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

#define RECORD_HEADER 80 /* kvfs.format.HEADER_SIZE */

/* The header of a record at p (RECORD_HEADER bytes, then the names ns and
   key copied after it, its xxh3-64 over both in the header's last field).
   The caller checks the lengths fit their fields (16 bits each). */
void kv_fill_record_head(unsigned char *p, const char *ns, Py_ssize_t nl, const char *key, Py_ssize_t kl,
                         uint32_t chunk_idx, uint32_t chunk_cnt, uint64_t length, uint64_t obj_size,
                         uint64_t chunk_off, uint64_t seq, const char *checksum16);

#endif
