/*
 * The arena's extent allocator in C (kvfsd.arena_alloc.PyArenaAllocator is
 * its twin and its definition; tests/test_arena_alloc.py runs both).
 *
 * Every T0 put carves its value out of a client's reservation and every
 * eviction frees one: in Python each cost about a microsecond of the
 * daemon's single interpreter (a dict and two sorted lists of tuples). The
 * same algorithm here: best fit over free extents sorted by (length,
 * offset), coalescing through the free extents sorted by offset, and the
 * extents handed out in a hash table (offset -> rounded length).
 *
 * Invariants (as the twin's): free extents never overlap or touch;
 * used + free == size; an offset handed out is not handed out again until
 * it is freed. Not thread-safe: the engine's lock guards it (and the GIL).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define SMALL_ALIGN 64ULL     /* kvfs.format.ARENA_SMALL_ALIGN */
#define LARGE_ALIGN 4096ULL   /* kvfs.format.ARENA_LARGE_ALIGN */
#define LARGE_MIN (64 * 1024ULL) /* kvfs.format.ARENA_LARGE_MIN */

typedef struct {
    uint64_t a, b; /* by_off: (offset, length); by_size: (length, offset) */
} Pair;

typedef struct {
    Pair *v;
    Py_ssize_t n, cap;
} Sorted;

typedef struct {
    PyObject_HEAD
    uint64_t size, used;
    Sorted by_off, by_size;
    uint64_t *keys, *vals; /* open addressing, linear probing; key = offset + 1, 0: empty */
    size_t cap, count;
    PyObject *full_error;
} ArenaObject;

static inline uint64_t up(uint64_t x, uint64_t a) { return (x + a - 1) & ~(a - 1); }

static inline void rounded(uint64_t n, uint64_t *need, uint64_t *align) {
    *align = n >= LARGE_MIN ? LARGE_ALIGN : SMALL_ALIGN;
    *need = up(n ? n : 1, *align);
}

/* ---- sorted arrays of pairs ---- */

static inline int pair_lt(Pair x, Pair y) { return x.a < y.a || (x.a == y.a && x.b < y.b); }

static Py_ssize_t lower(const Sorted *s, Pair p) {
    Py_ssize_t lo = 0, hi = s->n;
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) / 2;
        if (pair_lt(s->v[mid], p)) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

static int sorted_insert(Sorted *s, Pair p) {
    if (s->n == s->cap) {
        Py_ssize_t cap = s->cap ? s->cap * 2 : 64;
        Pair *v = PyMem_Realloc(s->v, (size_t)cap * sizeof(Pair));
        if (!v) {
            PyErr_NoMemory();
            return 0;
        }
        s->v = v;
        s->cap = cap;
    }
    Py_ssize_t i = lower(s, p);
    memmove(s->v + i + 1, s->v + i, (size_t)(s->n - i) * sizeof(Pair));
    s->v[i] = p;
    s->n++;
    return 1;
}

static void sorted_remove(Sorted *s, Pair p) {
    Py_ssize_t i = lower(s, p);
    if (i < s->n && s->v[i].a == p.a && s->v[i].b == p.b) {
        memmove(s->v + i, s->v + i + 1, (size_t)(s->n - i - 1) * sizeof(Pair));
        s->n--;
    }
}

/* ---- the used table ---- */

static inline size_t slot_of(const ArenaObject *a, uint64_t key) {
    uint64_t h = key * 0x9E3779B97F4A7C15ULL;
    return (size_t)(h >> 17) & (a->cap - 1);
}

static int used_grow(ArenaObject *a) {
    size_t cap = a->cap ? a->cap * 2 : 1024;
    uint64_t *keys = PyMem_Calloc(cap, sizeof(uint64_t)), *vals = PyMem_Calloc(cap, sizeof(uint64_t));
    if (!keys || !vals) {
        PyMem_Free(keys);
        PyMem_Free(vals);
        PyErr_NoMemory();
        return 0;
    }
    uint64_t *ok = a->keys, *ov = a->vals;
    size_t ocap = a->cap;
    a->keys = keys;
    a->vals = vals;
    a->cap = cap;
    for (size_t i = 0; i < ocap; i++) {
        if (!ok[i]) continue;
        size_t j = slot_of(a, ok[i]);
        while (keys[j]) j = (j + 1) & (cap - 1);
        keys[j] = ok[i];
        vals[j] = ov[i];
    }
    PyMem_Free(ok);
    PyMem_Free(ov);
    return 1;
}

