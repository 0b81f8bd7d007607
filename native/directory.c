/*
 * The location directory's read side in C: is each key of a batch in the
 * shared directory the daemon keeps (layout and rules: kvfs/directory.py)?
 *
 * contains() and prefix_match() of a batch are answered here without a
 * round trip to the daemon; in Python the per-key work (validate, hash,
 * probe 32 slots under a seqlock) cost more than the round trip it saves.
 * Keys that are not plain ASCII str are left to the Python path (state 2),
 * which validates them with kvfs.keys' exact rules.
 *
 * The GIL is held: a batch of 1024 keys takes tens of microseconds.
 */
#include "directory.h"

#include <stdint.h>
#include <string.h>

#define XXH_INLINE_ALL
#include "vendor/xxhash.h"

#define MAX_KEY_CHARS 200
#define MAX_NS_BYTES 400

enum { ABSENT = 0, PRESENT = 1, SLOW_PATH = 2, UNKNOWN = 3 };

/* 1 present, 0 not this key, -1 the slot kept changing under us */
static int slot_holds(const unsigned char *slot, const unsigned char *h) {
    for (int tries = 0; tries < 16; tries++) {
        uint64_t v1 = __atomic_load_n((const uint64_t *)slot, __ATOMIC_ACQUIRE);
        if (v1 & 1) continue;
        int eq = memcmp(slot + SLOT_HASH, h, 16) == 0;
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        uint64_t v2 = __atomic_load_n((const uint64_t *)slot, __ATOMIC_RELAXED);
        if (v1 == v2) return eq;
    }
    return -1;
}

static int probe(const unsigned char *table, const unsigned char *hops, uint64_t nbuckets,
                 const unsigned char *h) {
    uint64_t low;
    memcpy(&low, h, 8); /* little-endian hosts, as the writer's int.from_bytes(h[:8], "little") */
    uint64_t b = low & (nbuckets - 1);
    unsigned hop = __atomic_load_n(hops + b, __ATOMIC_ACQUIRE);
    int unknown = 0;
    for (int i = 0; i < DIR_PROBE; i++) {
        if (!(hop >> i & 1)) continue; /* no key of this home in that bucket */
        const unsigned char *bucket = table + ((b + i) & (nbuckets - 1)) * DIR_BUCKET * DIR_SLOT;
        for (int j = 0; j < DIR_BUCKET; j++) {
            int r = slot_holds(bucket + j * DIR_SLOT, h);
            if (r == 1) return PRESENT;
            if (r < 0) unknown = 1;
        }
    }
    return unknown ? UNKNOWN : ABSENT;
}

/* A stable copy of the slot holding h into out (DIR_SLOT bytes): 1 found,
   0 absent, -1 its slot kept changing. The writer keeps a key in one slot
   while it lives, so the first slot whose hash matches is the only one. */
static int copy_slot(const unsigned char *table, const unsigned char *hops, uint64_t nbuckets,
                     const unsigned char *h, unsigned char *out) {
    uint64_t low;
    memcpy(&low, h, 8);
    uint64_t b = low & (nbuckets - 1);
    unsigned hop = __atomic_load_n(hops + b, __ATOMIC_ACQUIRE);
    int unknown = 0;
    for (int i = 0; i < DIR_PROBE; i++) {
        if (!(hop >> i & 1)) continue;
        const unsigned char *bucket = table + ((b + i) & (nbuckets - 1)) * DIR_BUCKET * DIR_SLOT;
        for (int j = 0; j < DIR_BUCKET; j++) {
            const unsigned char *slot = bucket + j * DIR_SLOT;
            for (int tries = 0; tries < 16; tries++) {
                uint64_t v1 = __atomic_load_n((const uint64_t *)slot, __ATOMIC_ACQUIRE);
                if (v1 & 1) continue;
                memcpy(out, slot, DIR_SLOT);
                __atomic_thread_fence(__ATOMIC_ACQUIRE);
                uint64_t v2 = __atomic_load_n((const uint64_t *)slot, __ATOMIC_RELAXED);
                if (v1 != v2) continue;
                if (memcmp(out + SLOT_HASH, h, 16) == 0) return 1;
                goto next_slot;
            }
            unknown = 1;
        next_slot:;
        }
    }
    return unknown ? -1 : 0;
}

/* any byte of x below n (n <= 128; bytes of x below 0x80) / equal to c */
#define ANY_BELOW(x, n) (((x) - 0x0101010101010101ULL * (n)) & ~(x) & 0x8080808080808080ULL)
#define ANY_EQUAL(x, c) ANY_BELOW((x) ^ (0x0101010101010101ULL * (c)), 1)

