/*
 * The placement layer's loop (kvfsd.placement): a batch of objects given
 * their sequence numbers and chunks, each chunk reserved at the end of its
 * stripe's open segment, in one call.
 *
 * Why: in Python each object took about 2.5 us here (record_span,
 * place_record, the segment lookup and two plan constructors, a frame
 * each), a fifth of a busy daemon's work per T0 put. The arithmetic is
 * kvfs.format's (record_span, place_record) and must stay byte-identical:
 * recovery re-derives every payload offset from it.
 *
 * The Python twin (kvfs/_native_py.py: place_items) is the definition;
 * tests/test_native.py holds the two to the same plans, segment ends,
 * reservations, state and errors.
 */
#include "plan_fields.h"

#define PAGE 4096LL
#define RECORD_ALIGN 8LL
#define ALIGN_PAYLOAD_MIN (64LL * 1024)

static PyObject *S_END, *S_RESERVED, *S_SEG;

static long long record_span(long long nl, long long kl, long long length) {
    return RECORD_HEADER + nl + kl + length + PAGE + 2 * RECORD_ALIGN;
}

/* kvfs.format.place_record: (header offset, payload offset, new end) of a
   record placed where the segment ends now. */
static void place_record(long long end, long long nl, long long kl, long long length, long long *hdr,
                         long long *pay, long long *new_end) {
    const long long ra1 = RECORD_ALIGN - 1, pg1 = PAGE - 1, head = RECORD_HEADER + nl + kl;
    long long start = (end + ra1) & ~ra1;
    if (length >= ALIGN_PAYLOAD_MIN) {
        *hdr = (((start + head + pg1) & ~pg1) - head) & ~ra1;
        *pay = (*hdr + head + pg1) & ~pg1;
    } else {
        *hdr = start;
        *pay = *hdr + head;
    }
    *new_end = (*pay + length + ra1) & ~ra1;
}

static int set_ll(PyObject *o, PyObject *name, long long v) {
    PyObject *x = PyLong_FromLongLong(v);
    int r = x ? PyObject_SetAttr(o, name, x) : -1;
    Py_XDECREF(x);
    return r;
}

/* The segment a chunk of span bytes on stripe goes to: the stripe's open
   one if it has room (or is empty), else segment_for(stripe, span)'s. A
   new reference; *end is its end (read once here, for place_chunk). */
static PyObject *segment(PyObject *open_seg, PyObject *segs, PyObject *segment_for, long long stripe, long long span,
                         long long segment_size, long long *end) {
    PyObject *k = PyLong_FromLongLong(stripe);
    if (!k) return NULL;
    PyObject *sid = PyDict_GetItemWithError(open_seg, k); /* borrowed */
    Py_DECREF(k);
    if (sid) {
        PyObject *seg = PyObject_GetItem(segs, sid);
        if (!seg) return NULL;
        if (!attr_ll(seg, S_END, end)) {
            Py_DECREF(seg);
            return NULL;
        }
        if (*end + span <= segment_size || *end == 0) return seg;
        Py_DECREF(seg);
    } else if (PyErr_Occurred()) {
        return NULL;
    }
    PyObject *a = PyLong_FromLongLong(stripe), *b = PyLong_FromLongLong(span);
    PyObject *seg = a && b ? PyObject_CallFunctionObjArgs(segment_for, a, b, NULL) : NULL;
    Py_XDECREF(a);
    Py_XDECREF(b);
    if (seg && !attr_ll(seg, S_END, end)) Py_CLEAR(seg);
    return seg;
}

/* One chunk reserved at the end of seg, which is start (kvfs._native_py.place_chunk);
   *grew: the bytes the segment's end moved. */
static PyObject *place_chunk(PyObject *seg, long long start, long long stripe, long long nl, long long kl,
                             long long i, long long length, long long su, PyObject *empty, long long *grew,
                             long long *sid) {
    long long hdr, pay, end;
    if (!attr_ll(seg, S_SEG, sid)) return NULL;
    place_record(start, nl, kl, length, &hdr, &pay, &end);
    PyObject *res = PyObject_GetAttr(seg, S_RESERVED);
    if (!res) return NULL;
    PyObject *a = PyLong_FromLongLong(start), *b = PyLong_FromLongLong(end);
    int bad = !a || !b || set_ll(seg, S_END, end) < 0 || PyObject_SetItem(res, a, b) < 0;
    Py_DECREF(res);
    Py_XDECREF(a);
    Py_XDECREF(b);
    if (bad) return NULL;
    *grew = end - start;
    return kv_chunk_plan(stripe, *sid, hdr, pay, end, length, i * su, i, start, empty);
}

/* The carve of a T0 item (see the twin): its extent out of res, then its
   arena offset and sums on the plan. 0 and an error on failure. */
