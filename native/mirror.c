/*
 * The daemon's mirror entry (kvfsd.mirror.MemEntry) as a C type, and the
 * per-object loop of a T0 put's publication.
 *
 * Why: a busy daemon makes one entry per object put and changes it twice
 * more (write-back, eviction); its wire tuple is made only when read. As a
 * Python class with slots an entry cost about 0.8 us to make and 0.3 us per
 * rewire, and every entry was
 * one more object for the cyclic collector. Here it is a fraction of that,
 * and the type is not collected at all: an entry refers only to numbers,
 * bytes, None and tuples of those, so it can never be part of a cycle.
 *
 * The Python twin (kvfs/_native_py.py: MemEntry, t0_publish) is the
 * definition; tests/test_native.py holds the two to the same behaviour.
 */
#include "plan_fields.h"
#include <structmember.h>

typedef struct MemEntryObject {
    PyObject_HEAD
    long long size;
    PyObject *checksum;
    long long seq;
    PyObject *exts; /* ((stripe, seg, payload_off, length, chunk_sum), ...) */
    PyObject *spans; /* ((seg, record bytes), ...); () while dirty */
    PyObject *wire; /* what lookups answer, made on first read after a rewire (NULL until then); never mutated */
    long long t0;   /* arena offset of the T0 copy, -1: none */
    char dirty;     /* in T0 only: write-back to T1 not committed yet */
    char deleted;   /* removed while dirty */
    long long hits;
    PyObject *meta; /* kept only while dirty */
    double created;
    /* T0's lists (T0List below): the list holding this entry (borrowed:
       the list holds the entry, never the other way), its neighbours there,
       and its object key while it is on one */
    PyObject *t0list;
    struct MemEntryObject *t0prev, *t0next;
    PyObject *t0key;
} MemEntryObject;

static PyObject *make_wire(MemEntryObject *e) {
    PyObject *where;
    if (e->t0 < 0) {
        where = Py_NewRef(Py_None);
    } else {
        PyObject *it[2] = {PyLong_FromLongLong(e->t0), Py_NewRef(e->dirty ? Py_False : Py_True)};
        where = steal_seq(0, 2, it);
        if (!where) return NULL;
        untrack(where);
    }
    PyObject *it[5] = {PyLong_FromLongLong(e->size), Py_NewRef(e->checksum ? e->checksum : Py_None),
                       PyLong_FromLongLong(e->seq), Py_NewRef(e->exts ? e->exts : Py_None), where};
    PyObject *w = steal_seq(0, 5, it);
    /* untracked only if what it holds is: exts may be any object given to MemEntry() */
    if (w && (!e->exts || !PyObject_GC_IsTracked(e->exts))) untrack(w);
    return w;
}

/* The fields changed: the next read of wire makes it anew. Lazy because an
   entry changes three times in a T0 put's life (publish, write-back,
   eviction) and is looked up (location replies) in few of them. */
static void rewire(MemEntryObject *e) { Py_CLEAR(e->wire); }

static PyObject *me_get_wire(MemEntryObject *e, void *closure) {
    (void)closure;
    if (!e->wire) {
        e->wire = make_wire(e);
        if (!e->wire) return NULL;
    }
    return Py_NewRef(e->wire);
}

static PyObject *new_entry(PyTypeObject *type, long long size, PyObject *sum, long long seq, PyObject *exts,
                           PyObject *spans, long long t0, int dirty) {
    MemEntryObject *e = (MemEntryObject *)type->tp_alloc(type, 0);
    if (!e) return NULL;
    e->size = size;
    Py_INCREF(sum);
    e->checksum = sum;
    e->seq = seq;
    Py_INCREF(exts);
    e->exts = exts;
    Py_INCREF(spans);
    e->spans = spans;
    e->t0 = t0;
    e->dirty = (char)(dirty != 0);
    Py_INCREF(Py_None);
    e->meta = Py_None; /* wire: NULL, made when read */
    return (PyObject *)e;
}

static PyObject *me_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"size", "checksum", "seq", "exts", "spans", "t0", "dirty", NULL};
    long long size, seq, t0 = -1;
    PyObject *sum, *exts, *spans;
    int dirty = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "LOLOO|$Lp", kwlist, &size, &sum, &seq, &exts, &spans, &t0, &dirty))
        return NULL;
    return new_entry(type, size, sum, seq, exts, spans, t0, dirty);
}