/* kvfs.keys' rules for an ASCII key: 1-200 printable characters (0x20-0x7e),
   no '/', not "." or ".." (ASCII str: every byte is below 0x80). Eight
   bytes at a time: a 64-character key is most of a probe's cost otherwise. */
static int plain_key(const char *s, Py_ssize_t n) {
    if (n < 1 || n > MAX_KEY_CHARS) return 0;
    if ((n == 1 && s[0] == '.') || (n == 2 && s[0] == '.' && s[1] == '.')) return 0;
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t x;
        memcpy(&x, s + i, 8);
        if (ANY_BELOW(x, 0x20) || ANY_EQUAL(x, '/') || ANY_EQUAL(x, 0x7f)) return 0;
    }
    for (; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c < 0x20 || c > 0x7e || c == '/') return 0;
    }
    return 1;
}

static int check_table(Py_buffer *dir, unsigned long long nslots) {
    if (nslots < DIR_BUCKET * DIR_PROBE || (nslots & (nslots - 1)) ||
        (unsigned long long)dir->len < DIR_HEADER + nslots * DIR_SLOT + nslots / DIR_BUCKET) {
        PyErr_SetString(PyExc_ValueError, "directory buffer does not hold that many slots");
        return 0;
    }
    return 1;
}

/* (directory.h) */
int kv_dir_find(const unsigned char *dir, uint64_t nslots, const char *ns, size_t nslen, PyObject *key,
                unsigned char *out) {
    if (!PyUnicode_Check(key) || !PyUnicode_IS_ASCII(key) || nslen < 1 || nslen > MAX_NS_BYTES) return -1;
    Py_ssize_t kl;
    const char *ks = PyUnicode_AsUTF8AndSize(key, &kl);
    if (!ks || !plain_key(ks, kl)) return -1;
    char name[MAX_NS_BYTES + 1 + MAX_KEY_CHARS];
    memcpy(name, ns, nslen);
    name[nslen] = '\0';
    memcpy(name + nslen + 1, ks, (size_t)kl);
    XXH128_canonical_t c;
    XXH128_canonicalFromHash(&c, XXH3_128bits(name, nslen + 1 + (size_t)kl));
    const unsigned char *table = dir + DIR_HEADER;
    return copy_slot(table, table + nslots * DIR_SLOT, nslots / DIR_BUCKET, c.digest, out);
}

int kv_dir_check(Py_buffer *dir, unsigned long long nslots) { return check_table(dir, nslots); }

/* mode: 0 states, 1 states up to the first that is not PRESENT, 2 (list of
   bool, bitmask of the states other than PRESENT seen: 1 << state) */