static int carve_item(PyObject *op, PyObject *it, Py_ssize_t at, long long size, PyObject *carve, PyObject *res,
                      PyObject *error) {
    if (PyTuple_GET_SIZE(it) < at + 7) {
        PyErr_SetString(PyExc_TypeError, "a placed item is (ok, key, size, meta, offset, sum, [sums])");
        return 0;
    }
    PyObject *off = PyTuple_GET_ITEM(it, at + 4), *whole = PyTuple_GET_ITEM(it, at + 5),
             *parts = PyTuple_GET_ITEM(it, at + 6);
    long long rest, end, t0;
    if (!PyList_Check(res) || PyList_GET_SIZE(res) != 2) {
        PyErr_SetString(PyExc_TypeError, "res is [rest, end]");
        return 0;
    }
    rest = PyLong_AsLongLong(PyList_GET_ITEM(res, 0));
    end = rest == -1 && PyErr_Occurred() ? 0 : PyLong_AsLongLong(PyList_GET_ITEM(res, 1));
    t0 = PyErr_Occurred() ? 0 : PyLong_AsLongLong(off);
    if (PyErr_Occurred()) return 0;
    if (rest >= end) {
        PyErr_SetString(error, "the arena reservation is used up");
        return 0;
    }
    PyObject *sz = PyLong_FromLongLong(size);
    PyObject *r = sz ? PyObject_CallFunctionObjArgs(carve, PyList_GET_ITEM(res, 0), off, sz, NULL) : NULL;
    Py_XDECREF(sz);
    if (!r) {
        if (PyErr_ExceptionMatches(PyExc_ValueError)) {
            PyObject *type, *value, *tb;
            PyErr_Fetch(&type, &value, &tb);
            PyErr_NormalizeException(&type, &value, &tb);
            PyObject *msg = value ? PyObject_Str(value) : NULL;
            Py_XDECREF(type);
            Py_XDECREF(value);
            Py_XDECREF(tb);
            if (msg) {
                PyErr_Format(error, "bad arena placement: %U", msg);
                Py_DECREF(msg);
            }
        }
        return 0;
    }
    if (PyList_SetItem(res, 0, r) < 0) return 0; /* steals r */
    PyObject *chunks = OBJ_GET(op, chunks);
    if (!chunks) return 0;
    int good = PyList_Check(chunks) && PyList_Check(parts);
    if (!good) PyErr_SetString(PyExc_TypeError, "chunks and chunk sums are lists");
    Py_ssize_t n = good ? PyList_GET_SIZE(chunks) : 0;
    if (good && PyList_GET_SIZE(parts) < n) n = PyList_GET_SIZE(parts); /* zip() */
    good = good && OBJ_SET_LL(op, t0, t0) == 0 && OBJ_SET_BOOL(op, via_t0, 1) == 0 && OBJ_SET(op, checksum, whole) == 0;
    for (Py_ssize_t j = 0; good && j < n; j++) {
        PyObject *c = PyList_GET_ITEM(chunks, j), *s = PyList_GET_ITEM(parts, j);
        if (IS_CHUNK_PLAN(c)) Py_XSETREF(((ChunkPlanObject *)c)->checksum, Py_NewRef(s));
        else good = PyObject_SetAttrString(c, "checksum", s) == 0;
    }
    Py_DECREF(chunks);
    return good;
}

/* Write back state[k] = v. */
static int state_set(PyObject *state, Py_ssize_t k, long long v) {
    PyObject *x = PyLong_FromLongLong(v);
    return x ? PyList_SetItem(state, k, x) : -1;
}

/* place_items(items, at, nl, stripe_unit, segment_size, nstripes, state, open_seg, segs, touched,
               segment_for, new_hasher, out, carve=None, res=None, error=ValueError) -> None
   (see kvfs._native_py.place_items) */