static void me_dealloc(MemEntryObject *e) {
    Py_XDECREF(e->checksum);
    Py_XDECREF(e->exts);
    Py_XDECREF(e->spans);
    Py_XDECREF(e->wire);
    Py_XDECREF(e->meta);
    Py_TYPE(e)->tp_free((PyObject *)e);
}

static PyObject *me_rewire(MemEntryObject *e, PyObject *unused) {
    (void)unused;
    rewire(e);
    Py_RETURN_NONE;
}

static PyObject *me_repr(MemEntryObject *e) {
    return PyUnicode_FromFormat("MemEntry(size=%lld, seq=%lld, t0=%lld, dirty=%s)", e->size, e->seq, e->t0,
                                e->dirty ? "True" : "False");
}

static PyMemberDef me_members[] = {
    {"size", T_LONGLONG, offsetof(MemEntryObject, size), 0, NULL},
    {"checksum", T_OBJECT, offsetof(MemEntryObject, checksum), 0, NULL},
    {"seq", T_LONGLONG, offsetof(MemEntryObject, seq), 0, NULL},
    {"exts", T_OBJECT, offsetof(MemEntryObject, exts), 0, NULL},
    {"spans", T_OBJECT, offsetof(MemEntryObject, spans), 0, NULL},
    {"t0", T_LONGLONG, offsetof(MemEntryObject, t0), 0, NULL},
    {"dirty", T_BOOL, offsetof(MemEntryObject, dirty), 0, NULL},
    {"deleted", T_BOOL, offsetof(MemEntryObject, deleted), 0, NULL},
    {"hits", T_LONGLONG, offsetof(MemEntryObject, hits), 0, NULL},
    {"meta", T_OBJECT, offsetof(MemEntryObject, meta), 0, NULL},
    {"created", T_DOUBLE, offsetof(MemEntryObject, created), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef me_getset[] = {
    {"wire", (getter)me_get_wire, NULL,
     "(size, checksum, seq, exts, None if t0 < 0 else (t0, not dirty)) as of its first read after the last "
     "rewire: replaced, never mutated",
     NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef me_methods[] = {
    {"rewire", (PyCFunction)me_rewire, METH_NOARGS, "the fields changed: wire is made anew when next read"},
    {NULL, NULL, 0, NULL},
};

PyTypeObject MemEntryType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "kvfs._native.MemEntry",
    .tp_basicsize = sizeof(MemEntryObject),
    .tp_flags = Py_TPFLAGS_DEFAULT, /* no Py_TPFLAGS_HAVE_GC: never in a cycle (above) */
    .tp_doc = "MemEntry(size, checksum, seq, exts, spans, *, t0=-1, dirty=False): the in-memory mirror of one "
              "index entry (kvfsd/mirror.py)",
    .tp_new = me_new,
    .tp_dealloc = (destructor)me_dealloc,
    .tp_repr = (reprfunc)me_repr,
    .tp_members = me_members,
    .tp_getset = me_getset,
    .tp_methods = me_methods,
};

/* ---- T0List: T0's clean LRU and its dirty set, linked through the entries --
 *
 * Why: as an OrderedDict (clean) and a dict (dirty) keyed by object key,
 * T0's bookkeeping cost every T0 put six more lookups and stores in large
 * hash tables (publish: into dirty; write-back: out of dirty, into the
 * LRU; eviction: iterate, get, delete), each a cache miss or two in a
 * busy daemon, plus an OrderedDict node per entry. Here an entry is linked
 * into the list that holds it: append, remove and move-to-end are pointer
 * updates, and eviction walks from the least recent end.
 *
 * Invariants: an entry is on at most one list (t0list says which); the
 * list holds a reference to each entry and to its key while it is there;
 * entries are MemEntry objects of this module. Caller holds the engine
 * lock (as for the dicts before).
 */
typedef struct {
    PyObject_HEAD
    MemEntryObject *head, *tail; /* least recent first */
    Py_ssize_t n;
} T0ListObject;

PyTypeObject T0ListType;

/* e (detached) at the recent end of l; references are the caller's business */
static void tl_attach(T0ListObject *l, MemEntryObject *e) {
    e->t0list = (PyObject *)l;
    e->t0prev = l->tail;
    e->t0next = NULL;
    if (l->tail) l->tail->t0next = e;
    else l->head = e;
    l->tail = e;
    l->n++;
}

/* e (on no list) goes to the recent end of l, with its key ok */
static void tl_link(T0ListObject *l, MemEntryObject *e, PyObject *ok) {
    Py_INCREF(e);
    Py_INCREF(ok);
    e->t0key = ok;
    tl_attach(l, e);
}

/* e leaves its list; the list's references (to e and its key) stay the
   caller's to drop (or to hand to another list) */
static void tl_detach(MemEntryObject *e) {
    T0ListObject *l = (T0ListObject *)e->t0list;
    if (e->t0prev) e->t0prev->t0next = e->t0next;
    else l->head = e->t0next;
    if (e->t0next) e->t0next->t0prev = e->t0prev;
    else l->tail = e->t0prev;
    e->t0prev = e->t0next = NULL;
    e->t0list = NULL;
    l->n--;
}

/* e leaves its list and the list's references go (e may be freed: the
   caller holds its own reference if it goes on using e) */
static void tl_unlink(MemEntryObject *e) {
    PyObject *k = e->t0key;
    e->t0key = NULL;
    tl_detach(e);
    Py_XDECREF(k);
    Py_DECREF(e);
}

/* e (on some list) to the recent end of l, its references kept */
static void tl_move(T0ListObject *l, MemEntryObject *e) {
    if ((T0ListObject *)e->t0list == l && l->tail == e) return;
    tl_detach(e); /* e->t0key stays: the list's reference moves with it */
    tl_attach(l, e);
}

static int is_entry(PyObject *m) {
    if (Py_TYPE(m) == &MemEntryType) return 1;
    PyErr_SetString(PyExc_TypeError, "T0 lists hold MemEntry objects of this data plane");
    return 0;
}

static PyObject *tl_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    if (!_PyArg_NoKeywords("T0List", kw) || !PyArg_ParseTuple(args, ":T0List")) return NULL;
    return type->tp_alloc(type, 0);
}

static void tl_dealloc(T0ListObject *l) {
    while (l->head) tl_unlink(l->head);
    Py_TYPE(l)->tp_free((PyObject *)l);
}

static PyObject *tl_append(T0ListObject *l, PyObject *args) {
    PyObject *ok, *m;
    if (!PyArg_ParseTuple(args, "O!O:append", &PyBytes_Type, &ok, &m) || !is_entry(m)) return NULL;
    MemEntryObject *e = (MemEntryObject *)m;
    if (e->t0list) {
        PyErr_SetString(PyExc_ValueError, "the entry is on a T0 list already");
        return NULL;
    }
    tl_link(l, e, ok);
    Py_RETURN_NONE;
}

static PyObject *tl_remove(T0ListObject *l, PyObject *m) {
    if (!is_entry(m)) return NULL;
    MemEntryObject *e = (MemEntryObject *)m;
    if ((T0ListObject *)e->t0list != l) Py_RETURN_FALSE;
    tl_unlink(e); /* the caller's reference (m) keeps e */
    Py_RETURN_TRUE;
}

static PyObject *tl_move_to_end(T0ListObject *l, PyObject *m) {
    if (!is_entry(m)) return NULL;
    MemEntryObject *e = (MemEntryObject *)m;
    if ((T0ListObject *)e->t0list != l) Py_RETURN_FALSE;
    tl_move(l, e);
    Py_RETURN_TRUE;
}

static PyObject *tl_items(T0ListObject *l, PyObject *unused) {
    (void)unused;
    PyObject *out = PyList_New(l->n);
    if (!out) return NULL;
    Py_ssize_t i = 0;
    for (MemEntryObject *e = l->head; e; e = e->t0next, i++) {
        PyObject *t = PyTuple_Pack(2, e->t0key, (PyObject *)e);
        if (!t) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, i, t);
    }
    return out;
}

static Py_ssize_t tl_len(T0ListObject *l) { return l->n; }

static int tl_contains(T0ListObject *l, PyObject *m) {
    return Py_TYPE(m) == &MemEntryType && (T0ListObject *)((MemEntryObject *)m)->t0list == l;
}

static PyMethodDef tl_methods[] = {
    {"append", (PyCFunction)tl_append, METH_VARARGS, "append(ok, m): m (on no list) to the recent end, with its key"},
    {"remove", (PyCFunction)tl_remove, METH_O, "remove(m) -> whether m was on this list (it is not now)"},
    {"move_to_end", (PyCFunction)tl_move_to_end, METH_O, "move_to_end(m) -> whether m is on this list (now its recent end)"},
    {"items", (PyCFunction)tl_items, METH_NOARGS, "[(key, entry), ...], least recent first"},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods tl_as_sequence = {
    .sq_length = (lenfunc)tl_len,
    .sq_contains = (objobjproc)tl_contains,
};

PyTypeObject T0ListType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "kvfs._native.T0List",
    .tp_basicsize = sizeof(T0ListObject),
    .tp_flags = Py_TPFLAGS_DEFAULT, /* holds entries and bytes only: never in a cycle */
    .tp_doc = "T0List(): T0's LRU of clean entries or its set of dirty ones, linked through the entries "
              "(kvfsd.tier0)",
    .tp_new = tl_new,
    .tp_dealloc = (destructor)tl_dealloc,
    .tp_methods = tl_methods,
    .tp_as_sequence = &tl_as_sequence,
};

/* The fields the location directory takes from an entry, read straight
   from the struct (native/directory.c): 0 if m is not a MemEntry. The
   references are borrowed. */
int kv_mem_entry_fields(PyObject *m, long long *size, long long *seq, PyObject **sum, long long *t0, int *dirty,
                        PyObject **exts) {
    if (Py_TYPE(m) != &MemEntryType) return 0;
    MemEntryObject *e = (MemEntryObject *)m;
    if (!e->checksum || !e->exts) return 0; /* deleted attributes: the generic path says what is wrong */
    *size = e->size;
    *seq = e->seq;
    *sum = e->checksum;
    *t0 = e->t0;
    *dirty = e->dirty;
    *exts = e->exts;
    return 1;
}

/* ---- the T0 journal's compact rows (kvfsd.t0journal: "PX", "DX") -------- */

typedef struct {
    char *p;
    size_t n, cap;
} jbuf_t;

static int jbuf_put(jbuf_t *b, const void *d, size_t n) {
    if (b->n + n > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->n + n) cap *= 2;
        char *p = PyMem_Realloc(b->p, cap);
        if (!p) {
            PyErr_NoMemory();
            return 0;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->n, d, n);
    b->n += n;
    return 1;
}

static int jbuf_u32(jbuf_t *b, uint32_t v) { return jbuf_put(b, &v, 4); } /* little-endian hosts (x86, arm) */
static int jbuf_u64(jbuf_t *b, uint64_t v) { return jbuf_put(b, &v, 8); }

static int jbuf_sum(jbuf_t *b, PyObject *sum) {
    if (!PyBytes_Check(sum) || PyBytes_GET_SIZE(sum) != 16) {
        PyErr_SetString(PyExc_TypeError, "checksums are 16 bytes");
        return 0;
    }
    return jbuf_put(b, PyBytes_AS_STRING(sum), 16);
}

/* One put's row: <QQq seq, size, arena offset | object sum | <I n | n chunk
   sums | <I key length | key (utf-8) | <i meta length (-1: none) | meta. */
static int jbuf_put_row(jbuf_t *b, long long seq, long long size, long long off, PyObject *sum, PyObject *sums,
                        PyObject *key, PyObject *meta) {
    Py_ssize_t kl;
    const char *k = PyUnicode_AsUTF8AndSize(key, &kl);
    if (!k || !PyList_Check(sums)) {
        if (k) PyErr_SetString(PyExc_TypeError, "chunk sums are a list");
        return 0;
    }
    if (meta != Py_None && !PyBytes_Check(meta)) {
        PyErr_SetString(PyExc_TypeError, "meta is bytes or None");
        return 0;
    }
    if (!(jbuf_u64(b, (uint64_t)seq) && jbuf_u64(b, (uint64_t)size) && jbuf_u64(b, (uint64_t)off) && jbuf_sum(b, sum) &&
          jbuf_u32(b, (uint32_t)PyList_GET_SIZE(sums))))
        return 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(sums); i++)
        if (!jbuf_sum(b, PyList_GET_ITEM(sums, i))) return 0;
    if (!(jbuf_u32(b, (uint32_t)kl) && jbuf_put(b, k, (size_t)kl))) return 0;
    if (meta == Py_None) return jbuf_u32(b, 0xFFFFFFFFu);
    return jbuf_u32(b, (uint32_t)PyBytes_GET_SIZE(meta)) &&
           jbuf_put(b, PyBytes_AS_STRING(meta), (size_t)PyBytes_GET_SIZE(meta));
}

