/*
 * The per-object encodings of a put's commit, in C: the LMDB index entry
 * (msgpack) and the record header a chunk is written behind. Each was a
 * microsecond or more of Python per object on the daemon's hot path (the
 * write-back of every T0 put); here they are a fraction of that. Their
 * Python twins (kvfs/_native_py.py) are the definitions: the bytes must
 * be identical (tests/test_native.py compares them).
 */
#include "plan_fields.h"
#include <string.h>

#define XXH_INLINE_ALL
#include "vendor/xxhash.h"

/* ---- msgpack, as msgpack-python's packb(obj, use_bin_type=True) writes it,
   for what an index entry holds: ints, floats, bytes, None, lists/tuples. */

typedef struct {
    char *p; /* stack until it outgrows it, then PyMem */
    Py_ssize_t n, cap;
    char *stack;
} out_t;

static int grow(out_t *o, Py_ssize_t more) {
    if (o->n + more <= o->cap) return 1;
    Py_ssize_t cap = o->cap * 2 > o->n + more ? o->cap * 2 : o->n + more + 64;
    char *p = o->p == o->stack ? PyMem_Malloc((size_t)cap) : PyMem_Realloc(o->p, (size_t)cap);
    if (!p) {
        PyErr_NoMemory();
        return 0;
    }
    if (o->p == o->stack) memcpy(p, o->stack, (size_t)o->n);
    o->p = p;
    o->cap = cap;
    return 1;
}

static int put_be(out_t *o, unsigned char tag, uint64_t v, int bytes) {
    if (!grow(o, 1 + bytes)) return 0;
    o->p[o->n++] = (char)tag;
    for (int i = bytes - 1; i >= 0; i--) o->p[o->n++] = (char)(v >> (8 * i));
    return 1;
}

static int pack_obj(out_t *o, PyObject *x, int depth);

static int pack_ll(out_t *o, long long v) {
    if (v >= 0) {
        if (v < 0x80) return put_be(o, (unsigned char)v, 0, 0);
        if (v <= 0xff) return put_be(o, 0xcc, (uint64_t)v, 1);
        if (v <= 0xffff) return put_be(o, 0xcd, (uint64_t)v, 2);
        if (v <= 0xffffffffLL) return put_be(o, 0xce, (uint64_t)v, 4);
        return put_be(o, 0xcf, (uint64_t)v, 8);
    }
    if (v >= -32) return put_be(o, (unsigned char)(int8_t)v, 0, 0);
    if (v >= -128) return put_be(o, 0xd0, (uint64_t)(uint8_t)(int8_t)v, 1);
    if (v >= -32768) return put_be(o, 0xd1, (uint64_t)(uint16_t)(int16_t)v, 2);
    if (v >= -2147483648LL) return put_be(o, 0xd2, (uint64_t)(uint32_t)(int32_t)v, 4);
    return put_be(o, 0xd3, (uint64_t)v, 8);
}

static int pack_int(out_t *o, PyObject *x) {
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(x, &overflow);
    if (v == -1 && PyErr_Occurred()) return 0;
    if (overflow > 0) {
        unsigned long long u = PyLong_AsUnsignedLongLong(x);
        if (u == (unsigned long long)-1 && PyErr_Occurred()) return 0;
        return put_be(o, 0xcf, u, 8);
    }
    if (overflow < 0) {
        PyErr_SetString(PyExc_OverflowError, "int too small to pack");
        return 0;
    }
    return pack_ll(o, v);
}