static PyObject *probe_batch(PyObject *args, int mode_arg) {
    Py_buffer dir, ns;
    PyObject *keys;
    unsigned long long nslots;
    int prefix = 0;
    if (!PyArg_ParseTuple(args, "y*Ky*O|p", &dir, &nslots, &ns, &keys, &prefix)) return NULL;
    int mode = mode_arg == 2 ? 2 : prefix;
    PyObject *result = NULL;
    if (!PyList_Check(keys)) {
        PyErr_SetString(PyExc_TypeError, "keys must be a list");
        goto out;
    }
    if (!check_table(&dir, nslots)) goto out;
    if (ns.len < 1 || ns.len > MAX_NS_BYTES) {
        PyErr_SetString(PyExc_ValueError, "namespace of 1-400 bytes");
        goto out;
    }
    Py_ssize_t n = PyList_GET_SIZE(keys);
    PyObject *bools = NULL;
    unsigned seen = 0;
    result = PyBytes_FromStringAndSize(NULL, n);
    if (!result) goto out;
    if (mode == 2 && !(bools = PyList_New(n))) {
        Py_CLEAR(result);
        goto out;
    }
    unsigned char *states = (unsigned char *)PyBytes_AS_STRING(result);
    const unsigned char *table = (const unsigned char *)dir.buf + DIR_HEADER;
    uint64_t nbuckets = nslots / DIR_BUCKET;
    const unsigned char *hops = table + nslots * DIR_SLOT;
    char name[MAX_NS_BYTES + 1 + MAX_KEY_CHARS];
    memcpy(name, ns.buf, (size_t)ns.len);
    name[ns.len] = '\0';
    Py_ssize_t done = n;
    /* In groups of GROUP keys: hash them all and prefetch their hop bytes,
       then prefetch the buckets those name, then probe. The table is large
       and touched at random: overlapping the cache misses of a group, not
       taking them one after another, is most of the speed. */
    enum { GROUP = 32 };
    unsigned char digest[GROUP][16];
    unsigned char ok[GROUP];
    for (Py_ssize_t g = 0; g < n && done == n; g += GROUP) {
        Py_ssize_t m = n - g < GROUP ? n - g : GROUP;
        for (Py_ssize_t j = 0; j < m; j++) {
            PyObject *k = PyList_GET_ITEM(keys, g + j);
            ok[j] = 0;
            if (PyUnicode_Check(k) && PyUnicode_IS_ASCII(k)) {
                Py_ssize_t kl;
                const char *ks = PyUnicode_AsUTF8AndSize(k, &kl);
                if (ks && plain_key(ks, kl)) {
                    memcpy(name + ns.len + 1, ks, (size_t)kl);
                    XXH128_canonical_t c;
                    XXH128_canonicalFromHash(&c, XXH3_128bits(name, (size_t)(ns.len + 1 + kl)));
                    memcpy(digest[j], c.digest, 16);
                    ok[j] = 1;
                    uint64_t low;
                    memcpy(&low, c.digest, 8);
                    __builtin_prefetch(hops + (low & (nbuckets - 1)));
                }
            }
        }
        for (Py_ssize_t j = 0; j < m; j++) {
            if (!ok[j]) continue;
            uint64_t low;
            memcpy(&low, digest[j], 8);
            uint64_t b = low & (nbuckets - 1);
            unsigned hop = hops[b];
            for (int i = 0; i < DIR_PROBE; i++) {
                if (!(hop >> i & 1)) continue;
                const unsigned char *bucket = table + ((b + i) & (nbuckets - 1)) * DIR_BUCKET * DIR_SLOT;
                for (int s = 0; s < DIR_BUCKET; s++) __builtin_prefetch(bucket + s * DIR_SLOT);
                break; /* the first bucket named: where nearly every key is */
            }
        }
        for (Py_ssize_t j = 0; j < m; j++) {
            Py_ssize_t i = g + j;
            unsigned char st = ok[j] ? (unsigned char)probe(table, hops, nbuckets, digest[j]) : SLOW_PATH;
            states[i] = st;
            if (mode == 2) {
                PyObject *b = st == PRESENT ? Py_True : Py_False;
                Py_INCREF(b);
                PyList_SET_ITEM(bools, i, b);
                if (st != PRESENT) seen |= 1u << st;
            } else if (mode == 1 && st != PRESENT) {
                done = i + 1;
                break;
            }
        }
    }
    if (mode == 2 && done < n) done = n; /* (mode 2 never stops early) */
    if (mode == 2) {
        Py_DECREF(result);
        result = Py_BuildValue("(NI)", bools, seen);
    } else if (done < n && _PyBytes_Resize(&result, done) < 0) {
        result = NULL;
    }
out:
    PyBuffer_Release(&dir);
    PyBuffer_Release(&ns);
    return result;
}

PyObject *kv_dir_probe(PyObject *self, PyObject *args) {
    (void)self;
    return probe_batch(args, 0);
}

PyObject *kv_dir_contains(PyObject *self, PyObject *args) {
    (void)self;
    return probe_batch(args, 2);
}

/* ---- the writer's side (the daemon, one writer, under its engine lock):
   kvfs.directory.put_py / del_py are the twins. In Python a put cost about
   ten microseconds, twice per T0 put (published, then written back). */


static const unsigned char EMPTY16[16];

static uint64_t home_bucket(const unsigned char *h, uint64_t nbuckets) {
    uint64_t low;
    memcpy(&low, h, 8);
    return low & (nbuckets - 1);
}

/* the slot holding h, or NULL (only the buckets its hop bits name are read) */
static unsigned char *key_slot(unsigned char *table, const unsigned char *hops, uint64_t nbuckets,
                               const unsigned char *h) {
    uint64_t b = home_bucket(h, nbuckets);
    unsigned hop = hops[b];
    for (int i = 0; i < DIR_PROBE; i++) {
        if (!(hop >> i & 1)) continue;
        unsigned char *bucket = table + ((b + i) & (nbuckets - 1)) * DIR_BUCKET * DIR_SLOT;
        for (int j = 0; j < DIR_BUCKET; j++)
            if (memcmp(bucket + j * DIR_SLOT + SLOT_HASH, h, 16) == 0) return bucket + j * DIR_SLOT;
    }
    return NULL;
}