static int used_set(ArenaObject *a, uint64_t off, uint64_t len) {
    if ((a->count + 1) * 2 > a->cap && !used_grow(a)) return 0;
    uint64_t key = off + 1;
    size_t j = slot_of(a, key);
    while (a->keys[j] && a->keys[j] != key) j = (j + 1) & (a->cap - 1);
    if (!a->keys[j]) {
        a->keys[j] = key;
        a->count++;
    }
    a->vals[j] = len;
    return 1;
}

/* the length handed out at off, or 0 if none (every length is > 0) */
static uint64_t used_get(const ArenaObject *a, uint64_t off) {
    if (!a->cap) return 0;
    uint64_t key = off + 1;
    size_t j = slot_of(a, key);
    while (a->keys[j]) {
        if (a->keys[j] == key) return a->vals[j];
        j = (j + 1) & (a->cap - 1);
    }
    return 0;
}

/* remove off (backward-shift deletion: no tombstones); its length, or 0 */
static uint64_t used_pop(ArenaObject *a, uint64_t off) {
    if (!a->cap) return 0;
    uint64_t key = off + 1;
    size_t mask = a->cap - 1, j = slot_of(a, key);
    while (a->keys[j] && a->keys[j] != key) j = (j + 1) & mask;
    if (!a->keys[j]) return 0;
    uint64_t len = a->vals[j];
    size_t i = j;
    for (;;) {
        a->keys[i] = 0;
        size_t k = i;
        for (;;) {
            k = (k + 1) & mask;
            if (!a->keys[k]) {
                a->count--;
                return len;
            }
            size_t home = slot_of(a, a->keys[k]);
            /* move k back to i unless its home lies cyclically in (i, k] */
            if (i <= k ? (home <= i || home > k) : (home <= i && home > k)) break;
        }
        a->keys[i] = a->keys[k];
        a->vals[i] = a->vals[k];
        i = k;
    }
}

/* ---- free extents ---- */

static int add_free(ArenaObject *a, uint64_t off, uint64_t len) {
    if (!sorted_insert(&a->by_off, (Pair){off, len})) return 0;
    if (!sorted_insert(&a->by_size, (Pair){len, off})) {
        sorted_remove(&a->by_off, (Pair){off, len});
        return 0;
    }
    return 1;
}

static void del_free(ArenaObject *a, uint64_t off, uint64_t len) {
    sorted_remove(&a->by_off, (Pair){off, len});
    sorted_remove(&a->by_size, (Pair){len, off});
}

static uint64_t largest(const ArenaObject *a) { return a->by_size.n ? a->by_size.v[a->by_size.n - 1].a : 0; }

/* free the extent [off, off+len) that was used: coalesce and record it */
static int release(ArenaObject *a, uint64_t off, uint64_t len) {
    a->used -= len;
    Py_ssize_t i = lower(&a->by_off, (Pair){off, 0});
    if (i < a->by_off.n && a->by_off.v[i].a == off + len) {
        uint64_t rl = a->by_off.v[i].b;
        del_free(a, off + len, rl);
        len += rl;
    }
    if (i > 0) {
        Pair prev = a->by_off.v[i - 1];
        if (prev.a + prev.b == off) {
            del_free(a, prev.a, prev.b);
            off = prev.a;
            len += prev.b;
        }
    }
    return add_free(a, off, len);
}

/* ---- the type ---- */

static int arena_init(ArenaObject *a, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"size", "full_error", NULL};
    long long size;
    PyObject *err = PyExc_MemoryError;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "L|O", kwlist, &size, &err)) return -1;
    if (size < 0) {
        PyErr_SetString(PyExc_ValueError, "arena size must be >= 0");
        return -1;
    }
    Py_INCREF(err);
    Py_XSETREF(a->full_error, err);
    a->size = (uint64_t)size - (uint64_t)size % SMALL_ALIGN;
    a->used = 0;
    a->by_off.n = a->by_size.n = 0;
    if (a->size && !add_free(a, 0, a->size)) return -1;
    return 0;
}

static void arena_dealloc(ArenaObject *a) {
    PyMem_Free(a->by_off.v);
    PyMem_Free(a->by_size.v);
    PyMem_Free(a->keys);
    PyMem_Free(a->vals);
    Py_XDECREF(a->full_error);
    Py_TYPE(a)->tp_free((PyObject *)a);
}