static int pack_obj(out_t *o, PyObject *x, int depth) {
    if (depth > 8) {
        PyErr_SetString(PyExc_ValueError, "nested too deep");
        return 0;
    }
    if (x == Py_None) return put_be(o, 0xc0, 0, 0);
    if (x == Py_True || x == Py_False) return put_be(o, x == Py_True ? 0xc3 : 0xc2, 0, 0);
    if (PyLong_Check(x)) return pack_int(o, x); /* bool is handled above */
    if (PyFloat_CheckExact(x)) {
        double d = PyFloat_AS_DOUBLE(x);
        uint64_t u;
        memcpy(&u, &d, 8);
        return put_be(o, 0xcb, u, 8);
    }
    if (PyBytes_CheckExact(x)) {
        Py_ssize_t n = PyBytes_GET_SIZE(x);
        int ok = n <= 0xff ? put_be(o, 0xc4, (uint64_t)n, 1)
                 : n <= 0xffff ? put_be(o, 0xc5, (uint64_t)n, 2)
                 : n <= 0xffffffffLL ? put_be(o, 0xc6, (uint64_t)n, 4) : 0;
        if (!ok) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "bytes too long to pack");
            return 0;
        }
        if (!grow(o, n)) return 0;
        memcpy(o->p + o->n, PyBytes_AS_STRING(x), (size_t)n);
        o->n += n;
        return 1;
    }
    if (PyList_CheckExact(x) || PyTuple_CheckExact(x)) {
        Py_ssize_t n = PySequence_Fast_GET_SIZE(x);
        int ok = n <= 15 ? put_be(o, (unsigned char)(0x90 | n), 0, 0)
                 : n <= 0xffff ? put_be(o, 0xdc, (uint64_t)n, 2) : put_be(o, 0xdd, (uint64_t)n, 4);
        if (!ok) return 0;
        PyObject **items = PySequence_Fast_ITEMS(x);
        for (Py_ssize_t i = 0; i < n; i++)
            if (!pack_obj(o, items[i], depth + 1)) return 0;
        return 1;
    }
    PyErr_Format(PyExc_TypeError, "cannot pack %s here", Py_TYPE(x)->tp_name);
    return 0;
}

/* pack_entry(size, checksum, seq, created, atime, meta, rows) -> bytes:
   msgpack.packb([size, checksum, seq, created, atime, meta, rows], use_bin_type=True). */
PyObject *kv_pack_entry(PyObject *self, PyObject *args) {
    (void)self;
    if (PyTuple_GET_SIZE(args) != 7) {
        PyErr_SetString(PyExc_TypeError, "pack_entry takes 7 arguments");
        return NULL;
    }
    char stack[512];
    out_t o = {stack, 0, sizeof stack, stack};
    int ok = put_be(&o, 0x97, 0, 0);
    for (Py_ssize_t i = 0; ok && i < 7; i++) ok = pack_obj(&o, PyTuple_GET_ITEM(args, i), 0);
    PyObject *r = ok ? PyBytes_FromStringAndSize(o.p, o.n) : NULL;
    if (o.p != stack) PyMem_Free(o.p);
    return r;
}

/* ---- record headers (kvfs/format.py): "<4sBBHHHIIIQQQQ16sQ", the last
   field the xxh3-64 of the 72 bytes before it and the names after it. */

#define HDR_BODY 72
#define HDR_SIZE 80

static void le(unsigned char *p, uint64_t v, int bytes) {
    for (int i = 0; i < bytes; i++) p[i] = (unsigned char)(v >> (8 * i));
}

void kv_fill_record_head(unsigned char *p, const char *ns, Py_ssize_t nl, const char *key, Py_ssize_t kl,
                         uint32_t chunk_idx, uint32_t chunk_cnt, uint64_t length, uint64_t obj_size,
                         uint64_t chunk_off, uint64_t seq, const char *checksum16) {
    memcpy(p, "KVr1", 4);
    p[4] = 1; /* FORMAT_VERSION */
    p[5] = 0; /* KIND_CHUNK */
    le(p + 6, (uint64_t)nl, 2);
    le(p + 8, (uint64_t)kl, 2);
    le(p + 10, 0, 2);
    le(p + 12, chunk_idx, 4);
    le(p + 16, chunk_cnt, 4);
    le(p + 20, 0, 4);
    le(p + 24, length, 8);
    le(p + 32, obj_size, 8);
    le(p + 40, chunk_off, 8);
    le(p + 48, seq, 8);
    memcpy(p + 56, checksum16, 16);
    memcpy(p + HDR_SIZE, ns, (size_t)nl);
    memcpy(p + HDR_SIZE + nl, key, (size_t)kl);
    XXH3_state_t st;
    XXH3_64bits_reset(&st);
    XXH3_64bits_update(&st, p, HDR_BODY);
    XXH3_64bits_update(&st, p + HDR_SIZE, (size_t)(nl + kl));
    le(p + HDR_BODY, XXH3_64bits_digest(&st), 8);
}