/* Whether slot a is a better victim than the best so far (victim_slot's rule). */
typedef struct {
    unsigned char *slot;
    int t0;
    uint32_t age;
    uint64_t seq;
} victim_t;

static void consider_victim(victim_t *v, unsigned char *slot, uint32_t now) {
    int64_t t0;
    uint64_t seq;
    uint32_t flags;
    memcpy(&t0, slot + SLOT_T0, 8);
    memcpy(&seq, slot + SLOT_SEQ, 8);
    memcpy(&flags, slot + SLOT_FLAGS, 4);
    int in_t0 = t0 >= 0;
    uint32_t age = (now - (flags >> DIR_STAMP_SHIFT)) & DIR_STAMP_MASK;
    if (in_t0 < v->t0 || (in_t0 == v->t0 && (age > v->age || (age == v->age && seq < v->seq)))) {
        v->slot = slot;
        v->t0 = in_t0;
        v->age = age;
        v->seq = seq;
    }
}

/* The first free slot of h's buckets; NULL if they are full, and then, if
   victim is given, the slot a new key takes from another in *victim: the
   coldest of the window, T1-only objects before T0 ones, then the longest
   unwritten (its stamp's age on the writer's clock, modulo the stamp's 31
   bits), then the oldest put (lowest seq). One pass over the window: a
   full table's new key reads each slot once. */
static unsigned char *free_or_victim(unsigned char *table, uint64_t nbuckets, const unsigned char *h,
                                     unsigned char **victim, uint32_t now) {
    uint64_t b = home_bucket(h, nbuckets);
    victim_t v = {NULL, 2, 0, 0};
    for (int i = 0; i < DIR_PROBE; i++) {
        unsigned char *bucket = table + ((b + i) & (nbuckets - 1)) * DIR_BUCKET * DIR_SLOT;
        for (int j = 0; j < DIR_BUCKET; j++) {
            unsigned char *slot = bucket + j * DIR_SLOT;
            if (memcmp(slot + SLOT_HASH, EMPTY16, 16) == 0) return slot;
            if (victim) consider_victim(&v, slot, now);
        }
    }
    if (victim) *victim = v.slot;
    return NULL;
}

/* seqlock write of a slot's body (bytes 8..SLOT): odd version, body, even version */
static void write_slot(unsigned char *slot, const unsigned char *body) {
    uint64_t *ver = (uint64_t *)slot;
    uint64_t v = __atomic_load_n(ver, __ATOMIC_RELAXED);
    __atomic_store_n(ver, v + 1, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE); /* readers see odd before any new byte */
    memcpy(slot + 8, body, DIR_SLOT - 8);
    __atomic_store_n(ver, v + 2, __ATOMIC_RELEASE);
}

static void set_hop(unsigned char *table, unsigned char *hops, uint64_t nbuckets, const unsigned char *h,
                    const unsigned char *slot, int placed) {
    uint64_t home = home_bucket(h, nbuckets);
    uint64_t bucket = (uint64_t)(slot - table) / DIR_SLOT / DIR_BUCKET;
    unsigned char bit = (unsigned char)(1u << ((bucket - home) & (nbuckets - 1)));
    if (placed) {
        __atomic_store_n(hops + home, (unsigned char)(hops[home] | bit), __ATOMIC_RELEASE);
        return;
    }
    const unsigned char *first = table + bucket * DIR_BUCKET * DIR_SLOT;
    for (int j = 0; j < DIR_BUCKET; j++) {
        const unsigned char *kh = first + j * DIR_SLOT + SLOT_HASH;
        if (memcmp(kh, EMPTY16, 16) != 0 && home_bucket(kh, nbuckets) == home) return;
    }
    __atomic_store_n(hops + home, (unsigned char)(hops[home] & ~bit), __ATOMIC_RELEASE);
}


static int get_u64(PyObject *o, uint64_t *out) {
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) return 0;
    *out = v;
    return 1;
}

/* the 16-byte field at dst from a bytes object (shorter: zero-padded, as struct's "16s") */
static int put16(unsigned char *dst, PyObject *o) {
    if (!PyBytes_Check(o)) {
        PyErr_SetString(PyExc_TypeError, "checksums are bytes");
        return 0;
    }
    Py_ssize_t n = PyBytes_GET_SIZE(o);
    memcpy(dst, PyBytes_AS_STRING(o), (size_t)(n < 16 ? n : 16));
    return 1;
}