/* the bytes made, and the buffer freed (NULL on an error) */
static PyObject *jbuf_bytes(jbuf_t *b) {
    PyObject *out = PyBytes_FromStringAndSize(b->p ? b->p : "", (Py_ssize_t)b->n);
    PyMem_Free(b->p);
    b->p = NULL;
    return out;
}

/* ---- t0_publish: publish_t0's per-object loop (kvfsd.tiering) ---------- */

/* t0_publish(ns, ops, lru, dirty, now) -> (keys, entries, journal rows, new bytes, [existing ops])
   For each T0 item of a plan (op not None, op.t0 >= 0) whose object key is
   not in lru: a dirty MemEntry (meta and created set), in lru and in dirty
   (Tier0's T0List of dirty entries), op.mem and op.t0_stored set, and its
   journal row (jbuf_put_row: the bytes of a "PX" record's rows). Items
   whose key is in lru already are returned for the caller to settle
   (their arena extents were never published). Caller holds the engine
   lock. On an error (memory) what was published so far stays published:
   as in the Python twin. lru is the engine's OrderedDict: written through
   PyObject_SetItem, which keeps its order (PyDict_SetItem would not). */
PyObject *kv_t0_publish(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *ns, *ops, *lru, *dirty;
    double now;
    if (!PyArg_ParseTuple(args, "UO!O!O!d", &ns, &PyList_Type, &ops, &PyDict_Type, &lru, &T0ListType, &dirty, &now))
        return NULL;
    PyObject *oks = PyList_New(0), *ms = PyList_New(0), *existing = PyList_New(0), *rows = NULL;
    PyObject *none_spans = PyTuple_New(0);
    jbuf_t jb = {NULL, 0, 0};
    long long new_bytes = 0;
    if (!oks || !ms || !existing || !none_spans) goto fail;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(ops); i++) {
        PyObject *op = PyList_GET_ITEM(ops, i);
        if (op == Py_None) continue;
        long long t0, size = 0, seq = 0;
        if (!OBJ_LL(op, t0, &t0)) goto fail;
        if (t0 < 0) continue;
        PyObject *ok = OBJ_GET(op, ok);
        if (!ok) goto fail;
        int there = PyDict_Contains(lru, ok);
        if (there) {
            Py_DECREF(ok);
            if (there < 0 || PyList_Append(existing, op) < 0) goto fail;
            continue;
        }
        PyObject *sum = NULL, *chunks = NULL, *exts = NULL, *sums = NULL, *m = NULL, *meta = NULL, *key = NULL;
        int good = OBJ_LL(op, size, &size) && OBJ_LL(op, seq, &seq) && (sum = OBJ_GET(op, checksum)) &&
                   (chunks = OBJ_GET(op, chunks)) && (exts = kv_plan_exts(chunks, &sums)) && (meta = OBJ_GET(op, meta)) &&
                   (key = OBJ_GET(op, key)) &&
                   (m = new_entry(&MemEntryType, size, sum, seq, exts, none_spans, t0, 1));
        if (good) {
            MemEntryObject *e = (MemEntryObject *)m;
            untrack(op); /* it lives until its write-back ends: a plan refers to nothing that refers back */
            untrack(chunks);
            for (Py_ssize_t c = 0; c < PyList_GET_SIZE(chunks); c++) untrack(PyList_GET_ITEM(chunks, c));
            Py_INCREF(meta);
            Py_SETREF(e->meta, meta);
            e->created = now;
            /* the row first: an item it refuses (a bad sum, meta or key) is not published */
            good = jbuf_put_row(&jb, seq, size, t0, sum, sums, key, meta) && PyObject_SetItem(lru, ok, m) == 0;
            if (good) tl_link((T0ListObject *)dirty, e, ok);
            good = good && PyList_Append(oks, ok) == 0 && PyList_Append(ms, m) == 0 && OBJ_SET(op, mem, m) == 0 &&
                   OBJ_SET_BOOL(op, t0_stored, 1) == 0;
            new_bytes += size;
        }
        Py_XDECREF(sum);
        Py_XDECREF(chunks);
        Py_XDECREF(exts);
        Py_XDECREF(sums);
        Py_XDECREF(meta);
        Py_XDECREF(key);
        Py_XDECREF(m);
        Py_DECREF(ok);
        if (!good) goto fail;
    }
    Py_DECREF(none_spans);
    none_spans = NULL;
    if (!(rows = jbuf_bytes(&jb))) goto fail;
    return Py_BuildValue("(NNNLN)", oks, ms, rows, new_bytes, existing);