/* record_head(names, ns_len, chunk_idx, chunk_cnt, length, obj_size,
   chunk_off, seq, checksum, pad) -> header + names + pad zero bytes: the
   bytes from a record's header to its payload. */
PyObject *kv_record_head(PyObject *self, PyObject *args) {
    (void)self;
    const char *names, *sum;
    Py_ssize_t nlen, slen, pad;
    unsigned int ns_len, cidx, ccnt;
    unsigned long long length, osize, coff, seq;
    if (!PyArg_ParseTuple(args, "y#IIIKKKKy#n", &names, &nlen, &ns_len, &cidx, &ccnt, &length, &osize, &coff, &seq,
                          &sum, &slen, &pad))
        return NULL;
    if (ns_len > (unsigned)nlen || nlen - ns_len > 0xffff || ns_len > 0xffff || slen != 16 || pad < 0 || pad > 65536) {
        PyErr_SetString(PyExc_ValueError, "bad record header fields");
        return NULL;
    }
    PyObject *r = PyBytes_FromStringAndSize(NULL, HDR_SIZE + nlen + pad);
    if (!r) return NULL;
    unsigned char *p = (unsigned char *)PyBytes_AS_STRING(r);
    kv_fill_record_head(p, names, ns_len, names + ns_len, nlen - ns_len, cidx, ccnt, length, osize, coff, seq, sum);
    memset(p + HDR_SIZE + nlen, 0, (size_t)pad);
    return r;
}

/* ---- index_rows: the index entries of a write-back batch, one call ----- */

/* An object's index entry: pack_entry(size, checksum, seq, now, now, meta,
   rows) with rows [stripe, seg, payload_off, length, sum, header_off,
   end - header_off] per chunk, written straight from its plan's fields;
   segkeys gets its chunks' segobj keys (>QQ: seg, header_off). */
