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
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#define XXH_INLINE_ALL
#include "vendor/xxhash.h"

/* kvfs/directory.py */
#define DIR_HEADER 4096
#define DIR_SLOT 192
#define DIR_BUCKET 4
#define DIR_PROBE 8
#define MAX_KEY_CHARS 200
#define MAX_NS_BYTES 400

enum { ABSENT = 0, PRESENT = 1, SLOW_PATH = 2, UNKNOWN = 3 };

/* 1 present, 0 not this key, -1 the slot kept changing under us */
static int slot_holds(const unsigned char *slot, const unsigned char *h) {
    for (int tries = 0; tries < 16; tries++) {
        uint64_t v1 = __atomic_load_n((const uint64_t *)slot, __ATOMIC_ACQUIRE);
        if (v1 & 1) continue;
        int eq = memcmp(slot + 8, h, 16) == 0;
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
    if (nslots < DIR_BUCKET * DIR_PROBE || (nslots & (nslots - 1)) ||
        (unsigned long long)dir.len < DIR_HEADER + nslots * DIR_SLOT + nslots / DIR_BUCKET) {
        PyErr_SetString(PyExc_ValueError, "directory buffer does not hold that many slots");
        goto out;
    }
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