static void add_u64(unsigned char *at, uint64_t n) {
    uint64_t v = __atomic_load_n((uint64_t *)at, __ATOMIC_RELAXED);
    __atomic_store_n((uint64_t *)at, v + n, __ATOMIC_RELEASE);
}

#define DISPLACE 1
#define FILL 2

/* The writer's clock, as slots are stamped with it. */
static uint32_t dir_now(Py_buffer *dir) {
    uint64_t clock;
    memcpy(&clock, (unsigned char *)dir->buf + DIR_CLOCK_AT, 8);
    return (uint32_t)(clock & DIR_STAMP_MASK);
}

/* A slot as written (DIR_SLOT bytes; its first 8, the version, unused) for
   key hash h: 0 with an error set if the fields are not what a slot holds.
   Needs the GIL (exts are Python objects); placing it does not. */
static int make_body(unsigned char *body, const unsigned char *h, unsigned long long size, unsigned long long seq,
                     PyObject *checksum, long long t0, unsigned int flags, PyObject *exts, uint32_t now) {
    if (!(PyList_Check(exts) || PyTuple_Check(exts))) {
        PyErr_SetString(PyExc_ValueError, "extents are a list or a tuple");
        return 0;
    }
    memset(body, 0, DIR_SLOT);
    Py_ssize_t n = PySequence_Fast_GET_SIZE(exts);
    if (n > DIR_MAX_CHUNKS) n = 0; /* more: present, location asked of the daemon */
    memcpy(body + SLOT_HASH, h, 16);
    memcpy(body + SLOT_SIZE, &size, 8);
    memcpy(body + SLOT_SEQ, &seq, 8);
    if (!put16(body + SLOT_SUM, checksum)) return 0;
    int64_t off0 = t0 >= 0 ? t0 : -1;
    memcpy(body + SLOT_T0, &off0, 8);
    flags = (flags & ((1u << DIR_STAMP_SHIFT) - 1)) | now << DIR_STAMP_SHIFT; /* stamped: its last write */
    uint32_t n32 = (uint32_t)n;
    memcpy(body + SLOT_FLAGS, &flags, 4);
    memcpy(body + SLOT_NCHUNKS, &n32, 4);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *x = PySequence_Fast_GET_ITEM(exts, i);
        PyObject *fast = PySequence_Fast(x, "an extent is [stripe, seg, offset, length, sum]");
        if (!fast) return 0;
        uint64_t stripe, seg, coff, length;
        int good = PySequence_Fast_GET_SIZE(fast) == 5;
        if (!good) PyErr_SetString(PyExc_ValueError, "an extent is [stripe, seg, offset, length, sum]");
        PyObject **f = PySequence_Fast_ITEMS(fast);
        good = good && get_u64(f[0], &stripe) && get_u64(f[1], &seg) && get_u64(f[2], &coff) &&
               get_u64(f[3], &length);
        unsigned char *c = body + DIR_HEAD + i * DIR_CHUNK;
        if (good) {
            uint32_t s32 = (uint32_t)stripe, l32 = (uint32_t)length;
            memcpy(c, &s32, 4);
            memcpy(c + CHUNK_LENGTH, &l32, 4);
            memcpy(c + CHUNK_SEG, &seg, 8);
            memcpy(c + CHUNK_OFFSET, &coff, 8);
            good = put16(c + CHUNK_SUM, f[4]);
        }
        Py_DECREF(fast);
        if (!good) return 0;
    }
    return 1;
}

/* Write a slot made by make_body into the table (its key hash at
   body + SLOT_HASH): 1 it took a free slot, 0 its slot was updated, 2 its
   buckets were full and it took the slot of another key (with displace
   DISPLACE; that key is then outside the table, counted in the header
   before it leaves: kvfs.directory's reader rule), -1 its buckets are full
   (not written). With displace FILL only a key in no slot is written, into
   a free one: 0 for a key that has a slot (left as it is). Touches only
   the table: callers may run it without the GIL, holding the daemon's
   lock (one writer). */