static PyObject *op_entry(PyObject *op, double now, PyObject *segkeys, PyObject *ok) {
    char stack[512];
    out_t o = {stack, 0, sizeof stack, stack};
    PyObject *sum = NULL, *meta = NULL, *chunks = NULL, *value = NULL;
    long long size, seq;
    int good = OBJ_LL(op, size, &size) && OBJ_LL(op, seq, &seq) && (sum = OBJ_GET(op, checksum)) &&
               (meta = OBJ_GET(op, meta)) && (chunks = OBJ_GET(op, chunks));
    if (good && (!PyList_Check(chunks) || !PyBytes_CheckExact(sum) || !(meta == Py_None || PyBytes_CheckExact(meta)))) {
        PyErr_SetString(PyExc_TypeError, "a plan's chunks are a list, its checksum and meta bytes");
        good = 0;
    }
    uint64_t d;
    good = good && put_be(&o, 0x97, 0, 0) && pack_ll(&o, size) && pack_obj(&o, sum, 0) && pack_ll(&o, seq) &&
           (memcpy(&d, &now, 8), put_be(&o, 0xcb, d, 8)) && put_be(&o, 0xcb, d, 8) && pack_obj(&o, meta, 0);
    Py_ssize_t n = good ? PyList_GET_SIZE(chunks) : 0;
    good = good && (n <= 15 ? put_be(&o, (unsigned char)(0x90 | n), 0, 0) : put_be(&o, 0xdc, (uint64_t)n, 2));
    for (Py_ssize_t j = 0; good && j < n; j++) {
        PyObject *c = PyList_GET_ITEM(chunks, j);
        long long stripe, seg, poff, length, hdr, end;
        PyObject *csum = NULL;
        good = CHUNK_LL(c, stripe, &stripe) && CHUNK_LL(c, seg, &seg) && CHUNK_LL(c, payload_off, &poff) &&
               CHUNK_LL(c, length, &length) && CHUNK_LL(c, hdr_off, &hdr) && CHUNK_LL(c, end, &end) &&
               (csum = CHUNK_GET(c, checksum)) && put_be(&o, 0x97, 0, 0) && pack_ll(&o, stripe) &&
               pack_ll(&o, seg) && pack_ll(&o, poff) && pack_ll(&o, length) && pack_obj(&o, csum, 0) &&
               pack_ll(&o, hdr) && pack_ll(&o, end - hdr);
        Py_XDECREF(csum);
        if (good) {
            unsigned char k[16];
            for (int b = 0; b < 8; b++) {
                k[b] = (unsigned char)((uint64_t)seg >> (56 - 8 * b));
                k[8 + b] = (unsigned char)((uint64_t)hdr >> (56 - 8 * b));
            }
            PyObject *key = PyBytes_FromStringAndSize((const char *)k, 16);
            PyObject *pair = key ? PyTuple_Pack(2, key, ok) : NULL;
            good = pair && PyList_Append(segkeys, pair) == 0;
            Py_XDECREF(key);
            Py_XDECREF(pair);
        }
    }
    if (good) value = PyBytes_FromStringAndSize(o.p, o.n);
    if (o.p != stack) PyMem_Free(o.p);
    Py_XDECREF(sum);
    Py_XDECREF(meta);
    Py_XDECREF(chunks);
    return value;
}

/* index_rows(ops, live, now) -> ([(object key, entry)], [(segobj key, object key)], [owner])
   The index rows of a batch's live items (live[i] false: skipped), each
   entry as encode_entry would write it; owner[j] is the index in the first
   list of the item segobj row j belongs to. */
PyObject *kv_index_rows(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *ops, *live;
    double now;
    if (!PyArg_ParseTuple(args, "O!O!d", &PyList_Type, &ops, &PyList_Type, &live, &now)) return NULL;
    if (PyList_GET_SIZE(ops) != PyList_GET_SIZE(live)) {
        PyErr_SetString(PyExc_ValueError, "one live flag per item");
        return NULL;
    }
    PyObject *pairs = PyList_New(0), *segs = PyList_New(0), *owner = PyList_New(0);
    if (!pairs || !segs || !owner) goto fail;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(ops); i++) {
        int on = PyObject_IsTrue(PyList_GET_ITEM(live, i));
        if (on < 0) goto fail;
        if (!on) continue;
        PyObject *op = PyList_GET_ITEM(ops, i);
        PyObject *ok = OBJ_GET(op, ok);
        if (!ok) goto fail;
        Py_ssize_t before = PyList_GET_SIZE(segs);
        PyObject *v = op_entry(op, now, segs, ok);
        PyObject *pair = v ? PyTuple_Pack(2, ok, v) : NULL;
        Py_DECREF(ok);
        Py_XDECREF(v);
        int good = pair && PyList_Append(pairs, pair) == 0;
        Py_XDECREF(pair);
        for (Py_ssize_t j = before; good && j < PyList_GET_SIZE(segs); j++) {
            PyObject *ix = PyLong_FromSsize_t(PyList_GET_SIZE(pairs) - 1);
            good = ix && PyList_Append(owner, ix) == 0;
            Py_XDECREF(ix);
        }
        if (!good) goto fail;
    }
    return Py_BuildValue("(NNN)", pairs, segs, owner);
fail:
    Py_XDECREF(pairs);
    Py_XDECREF(segs);
    Py_XDECREF(owner);
    return NULL;
}