fail:
    PyMem_Free(jb.p);
    Py_XDECREF(oks);
    Py_XDECREF(ms);
    Py_XDECREF(existing);
    Py_XDECREF(none_spans);
    return NULL;
}

/* Add span bytes and one record to live[seg] = [bytes, records]. */
static int add_live(PyObject *live, long long seg, long long span) {
    PyObject *k = PyLong_FromLongLong(seg);
    if (!k) return 0;
    PyObject *cur = PyDict_GetItemWithError(live, k); /* borrowed */
    int ok;
    if (cur) { /* a list of this call's own making: updated in place */
        PyObject *b = PyLong_FromLongLong(PyLong_AsLongLong(PyList_GET_ITEM(cur, 0)) + span);
        PyObject *r = PyLong_FromLongLong(PyLong_AsLongLong(PyList_GET_ITEM(cur, 1)) + 1);
        ok = b && r;
        if (ok) {
            PyList_SetItem(cur, 0, b);
            PyList_SetItem(cur, 1, r);
        } else {
            Py_XDECREF(b);
            Py_XDECREF(r);
        }
    } else {
        PyObject *v = PyErr_Occurred() ? NULL
                                       : steal_seq(1, 2, (PyObject *[]){PyLong_FromLongLong(span), PyLong_FromLong(1)});
        ok = v && PyDict_SetItem(live, k, v) == 0;
        Py_XDECREF(v);
    }
    Py_DECREF(k);
    return ok;
}