static PyObject *arena_rounded_m(PyObject *cls, PyObject *arg) {
    (void)cls;
    long long n = PyLong_AsLongLong(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    uint64_t need, align;
    rounded(n < 0 ? 0 : (uint64_t)n, &need, &align);
    return Py_BuildValue("(KK)", (unsigned long long)need, (unsigned long long)align);
}

static PyObject *arena_alloc_m(ArenaObject *a, PyObject *arg) {
    long long n = PyLong_AsLongLong(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    uint64_t need, align;
    rounded(n < 0 ? 0 : (uint64_t)n, &need, &align);
    for (Py_ssize_t i = lower(&a->by_size, (Pair){need, 0}); i < a->by_size.n; i++) {
        uint64_t len = a->by_size.v[i].a, off = a->by_size.v[i].b;
        uint64_t start = up(off, align);
        if (start + need > off + len) continue;
        del_free(a, off, len);
        uint64_t tail = off + len - (start + need);
        if ((start > off && !add_free(a, off, start - off)) || (tail && !add_free(a, start + need, tail)) ||
            !used_set(a, start, need))
            return NULL;
        a->used += need;
        return PyLong_FromUnsignedLongLong(start);
    }
    PyErr_Format(a->full_error, "no free extent of %llu bytes (free %llu in %zd extents, largest %llu)",
                 (unsigned long long)need, (unsigned long long)(a->size - a->used), a->by_off.n,
                 (unsigned long long)largest(a));
    return NULL;
}

static PyObject *arena_free_m(ArenaObject *a, PyObject *arg) {
    unsigned long long off = PyLong_AsUnsignedLongLong(arg);
    if (off == (unsigned long long)-1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError)) return NULL;
        PyErr_Clear();
        return PyErr_Format(PyExc_ValueError, "offset %S is not allocated", arg);
    }
    uint64_t len = used_pop(a, off);
    if (!len) return PyErr_Format(PyExc_ValueError, "offset %S is not allocated", arg);
    if (!release(a, off, len)) return NULL;
    Py_RETURN_NONE;
}

/* free_many(offsets): free of each, in order; the first that fails raises
   (those before it stay freed, as with a loop of free). */
static PyObject *arena_free_many_m(ArenaObject *a, PyObject *offs) {
    PyObject *seq = PySequence_Fast(offs, "offsets are a sequence");
    if (!seq) return NULL;
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
        PyObject *r = arena_free_m(a, PySequence_Fast_GET_ITEM(seq, i));
        if (!r) {
            Py_DECREF(seq);
            return NULL;
        }
        Py_DECREF(r);
    }
    Py_DECREF(seq);
    Py_RETURN_NONE;
}

/* carve(rest, off, n): see the twin. Changes nothing when it raises. */
static PyObject *arena_carve_m(ArenaObject *a, PyObject *args) {
    long long rest_s, off_s, n_s;
    if (!PyArg_ParseTuple(args, "LLL", &rest_s, &off_s, &n_s)) return NULL;
    uint64_t length = rest_s >= 0 ? used_get(a, (uint64_t)rest_s) : 0;
    if (!length) return PyErr_Format(PyExc_ValueError, "no reservation rest at %lld", rest_s);
    uint64_t rest = (uint64_t)rest_s, end = rest + length;
    uint64_t need, align;
    rounded(n_s < 0 ? 0 : (uint64_t)n_s, &need, &align);
    if (off_s < 0 || (uint64_t)off_s % align || (uint64_t)off_s < rest || (uint64_t)off_s + need > end)
        return PyErr_Format(PyExc_ValueError,
                            "%lld bytes at %lld are not inside the reservation [%llu, %llu) on a %llu-byte boundary",
                            n_s, off_s, (unsigned long long)rest, (unsigned long long)end,
                            (unsigned long long)align);
    uint64_t off = (uint64_t)off_s;
    /* room first (the table may grow), so that nothing changes on failure */
    if ((a->count + 3) * 2 > a->cap && !used_grow(a)) return NULL;
    used_pop(a, rest);
    used_set(a, off, need);
    if (off + need < end) used_set(a, off + need, end - off - need);
    if (off > rest && !release(a, rest, off - rest)) return NULL; /* the gap the client skipped */
    return PyLong_FromUnsignedLongLong(off + need);
}

static PyObject *arena_extent_len_m(ArenaObject *a, PyObject *arg) {
    long long off = PyLong_AsLongLong(arg);
    if (off == -1 && PyErr_Occurred()) return NULL;
    uint64_t len = off >= 0 ? used_get(a, (uint64_t)off) : 0;
    if (!len) {
        PyErr_SetObject(PyExc_KeyError, arg);
        return NULL;
    }
    return PyLong_FromUnsignedLongLong(len);
}

static int cmp_pair(const void *x, const void *y) {
    const Pair *p = x, *q = y;
    return p->a < q->a ? -1 : p->a > q->a ? 1 : 0;
}

static PyObject *fail_check(const char *what, unsigned long long at) {
    PyErr_Format(PyExc_AssertionError, "%s at %llu", what, at);
    return NULL;
}

