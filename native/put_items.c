/*
 * A T0 put batch's items, checked in one pass (kvfsd.puts.prepare_placed):
 * the shape of each [key, size, meta, arena offset, sums] item, its key's
 * rules, its size, and for each item that is new (not stored, not repeated
 * in the batch) its object key and its client checksums. In Python this was
 * four passes (the server's, normalize_keys, prepare_put's, set_client_sums)
 * of about 3 us per object on the daemon's event loop.
 *
 * The Python twin (kvfs/_native_py.py: t0_items) is the definition; the
 * tests hold both to the same results and the same errors.
 */
#include "plan_fields.h"

/* A key C can take as it is: str, 1-200 characters, all printable ASCII,
   no '/', not "." or "..". Anything else goes to Python's normalize_key
   (which accepts other printable text and bytes keys, or raises). */
static int plain_str_key(PyObject *k) {
    if (!PyUnicode_Check(k) || !PyUnicode_IS_ASCII(k)) return 0;
    Py_ssize_t n = PyUnicode_GET_LENGTH(k);
    if (n < 1 || n > 200) return 0;
    const unsigned char *s = PyUnicode_1BYTE_DATA(k);
    if (s[0] == '.' && (n == 1 || (n == 2 && s[1] == '.'))) return 0;
    for (Py_ssize_t i = 0; i < n; i++)
        if (s[i] < 0x20 || s[i] > 0x7e || s[i] == '/') return 0;
    return 1;
}

static int sum16(PyObject *o) { return PyBytes_CheckExact(o) && PyBytes_GET_SIZE(o) == 16; }

/* t0_items(items, nsp, lru, stripe_unit, span0, normalize_key, encode_meta, error)
   -> (fresh, sizes, need)
   fresh: per new item (index, object key, key, size, meta, arena offset,
   object sum, [chunk sums]); sizes: every item's size; need: the bytes of
   T1 space the new items take at most (record_span: span0 + key bytes +
   length per chunk). nsp is the namespace's utf-8 and a NUL. Bad items
   raise error (kvfs.errors.InvalidArgument) or what normalize_key and
   encode_meta raise. */
PyObject *kv_t0_items(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *items, *nsp, *lru, *normalize, *encode_meta, *error;
    long long su, span0;
    if (!PyArg_ParseTuple(args, "O!SOLLOOO", &PyList_Type, &items, &nsp, &lru, &su, &span0, &normalize, &encode_meta,
                          &error))
        return NULL;
    if (su < 1) {
        PyErr_SetString(PyExc_ValueError, "stripe_unit must be positive");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(items);
    PyObject *fresh = PyList_New(0), *sizes = PyList_New(n), *seen = PySet_New(NULL);
    long long need = 0;
    if (!fresh || !sizes || !seen) goto fail;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *it = PyList_GET_ITEM(items, i);
        if (!PyList_CheckExact(it) || PyList_GET_SIZE(it) != 5) {
            PyErr_SetString(error, "put_t0 items are [key, size, meta, arena offset, sums]");
            goto fail;
        }
        PyObject *key = PyList_GET_ITEM(it, 0), *size = PyList_GET_ITEM(it, 1), *meta = PyList_GET_ITEM(it, 2),
                 *off = PyList_GET_ITEM(it, 3), *sums = PyList_GET_ITEM(it, 4);
        if (!PyLong_CheckExact(off)) { /* (bool is not int here) */
            PyErr_SetString(error, "arena offsets must be ints");
            goto fail;
        }
        long long sz = PyLong_CheckExact(size) ? PyLong_AsLongLong(size) : -1;
        if (sz < 0) {
            PyErr_Clear();
            PyObject *r = PyObject_Repr(key);
            PyErr_Format(error, "size of %U must be a non-negative int", r ? r : key);
            Py_XDECREF(r);
            goto fail;
        }
        Py_INCREF(size);
        PyList_SET_ITEM(sizes, i, size);
        PyObject *k = plain_str_key(key) ? (Py_INCREF(key), key) : PyObject_CallOneArg(normalize, key);
        if (!k) goto fail;
        PyObject *kb = PyUnicode_AsUTF8String(k);
        PyObject *ok = kb ? PyBytes_FromStringAndSize(NULL, PyBytes_GET_SIZE(nsp) + PyBytes_GET_SIZE(kb)) : NULL;
        if (!ok) {
            Py_DECREF(k);
            Py_XDECREF(kb);
            goto fail;
        }
        memcpy(PyBytes_AS_STRING(ok), PyBytes_AS_STRING(nsp), (size_t)PyBytes_GET_SIZE(nsp));
        memcpy(PyBytes_AS_STRING(ok) + PyBytes_GET_SIZE(nsp), PyBytes_AS_STRING(kb), (size_t)PyBytes_GET_SIZE(kb));
        Py_ssize_t kl = PyBytes_GET_SIZE(kb);
        Py_DECREF(kb);
        int dup = PySet_Contains(seen, ok);
        int there = dup == 0 ? PyDict_Contains(lru, ok) : 0;
        if (dup < 0 || there < 0) {
            Py_DECREF(k);
            Py_DECREF(ok);
            goto fail;
        }
        if (dup || there) {
            Py_DECREF(k);
            Py_DECREF(ok);
            continue;
        }
        /* a new item: its sums must be [16-byte object sum, [16-byte sum per chunk]] */
        long long nchunks = sz <= su ? 1 : (sz + su - 1) / su;
        PyObject *whole = NULL, *parts = NULL;
        int good = PyList_CheckExact(sums) && PyList_GET_SIZE(sums) == 2;
        if (good) {
            whole = PyList_GET_ITEM(sums, 0);
            parts = PyList_GET_ITEM(sums, 1);
            good = sum16(whole) && PyList_CheckExact(parts) && PyList_GET_SIZE(parts) == nchunks;
            for (Py_ssize_t j = 0; good && j < PyList_GET_SIZE(parts); j++) good = sum16(PyList_GET_ITEM(parts, j));
        }
        if (!good) {
            Py_DECREF(k);
            Py_DECREF(ok);
            PyErr_SetString(error, "a checksum entry is [16-byte object sum, [16-byte chunk sums]]");
            goto fail;
        }
        PyObject *m = meta == Py_None ? (Py_INCREF(Py_None), Py_None) : PyObject_CallOneArg(encode_meta, meta);
        if (!m) {
            Py_DECREF(k);
            Py_DECREF(ok);
            goto fail;
        }
        PyObject *t = steal_seq(0, 8, (PyObject *[]){PyLong_FromSsize_t(i), ok, k, PyLong_FromLongLong(sz), m,
                                                      Py_NewRef(off), Py_NewRef(whole), Py_NewRef(parts)});
        if (!t) goto fail;
        int bad = PySet_Add(seen, PyTuple_GET_ITEM(t, 1)) < 0 || PyList_Append(fresh, t) < 0;
        Py_DECREF(t);
        if (bad) goto fail;
        need += nchunks * (span0 + kl) + sz;
    }
    Py_DECREF(seen);
    return Py_BuildValue("(NNL)", fresh, sizes, need);
fail:
    Py_XDECREF(fresh);
    Py_XDECREF(sizes);
    Py_XDECREF(seen);
    return NULL;
}