/* t0_written_back(ns, done, lru, t0_lru, t0_dirty) -> (keys, entries, journal seqs, bytes, live, gone)
   _written_back_many's per-object loop (kvfsd.tiering): for each (op,
   published) whose entry op.mem is still dirty: it is dirty no more (meta
   dropped), its seq goes to the journal's "done" bytes (<Q each) and its bytes are counted; if
   published, not deleted and still the mirror's entry for its key, it
   moves from t0_dirty (if there) to the end of t0_lru, gets its spans, is rewired and
   returned (keys, entries: for the directory) with its records added to
   live {seg: [bytes, records]}; otherwise (op, entry) is in gone for the
   caller. t0_lru and t0_dirty are T0Lists. Caller holds the engine lock. */
PyObject *kv_t0_written_back(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *ns, *done, *lru, *t0_lru, *t0_dirty;
    if (!PyArg_ParseTuple(args, "UO!OO!O!", &ns, &PyList_Type, &done, &lru, &T0ListType, &t0_lru, &T0ListType,
                          &t0_dirty))
        return NULL;
    PyObject *oks = PyList_New(0), *ms = PyList_New(0), *seqs = NULL, *live = PyDict_New(), *gone = PyList_New(0);
    jbuf_t jb = {NULL, 0, 0};
    long long nbytes = 0;
    if (!oks || !ms || !live || !gone) goto fail;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(done); i++) {
        PyObject *pair = PyList_GET_ITEM(done, i);
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) {
            PyErr_SetString(PyExc_TypeError, "done holds (op, published) pairs");
            goto fail;
        }
        PyObject *op = PyTuple_GET_ITEM(pair, 0);
        int published = PyObject_IsTrue(PyTuple_GET_ITEM(pair, 1));
        if (published < 0) goto fail;
        PyObject *m = OBJ_GET(op, mem);
        if (!m) goto fail;
        if (Py_TYPE(m) != &MemEntryType) {
            Py_DECREF(m);
            PyErr_SetString(PyExc_TypeError, "op.mem is a MemEntry of this data plane");
            goto fail;
        }
        MemEntryObject *e = (MemEntryObject *)m;
        if (!e->dirty) {
            Py_DECREF(m);
            continue;
        }
        PyObject *ok = NULL, *chunks = NULL, *spans = NULL, *cur = NULL;
        int good = (ok = OBJ_GET(op, ok)) && jbuf_u64(&jb, (uint64_t)e->seq);
        if (good) {
            nbytes += e->size;
            e->dirty = 0;
            Py_INCREF(Py_None);
            Py_SETREF(e->meta, Py_None);
            cur = PyObject_GetItem(lru, ok); /* the mirror's entry for the key now, NULL: none */
            if (!cur) {
                if (PyErr_ExceptionMatches(PyExc_KeyError)) PyErr_Clear();
                else good = 0;
            }
        }
        if (good && published && !e->deleted && cur == m) {
            /* out of the dirty map, to the recent end of the LRU (not if its
               T0 copy was dropped meanwhile: then it is in neither) */
            if (e->t0list == t0_dirty) tl_move((T0ListObject *)t0_lru, e);
            good = (chunks = OBJ_GET(op, chunks)) != NULL;
            if (good && !PyList_Check(chunks)) {
                PyErr_SetString(PyExc_TypeError, "a plan's chunks are a list");
                good = 0;
            }
            if (good) {
                Py_ssize_t n = PyList_GET_SIZE(chunks);
                spans = PyTuple_New(n);
                good = spans != NULL;
                for (Py_ssize_t j = 0; good && j < n; j++) {
                    PyObject *c = PyList_GET_ITEM(chunks, j);
                    long long seg, end, hdr;
                    good = CHUNK_LL(c, seg, &seg) && CHUNK_LL(c, end, &end) && CHUNK_LL(c, hdr_off, &hdr);
                    PyObject *t = good ? steal_seq(0, 2, (PyObject *[]){PyLong_FromLongLong(seg),
                                                                         PyLong_FromLongLong(end - hdr)})
                                       : NULL;
                    untrack(t);
                    good = t != NULL && add_live(live, seg, end - hdr);
                    if (t) PyTuple_SET_ITEM(spans, j, t);
                }
            }
            if (good) {
                untrack(spans);
                Py_INCREF(spans);
                Py_SETREF(e->spans, spans);
                rewire(e);
                good = PyList_Append(oks, ok) == 0 && PyList_Append(ms, m) == 0;
            }
        } else if (good) {
            PyObject *g = PyTuple_Pack(2, op, m);
            good = g && PyList_Append(gone, g) == 0;
            Py_XDECREF(g);
        }
        Py_XDECREF(ok);
        Py_XDECREF(chunks);
        Py_XDECREF(spans);
        Py_XDECREF(cur);
        Py_DECREF(m);
        if (!good) goto fail;
    }
    if (!(seqs = jbuf_bytes(&jb))) goto fail;
    return Py_BuildValue("(NNNLNN)", oks, ms, seqs, nbytes, live, gone);