static long place_body(unsigned char *dirbuf, unsigned long long nslots, const unsigned char *body, uint32_t now,
                       int displace) {
    const unsigned char *h = body + SLOT_HASH;
    unsigned char *table = dirbuf + DIR_HEADER;
    unsigned char *hops = table + nslots * DIR_SLOT;
    uint64_t nbuckets = nslots / DIR_BUCKET;
    unsigned char *slot = key_slot(table, hops, nbuckets, h);
    if (slot) {
        if (displace == FILL) return 0;
        write_slot(slot, body + 8);
        return 0;
    }
    unsigned char *victim = NULL;
    slot = free_or_victim(table, nbuckets, h, displace == DISPLACE ? &victim : NULL, now);
    if (!slot) {
        if (displace != DISPLACE) return -1;
        slot = victim;
        unsigned char gone[16];
        memcpy(gone, slot + SLOT_HASH, 16);
        add_u64(dirbuf + DIR_OUTSIDE_AT, 1); /* counted outside, then displaced, then it leaves */
        add_u64(dirbuf + DIR_DISPLACED_AT, 1);
        set_hop(table, hops, nbuckets, h, slot, 1);
        write_slot(slot, body + 8);
        set_hop(table, hops, nbuckets, gone, slot, 0); /* after it left */
        return 2;
    }
    set_hop(table, hops, nbuckets, h, slot, 1); /* before the key is there */
    write_slot(slot, body + 8);
    return 1;
}

/* Write the slot of key hash h: place_body's result, or -2 with an error set. */
static long put_slot(Py_buffer *dir, unsigned long long nslots, const unsigned char *h, unsigned long long size,
                     unsigned long long seq, PyObject *checksum, long long t0, unsigned int flags, PyObject *exts,
                     int displace) {
    unsigned char body[DIR_SLOT];
    uint32_t now = dir_now(dir);
    if (!make_body(body, h, size, seq, checksum, t0, flags, exts, now)) return -2;
    return place_body((unsigned char *)dir->buf, nslots, body, now, displace);
}

PyObject *kv_dir_put(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer dir, h;
    unsigned long long nslots, size, seq;
    long long t0;
    unsigned int flags;
    PyObject *checksum, *exts, *result = NULL;
    int displace = 0;
    if (!PyArg_ParseTuple(args, "w*Ky*KKSLIO|i", &dir, &nslots, &h, &size, &seq, &checksum, &t0, &flags, &exts,
                          &displace))
        return NULL;
    if (!check_table(&dir, nslots)) goto out;
    if (h.len != 16) {
        PyErr_SetString(PyExc_ValueError, "a 16-byte key hash");
        goto out;
    }
    long r = put_slot(&dir, nslots, h.buf, size, seq, checksum, t0, flags, exts, displace);
    if (r != -2) result = PyLong_FromLong(r);
out:
    PyBuffer_Release(&dir);
    PyBuffer_Release(&h);
    return result;
}

/* The attributes of a mirror entry (kvfsd.mirror.MemEntry) a slot is made of. */
static PyObject *A_SIZE, *A_SEQ, *A_CHECKSUM, *A_T0, *A_DIRTY, *A_EXTS;

static int entry_attrs(void) {
    if (A_SIZE) return 1;
    A_SIZE = PyUnicode_InternFromString("size");
    A_SEQ = PyUnicode_InternFromString("seq");
    A_CHECKSUM = PyUnicode_InternFromString("checksum");
    A_T0 = PyUnicode_InternFromString("t0");
    A_DIRTY = PyUnicode_InternFromString("dirty");
    A_EXTS = PyUnicode_InternFromString("exts");
    return A_SIZE && A_SEQ && A_CHECKSUM && A_T0 && A_DIRTY && A_EXTS;
}

static int entry_body(unsigned char *body, PyObject *ok, PyObject *m, uint32_t now);
int kv_mem_entry_fields(PyObject *m, long long *size, long long *seq, PyObject **sum, long long *t0, int *dirty,
                        PyObject **exts); /* mirror.c */

/* dir_put_entry(directory, nslots, object key, entry): dir_put of a mirror
   entry, its key hash (xxh3-128 of the object key) and fields taken here:
   one call instead of a hash, six attribute reads and a nine-argument call
   in Python, twice per T0 put. */
PyObject *kv_dir_put_entry(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer dir;
    unsigned long long nslots;
    PyObject *ok, *m, *result = NULL;
    int displace = 0;
    if (!PyArg_ParseTuple(args, "w*KSO|i", &dir, &nslots, &ok, &m, &displace)) return NULL;
    if (check_table(&dir, nslots) && entry_attrs()) {
        unsigned char body[DIR_SLOT];
        uint32_t now = dir_now(&dir);
        if (entry_body(body, ok, m, now))
            result = PyLong_FromLong(place_body((unsigned char *)dir.buf, nslots, body, now, displace));
    }
    PyBuffer_Release(&dir);
    return result;
}