/* check(): assert the invariants (tests) */
static PyObject *arena_check_m(ArenaObject *a, PyObject *unused) {
    (void)unused;
    size_t nu = a->count;
    Pair *all = PyMem_Malloc((nu + (size_t)a->by_off.n + 1) * sizeof(Pair));
    if (!all) return PyErr_NoMemory();
    size_t k = 0;
    for (size_t i = 0; i < a->cap; i++)
        if (a->keys[i]) all[k++] = (Pair){a->keys[i] - 1, a->vals[i] << 1}; /* low bit 0: used */
    uint64_t used = 0, freeb = 0;
    for (size_t i = 0; i < k; i++) used += all[i].b >> 1;
    for (Py_ssize_t i = 0; i < a->by_off.n; i++) {
        all[k++] = (Pair){a->by_off.v[i].a, a->by_off.v[i].b << 1 | 1};
        freeb += a->by_off.v[i].b;
    }
    qsort(all, k, sizeof(Pair), cmp_pair);
    PyObject *r = Py_None;
    uint64_t pos = 0;
    int prev_free = 0;
    for (size_t i = 0; i < k && r; i++) {
        uint64_t o = all[i].a, l = all[i].b >> 1;
        int is_free = (int)(all[i].b & 1);
        if (o < pos) r = fail_check("overlap", o);
        else if (is_free && prev_free && o == pos) r = fail_check("unmerged free extents", o);
        pos = o + l;
        prev_free = is_free;
    }
    PyMem_Free(all);
    if (!r) return NULL;
    if (pos > a->size) return fail_check("past the end", pos);
    if (used != a->used || used + freeb != a->size) return fail_check("used + free != size", used + freeb);
    if (a->by_size.n != a->by_off.n) return fail_check("free lists differ", (unsigned long long)a->by_size.n);
    for (Py_ssize_t i = 0; i < a->by_off.n; i++) {
        Pair p = a->by_off.v[i];
        Py_ssize_t j = lower(&a->by_size, (Pair){p.b, p.a});
        if (j >= a->by_size.n || a->by_size.v[j].a != p.b || a->by_size.v[j].b != p.a)
            return fail_check("a free extent missing by size", p.a);
        if (i && !pair_lt(a->by_off.v[i - 1], p)) return fail_check("free extents out of order", p.a);
    }
    Py_RETURN_NONE;
}

static PyObject *get_size(ArenaObject *a, void *c) {
    (void)c;
    return PyLong_FromUnsignedLongLong(a->size);
}
static PyObject *get_used(ArenaObject *a, void *c) {
    (void)c;
    return PyLong_FromUnsignedLongLong(a->used);
}
static PyObject *get_free_bytes(ArenaObject *a, void *c) {
    (void)c;
    return PyLong_FromUnsignedLongLong(a->size - a->used);
}
static PyObject *get_largest_free(ArenaObject *a, void *c) {
    (void)c;
    return PyLong_FromUnsignedLongLong(largest(a));
}
static PyObject *get_free_extents(ArenaObject *a, void *c) {
    (void)c;
    return PyLong_FromSsize_t(a->by_off.n);
}

static PyGetSetDef arena_getset[] = {
    {"size", (getter)get_size, NULL, NULL, NULL},
    {"used", (getter)get_used, NULL, NULL, NULL},
    {"free_bytes", (getter)get_free_bytes, NULL, NULL, NULL},
    {"largest_free", (getter)get_largest_free, NULL, NULL, NULL},
    {"free_extents", (getter)get_free_extents, NULL, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef arena_methods[] = {
    {"rounded", (PyCFunction)arena_rounded_m, METH_O | METH_STATIC, "(bytes taken, alignment) for a value of n bytes"},
    {"alloc", (PyCFunction)arena_alloc_m, METH_O, "offset of a new extent for n bytes; raises full_error"},
    {"free", (PyCFunction)arena_free_m, METH_O, "give an extent back (coalesced with free neighbours)"},
    {"free_many", (PyCFunction)arena_free_many_m, METH_O, "free of each offset, in order"},
    {"carve", (PyCFunction)arena_carve_m, METH_VARARGS, "carve(rest, off, n): a value's extent out of a reservation"},
    {"extent_len", (PyCFunction)arena_extent_len_m, METH_O, "the rounded length handed out at off"},
    {"check", (PyCFunction)arena_check_m, METH_NOARGS, "assert the invariants (tests)"},
    {NULL, NULL, 0, NULL},
};

PyTypeObject ArenaAllocatorType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "kvfs._native.ArenaAllocator",
    .tp_basicsize = sizeof(ArenaObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "ArenaAllocator(size, full_error=MemoryError): the T0 arena's extent allocator "
              "(kvfsd.arena_alloc.PyArenaAllocator's twin)",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)arena_init,
    .tp_dealloc = (destructor)arena_dealloc,
    .tp_methods = arena_methods,
    .tp_getset = arena_getset,
};