fail:
    Py_XDECREF(oks);
    Py_XDECREF(ms);
    PyMem_Free(jb.p);
    Py_XDECREF(live);
    Py_XDECREF(gone);
    return NULL;
}

/* t0_evict_round(lru, leased, need) -> (keys, entries, offsets, bytes)
   One eviction round of T0 (kvfsd.tier0.Tier0._evict_for): the least
   recent entries of lru (the T0List of clean entries) whose keys are not
   in leased, until their sizes reach need (or all there are); leased ones
   passed over move to the recent end. The chosen ones leave lru and lose
   their T0 copy (t0 -1, rewired). Caller holds the engine lock; the twin
   (kvfs._native_py) is the definition. */
static int is_leased(PyObject *leased, PyObject *ok) {
    return PyDict_Check(leased) ? PyDict_Contains(leased, ok) : PySequence_Contains(leased, ok);
}

PyObject *kv_t0_evict_round(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *lru, *leased;
    long long need;
    if (!PyArg_ParseTuple(args, "O!OL", &T0ListType, &lru, &leased, &need)) return NULL;
    T0ListObject *l = (T0ListObject *)lru;
    PyObject *oks = PyList_New(0), *ms = PyList_New(0), *offs = PyList_New(0), *skipped = PyList_New(0);
    long long freed = 0, nbytes = 0;
    if (!oks || !ms || !offs || !skipped) goto fail;
    for (MemEntryObject *e = l->head; e; e = e->t0next) {
        int lz = is_leased(leased, e->t0key);
        if (lz < 0) goto fail;
        if (PyList_Append(lz ? skipped : ms, (PyObject *)e) < 0 || (!lz && PyList_Append(oks, e->t0key) < 0))
            goto fail;
        if (!lz && (freed += e->size) >= need) break;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(skipped); i++) /* being read: they count as recent */
        tl_move(l, (MemEntryObject *)PyList_GET_ITEM(skipped, i));
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(ms); i++) {
        MemEntryObject *e = (MemEntryObject *)PyList_GET_ITEM(ms, i); /* ms holds it */
        tl_unlink(e);
        nbytes += e->size;
        long long off = e->t0;
        e->t0 = -1;
        rewire(e);
        if (off >= 0) {
            PyObject *o = PyLong_FromLongLong(off);
            int bad = !o || PyList_Append(offs, o) < 0;
            Py_XDECREF(o);
            if (bad) goto fail;
        }
    }
    Py_DECREF(skipped);
    return Py_BuildValue("(NNNL)", oks, ms, offs, nbytes);