/* The slot (make_body) of one mirror entry under object key ok: 0 with an error set. */
static int entry_body(unsigned char *body, PyObject *ok, PyObject *m, uint32_t now) {
    if (!PyBytes_Check(ok)) {
        PyErr_SetString(PyExc_TypeError, "object keys are bytes");
        return 0;
    }
    XXH128_canonical_t c;
    long long fsize, fseq, ft0;
    int fdirty;
    PyObject *fsum, *fexts;
    if (kv_mem_entry_fields(m, &fsize, &fseq, &fsum, &ft0, &fdirty, &fexts)) { /* the C entry: no attribute reads */
        if (fsize < 0 || fseq < 0) {
            PyErr_SetString(PyExc_ValueError, "size and seq are non-negative");
            return 0;
        }
        XXH128_canonicalFromHash(&c, XXH3_128bits(PyBytes_AS_STRING(ok), (size_t)PyBytes_GET_SIZE(ok)));
        return make_body(body, c.digest, (unsigned long long)fsize, (unsigned long long)fseq, fsum, ft0,
                         fdirty ? 0u : 1u /* IN_T1 */, fexts, now);
    }
    PyObject *size = NULL, *seq = NULL, *sum = NULL, *t0 = NULL, *dirty = NULL, *exts = NULL;
    int r = 0;
    size = PyObject_GetAttr(m, A_SIZE);
    seq = size ? PyObject_GetAttr(m, A_SEQ) : NULL;
    sum = seq ? PyObject_GetAttr(m, A_CHECKSUM) : NULL;
    t0 = sum ? PyObject_GetAttr(m, A_T0) : NULL;
    dirty = t0 ? PyObject_GetAttr(m, A_DIRTY) : NULL;
    exts = dirty ? PyObject_GetAttr(m, A_EXTS) : NULL;
    if (exts) {
        uint64_t usize, useq;
        long long off = PyLong_AsLongLong(t0);
        int is_dirty = PyObject_IsTrue(dirty);
        if (get_u64(size, &usize) && get_u64(seq, &useq) && !(off == -1 && PyErr_Occurred()) && is_dirty >= 0) {
            XXH128_canonicalFromHash(&c, XXH3_128bits(PyBytes_AS_STRING(ok), (size_t)PyBytes_GET_SIZE(ok)));
            r = make_body(body, c.digest, usize, useq, sum, off, is_dirty ? 0u : 1u /* IN_T1 */, exts, now);
        }
    }
    Py_XDECREF(size);
    Py_XDECREF(seq);
    Py_XDECREF(sum);
    Py_XDECREF(t0);
    Py_XDECREF(dirty);
    Py_XDECREF(exts);
    return r;
}

/* In a busy daemon a slot's placement waits mostly on one cache miss, the
   first read of its home bucket: the table is large, each key's bucket is
   random, and the other threads keep it out of the cache. So a batch asks
   for the buckets of the key DIR_PREFETCH places ahead while it places
   this one, and the misses of a batch overlap instead of coming one after
   another (the 4 KiB steady state's placements: 0.55-0.69 -> 0.42-0.51 us
   per object on the 2-core VM). A new key's (DISPLACE) next bucket is
   asked for too: a full table's keys spill into it. Always inlined: a
   function of prefetches alone has no effect GCC keeps a call for. */
#define DIR_PREFETCH 8

static inline __attribute__((always_inline)) void prefetch_home(const unsigned char *dirbuf,
                                                                unsigned long long nslots,
                                                                const unsigned char *body, int buckets) {
    const unsigned char *table = dirbuf + DIR_HEADER;
    uint64_t nbuckets = nslots / DIR_BUCKET, b = home_bucket(body + SLOT_HASH, nbuckets);
    __builtin_prefetch(table + nslots * DIR_SLOT + b); /* its hop byte */
    for (int i = 0; i < buckets; i++) {
        const unsigned char *bucket = table + ((b + i) & (nbuckets - 1)) * DIR_BUCKET * DIR_SLOT;
        for (int j = 0; j < DIR_BUCKET; j++) {
            __builtin_prefetch(bucket + j * DIR_SLOT);      /* key hash .. T0 offset */
            __builtin_prefetch(bucket + j * DIR_SLOT + 64); /* flags (the victim rule's stamp) */
        }
    }
}

/* a batch of at least this many slots is placed without the GIL (below
   it, giving the GIL up and taking it back costs more than it frees) */
#define DIR_NOGIL_MIN 8