PyObject *kv_place_items(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *items, *state, *open_seg, *segs, *touched, *segment_for, *new_hasher, *out;
    PyObject *carve = Py_None, *res = Py_None, *error = PyExc_ValueError;
    Py_ssize_t at;
    long long nl, su, segment_size, nstripes;
    if (!PyArg_ParseTuple(args, "O!nLLLLO!O!OO!OOO!|OOO", &PyList_Type, &items, &at, &nl, &su, &segment_size,
                          &nstripes, &PyList_Type, &state, &PyDict_Type, &open_seg, &segs, &PySet_Type, &touched,
                          &segment_for, &new_hasher, &PyList_Type, &out, &carve, &res, &error))
        return NULL;
    if (!S_SEG && !(INTERN(S_END, "end") && INTERN(S_RESERVED, "reserved") && INTERN(S_SEG, "seg"))) return NULL;
    if (su < 1 || nstripes < 1 || at < 0 || PyList_GET_SIZE(state) != 3) {
        PyErr_SetString(PyExc_ValueError, "stripe_unit and nstripes must be positive, state [seq, rr, used]");
        return NULL;
    }
    if (!PyExceptionClass_Check(error)) {
        PyErr_SetString(PyExc_TypeError, "error must be an exception class");
        return NULL;
    }
    long long seq = PyLong_AsLongLong(PyList_GET_ITEM(state, 0));
    long long rr = PyErr_Occurred() ? 0 : PyLong_AsLongLong(PyList_GET_ITEM(state, 1));
    long long used = PyErr_Occurred() ? 0 : PyLong_AsLongLong(PyList_GET_ITEM(state, 2));
    if (PyErr_Occurred()) return NULL;
    PyObject *empty = PyBytes_FromStringAndSize(NULL, 0);
    if (!empty) return NULL;
    int good = 1;
    for (Py_ssize_t x = 0; good && x < PyList_GET_SIZE(items); x++) {
        PyObject *it = PyList_GET_ITEM(items, x);
        if (it == Py_None) {
            good = PyList_Append(out, Py_None) == 0;
            continue;
        }
        if (!PyTuple_Check(it) || PyTuple_GET_SIZE(it) < at + 4) {
            PyErr_SetString(PyExc_TypeError, "an item is a tuple (..., ok, key, size, meta, ...)");
            good = 0;
            break;
        }
        PyObject *ok = PyTuple_GET_ITEM(it, at), *key = PyTuple_GET_ITEM(it, at + 1),
                 *meta = PyTuple_GET_ITEM(it, at + 3);
        long long size = PyLong_AsLongLong(PyTuple_GET_ITEM(it, at + 2));
        if (size == -1 && PyErr_Occurred()) {
            good = 0;
            break;
        }
        if (!PyBytes_Check(ok)) {
            PyErr_SetString(PyExc_TypeError, "an object key is bytes");
            good = 0;
            break;
        }
        long long kl = PyBytes_GET_SIZE(ok) - nl - 1, start = rr;
        seq++;
        rr = (rr + 1) % nstripes;
        long long n = size <= su ? 1 : (size + su - 1) / su;
        PyObject *chunks = PyList_New((Py_ssize_t)n);
        if (!chunks) {
            good = 0;
            break;
        }
        for (long long i = 0; good && i < n; i++) {
            long long stripe = (start + i) % nstripes;
            long long length = n == 1 ? size : (su < size - i * su ? su : size - i * su);
            long long grew = 0, sid = 0, end = 0;
            PyObject *seg =
                segment(open_seg, segs, segment_for, stripe, record_span(nl, kl, length), segment_size, &end);
            PyObject *ch = seg ? place_chunk(seg, end, stripe, nl, kl, i, length, su, empty, &grew, &sid) : NULL;
            Py_XDECREF(seg);
            used += grew;
            PyObject *s = ch ? PyLong_FromLongLong(sid) : NULL;
            good = s && PySet_Add(touched, s) == 0;
            Py_XDECREF(s);
            if (ch) PyList_SET_ITEM(chunks, (Py_ssize_t)i, ch);
        }
        if (!good) { /* its chunks so far stay reserved, as with the twin's: the caller's abort cannot see them */
            Py_DECREF(chunks);
            break;
        }
        PyObject *op = kv_obj_plan(key, size, meta, seq - 1, chunks, ok, empty);
        Py_DECREF(chunks);
        if (op && n > 1) {
            PyObject *h = PyObject_CallNoArgs(new_hasher);
            if (h) Py_SETREF(((ObjPlanObject *)op)->hasher, h);
            else Py_CLEAR(op);
        }
        good = op && PyList_Append(out, op) == 0;
        if (good && carve != Py_None) good = carve_item(op, it, at, size, carve, res, error);
        Py_XDECREF(op);
    }
    Py_DECREF(empty);
    /* what was done stays done, also after an error (the caller aborts the plan) */
    PyObject *exc = NULL, *val = NULL, *tb = NULL;
    PyErr_Fetch(&exc, &val, &tb);
    int wrote = state_set(state, 0, seq) == 0 && state_set(state, 1, rr) == 0 && state_set(state, 2, used) == 0;
    if (exc) PyErr_Restore(exc, val, tb);
    if (!good || !wrote) return NULL;
    Py_RETURN_NONE;
}

/* place_chunk(seg, stripe, nl, kl, i, length, stripe_unit) -> ChunkPlan (see kvfs._native_py.place_chunk) */
PyObject *kv_place_chunk(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *seg;
    long long stripe, nl, kl, i, length, su, grew, sid, start;
    if (!PyArg_ParseTuple(args, "OLLLLLL", &seg, &stripe, &nl, &kl, &i, &length, &su)) return NULL;
    if (!S_SEG && !(INTERN(S_END, "end") && INTERN(S_RESERVED, "reserved") && INTERN(S_SEG, "seg"))) return NULL;
    if (!attr_ll(seg, S_END, &start)) return NULL;
    PyObject *empty = PyBytes_FromStringAndSize(NULL, 0);
    PyObject *ch = empty ? place_chunk(seg, start, stripe, nl, kl, i, length, su, empty, &grew, &sid) : NULL;
    Py_XDECREF(empty);
    return ch;
}