fail:
    Py_XDECREF(oks);
    Py_XDECREF(ms);
    Py_XDECREF(offs);
    Py_XDECREF(skipped);
    return NULL;
}

/* release_chunks(ops, segs) -> ([segments touched that exist], [arena extents to free])
   Puts._release_reservations' loop: each chunk's reservation leaves its
   segment's reserved map (segs: {seg: SegState}; a segment gone is
   skipped), each op's chunks become [] (released once only) and its t0 -1;
   an arena extent that was never published (op.mem None) is returned for
   the caller to free. Caller holds the engine lock. */
static PyObject *R_RESERVED;

PyObject *kv_release_chunks(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *ops, *segs;
    if (!PyArg_ParseTuple(args, "O!O!", &PyList_Type, &ops, &PyDict_Type, &segs)) return NULL;
    if (!R_RESERVED && !INTERN(R_RESERVED, "reserved")) return NULL;
    PyObject *touched = PyList_New(0), *frees = PyList_New(0), *seen = PySet_New(NULL), *empty = NULL;
    if (!touched || !frees || !seen) goto fail;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(ops); i++) {
        PyObject *op = PyList_GET_ITEM(ops, i);
        if (op == Py_None) continue;
        PyObject *chunks = OBJ_GET(op, chunks);
        if (!chunks) goto fail;
        if (!PyList_Check(chunks)) {
            Py_DECREF(chunks);
            PyErr_SetString(PyExc_TypeError, "a plan's chunks are a list");
            goto fail;
        }
        int good = 1;
        for (Py_ssize_t j = 0; good && j < PyList_GET_SIZE(chunks); j++) {
            PyObject *c = PyList_GET_ITEM(chunks, j);
            long long segn, startn;
            PyObject *seg = NULL, *start = NULL;
            good = CHUNK_LL(c, seg, &segn) && CHUNK_LL(c, start, &startn) && (seg = PyLong_FromLongLong(segn)) &&
                   (start = PyLong_FromLongLong(startn));
            PyObject *s = good ? PyDict_GetItemWithError(segs, seg) : NULL; /* borrowed */
            if (good && s) {
                PyObject *res = PyObject_GetAttr(s, R_RESERVED);
                int has = res && PyDict_Check(res) ? PyDict_Contains(res, start) : -1;
                good = has == 0 || (has > 0 && PyDict_DelItem(res, start) == 0);
                if (res && !PyDict_Check(res)) PyErr_SetString(PyExc_TypeError, "a segment's reserved is a dict");
                Py_XDECREF(res);
            } else if (good && PyErr_Occurred()) {
                good = 0;
            }
            if (good && s) {
                int had = PySet_Contains(seen, seg);
                good = had >= 0 && (had || (PySet_Add(seen, seg) == 0 && PyList_Append(touched, seg) == 0));
            }
            Py_XDECREF(seg);
            Py_XDECREF(start);
        }
        Py_DECREF(chunks);
        if (!good) goto fail;
        empty = PyList_New(0);
        if (!empty || OBJ_SET(op, chunks, empty) < 0) goto fail; /* released once only */
        Py_CLEAR(empty);
        long long off;
        if (!OBJ_LL(op, t0, &off)) goto fail;
        if (off >= 0) {
            PyObject *mem = OBJ_GET(op, mem), *t0 = mem == Py_None ? PyLong_FromLongLong(off) : NULL;
            good = mem != NULL && (mem != Py_None || (t0 && PyList_Append(frees, t0) == 0));
            Py_XDECREF(mem);
            Py_XDECREF(t0);
        }
        if (!good || OBJ_SET_LL(op, t0, -1) < 0) goto fail;
    }
    Py_DECREF(seen);
    return Py_BuildValue("(NN)", touched, frees);
fail:
    Py_XDECREF(touched);
    Py_XDECREF(frees);
    Py_XDECREF(seen);
    Py_XDECREF(empty);
    return NULL;
}