/* dir_put_entries(directory, nslots, object keys, entries, displace=0, current=None, yield_gil=True)
   -> (slots taken, slots taken from other keys, entries left out): dir_put_entry
   of a batch in one call (a T0 put batch is published, then written back).
   The slots are made first, holding the GIL, then placed in the table
   without it (unless yield_gil is false): the daemon's other threads run
   meanwhile (a full table's new keys read a window of slots each), and its
   lock, which every directory writer holds, keeps the table to one writer.
   On an error the slots made before it are placed, as one by one. */
PyObject *kv_dir_put_entries(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer dir;
    unsigned long long nslots;
    PyObject *oks, *ms, *result = NULL, *current = Py_None;
    int displace = 0, yield_gil = 1;
    unsigned char *bodies = NULL;
    if (!PyArg_ParseTuple(args, "w*KO!O!|iOp", &dir, &nslots, &PyList_Type, &oks, &PyList_Type, &ms, &displace,
                          &current, &yield_gil))
        return NULL;
    if (current != Py_None && !PyDict_Check(current)) {
        PyErr_SetString(PyExc_TypeError, "current is a dict or None");
        PyBuffer_Release(&dir);
        return NULL;
    }
    if (!check_table(&dir, nslots) || !entry_attrs()) goto out;
    Py_ssize_t n = PyList_GET_SIZE(oks);
    if (n != PyList_GET_SIZE(ms)) {
        PyErr_SetString(PyExc_ValueError, "one entry per object key");
        goto out;
    }
    bodies = PyMem_RawMalloc((size_t)(n ? n : 1) * DIR_SLOT);
    if (!bodies) {
        PyErr_NoMemory();
        goto out;
    }
    uint32_t now = dir_now(&dir);
    Py_ssize_t made = 0;
    int failed = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (current != Py_None) { /* only entries still the mirror's for their key */
            PyObject *cur = PyDict_GetItemWithError(current, PyList_GET_ITEM(oks, i)); /* borrowed */
            if (!cur && PyErr_Occurred()) {
                failed = 1;
                break;
            }
            if (cur != PyList_GET_ITEM(ms, i)) continue;
        }
        if (!entry_body(bodies + made * DIR_SLOT, PyList_GET_ITEM(oks, i), PyList_GET_ITEM(ms, i), now)) {
            failed = 1;
            break;
        }
        made++;
    }
    long taken = 0, displaced = 0, left = 0;
    unsigned char *buf = (unsigned char *)dir.buf;
    PyThreadState *ts = yield_gil && made >= DIR_NOGIL_MIN ? PyEval_SaveThread() : NULL;
    int ahead = displace == DISPLACE ? 2 : 1;
    for (Py_ssize_t i = 0; i < made && i < DIR_PREFETCH; i++)
        prefetch_home(buf, nslots, bodies + i * DIR_SLOT, ahead);
    for (Py_ssize_t i = 0; i < made; i++) {
        if (i + DIR_PREFETCH < made) prefetch_home(buf, nslots, bodies + (i + DIR_PREFETCH) * DIR_SLOT, ahead);
        long r = place_body(buf, nslots, bodies + i * DIR_SLOT, now, displace);
        taken += r == 1;
        displaced += r == 2;
        left += r == -1;
    }
    if (ts) PyEval_RestoreThread(ts);
    if (!failed) result = Py_BuildValue("lll", taken, displaced, left);
out:
    PyMem_RawFree(bodies);
    PyBuffer_Release(&dir);
    return result;
}

PyObject *kv_dir_del(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer dir, h;
    unsigned long long nslots;
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "w*Ky*", &dir, &nslots, &h)) return NULL;
    if (!check_table(&dir, nslots)) goto out;
    if (h.len != 16) {
        PyErr_SetString(PyExc_ValueError, "a 16-byte key hash");
        goto out;
    }
    unsigned char *table = (unsigned char *)dir.buf + DIR_HEADER;
    unsigned char *hops = table + nslots * DIR_SLOT;
    uint64_t nbuckets = nslots / DIR_BUCKET;
    unsigned char *slot = key_slot(table, hops, nbuckets, h.buf);
    if (!slot) {
        result = PyLong_FromLong(-1);
        goto out;
    }
    static const unsigned char zero[DIR_SLOT];
    write_slot(slot, zero);
    set_hop(table, hops, nbuckets, h.buf, slot, 0); /* after it left */
    result = PyLong_FromSsize_t((Py_ssize_t)(slot - (unsigned char *)dir.buf));
out:
    PyBuffer_Release(&dir);
    PyBuffer_Release(&h);
    return result;
}
