/*
 * Reads of open objects in the C mount (see cfuse.h).
 *
 * A read request names a byte range; it is served from the chunks it
 * covers, each verified whole before any of its bytes goes out:
 * - T1: the chunk is pread into a slot of the handle and hashed as it
 *   lands (kvfs._native's read_verify). A slot is kept for the next
 *   requests (the kernel reads ahead in 1 MiB requests, several at once,
 *   from several threads); the reply is a writev from the slot, so the
 *   only user-space copy is the one verification needs.
 * - T0: the chunk is hashed in place in the arena, once per handle, and
 *   the reply is a writev straight from the arena.
 *
 * No request ever waits for a slot held by another request: a request
 * that finds every slot busy loads its chunk into a buffer of its own
 * (counted as chunks_private). It only waits for a slot that is loading
 * the very chunk it needs, and a loader waits for nothing, so there is no
 * cycle to deadlock on.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>

#include "cfuse.h"

#define ADVISE_AHEAD 4  /* chunks the kernel is asked to read ahead of a load (cold disks) */

void cf_read_init(cf_handle *h) {
    pthread_mutex_init(&h->mu, NULL);
    pthread_cond_init(&h->cv, NULL);
    for (int i = 0; i < CF_SLOTS; i++) h->slots[i] = (cf_slot){.ci = -1};
}

void cf_read_free(cf_handle *h) {
    for (int i = 0; i < CF_SLOTS; i++) free(h->slots[i].buf);
    pthread_mutex_destroy(&h->mu);
    pthread_cond_destroy(&h->cv);
}

static int64_t chunk_pos(const cf_handle *h, int64_t ci) { return ci * h->unit; }

static void advise_ahead(cf_handle *h, int64_t ci) {
    for (int64_t j = ci + 1; j < h->nchunks && j <= ci + ADVISE_AHEAD; j++) {
        if (atomic_exchange(&h->advised[j], 1)) continue;
        const cf_chunk *c = &h->chunks[j];
        if (c->fd >= 0) posix_fadvise(c->fd, c->off, c->len, POSIX_FADV_WILLNEED);
    }
}

/* Load chunk ci into buf, verified: 0, or EIO (a short or failed read, or
 * a checksum that does not match: the chunk is bad). */
static int load(cf_handle *h, int64_t ci, char *buf) {
    const cf_chunk *c = &h->chunks[ci];
    if (c->fd < 0) return EIO;
    advise_ahead(h, ci);
    atomic_fetch_add_explicit(&cf_stats.chunks_loaded, 1, memory_order_relaxed);
    return cf_kv->read_verify(c->fd, c->off, buf, (size_t)c->len, c->csum) == 0 ? 0 : EIO;
}

/* A slot holding chunk ci, verified and pinned (refs + 1): its index, or
 * -1 with *buf set to a private verified copy the caller frees, or -1
 * with *err set. */
static int pin(cf_handle *h, int64_t ci, char **buf, int *err) {
    *buf = NULL;
    pthread_mutex_lock(&h->mu);
    for (;;) {
        int found = -1;
        for (int i = 0; i < CF_SLOTS; i++)
            if (h->slots[i].ci == ci && h->slots[i].state != SLOT_EMPTY) found = i;
        if (found < 0) break;
        cf_slot *s = &h->slots[found];
        if (s->state == SLOT_READY) {
            s->refs++;
            s->used = ++h->tick;
            pthread_mutex_unlock(&h->mu);
            return found;
        }
        pthread_cond_wait(&h->cv, &h->mu);  /* being loaded by another request */
        if (atomic_load(&h->bad)) {
            pthread_mutex_unlock(&h->mu);
            *err = EIO;
            return -1;
        }
    }
    int victim = -1;
    for (int i = 0; i < CF_SLOTS; i++) {
        cf_slot *s = &h->slots[i];
        if (s->refs == 0 && s->state != SLOT_LOADING && (victim < 0 || s->used < h->slots[victim].used))
            victim = i;
    }
    size_t len = (size_t)h->chunks[ci].len;
    if (victim < 0) {  /* every slot in use: a buffer of our own, no waiting */
        pthread_mutex_unlock(&h->mu);
        atomic_fetch_add_explicit(&cf_stats.chunks_private, 1, memory_order_relaxed);
        char *mine = malloc(len ? len : 1);
        if (!mine) {
            *err = ENOMEM;
            return -1;
        }
        *err = load(h, ci, mine);
        if (*err) {
            free(mine);
            return -1;
        }
        *buf = mine;
        return -1;
    }
    cf_slot *s = &h->slots[victim];
    if (s->cap < len) {
        free(s->buf);
        s->buf = malloc(len);
        s->cap = s->buf ? len : 0;
        if (!s->buf) {
            s->state = SLOT_EMPTY;
            pthread_mutex_unlock(&h->mu);
            *err = ENOMEM;
            return -1;
        }
    }
    s->ci = ci;
    s->state = SLOT_LOADING;
    s->refs = 1;
    s->used = ++h->tick;
    pthread_mutex_unlock(&h->mu);
    int e = load(h, ci, s->buf);  /* no lock held: a loader waits for nothing */
    pthread_mutex_lock(&h->mu);
    if (e) {
        s->state = SLOT_EMPTY;
        s->refs = 0;
        atomic_store(&h->bad, 1);
    } else {
        s->state = SLOT_READY;
    }
    pthread_cond_broadcast(&h->cv);
    pthread_mutex_unlock(&h->mu);
    if (e) {
        *err = e;
        return -1;
    }
    return victim;
}

static void unpin(cf_handle *h, int slot) {
    pthread_mutex_lock(&h->mu);
    h->slots[slot].refs--;
    pthread_mutex_unlock(&h->mu);
}

/* T0: chunk ci checked in place (once per handle). */
static int t0_check(cf_handle *h, int64_t ci) {
    if (atomic_load_explicit(&h->verified[ci], memory_order_acquire)) return 0;
    const cf_chunk *c = &h->chunks[ci];
    unsigned char got[16];
    cf_kv->hash16(h->t0 + chunk_pos(h, ci), (size_t)c->len, got);
    if (memcmp(got, c->csum, 16) != 0) {
        atomic_store(&h->bad, 1);
        return EIO;
    }
    atomic_fetch_add_explicit(&cf_stats.t0_verified, 1, memory_order_relaxed);
    atomic_store_explicit(&h->verified[ci], 1, memory_order_release);
    return 0;
}

int cf_read(fuse_req_t req, cf_handle *h, size_t size, off_t off) {
    if (atomic_load(&h->bad)) return EIO;
    if (off < 0) return EINVAL;
    int64_t end = off + (int64_t)size < h->size ? off + (int64_t)size : h->size;
    if (off >= end) {
        fuse_reply_buf(req, NULL, 0);
        return 0;
    }
    atomic_fetch_add_explicit(&cf_stats.reads, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&cf_stats.read_bytes, end - off, memory_order_relaxed);
    int64_t first = off / h->unit, last = (end - 1) / h->unit;
    int n = (int)(last - first + 1);
    struct iovec iov_small[4];
    int slot_small[4];
    char *mine_small[4];
    struct iovec *iov = n <= 4 ? iov_small : calloc((size_t)n, sizeof *iov);
    int *slot = n <= 4 ? slot_small : calloc((size_t)n, sizeof *slot);
    char **mine = n <= 4 ? mine_small : calloc((size_t)n, sizeof *mine);
    int err = (!iov || !slot || !mine) ? ENOMEM : 0;
    int got = 0;
    for (int64_t ci = first; !err && ci <= last; ci++, got++) {
        int64_t pos = chunk_pos(h, ci);
        const char *base;
        slot[got] = -1;
        mine[got] = NULL;
        if (h->t0) {
            err = t0_check(h, ci);
            base = h->t0 + pos;
        } else {
            slot[got] = pin(h, ci, &mine[got], &err);
            base = slot[got] >= 0 ? h->slots[slot[got]].buf : mine[got];
        }
        if (err) break;
        int64_t from = off > pos ? off - pos : 0;
        int64_t to = (end < pos + h->chunks[ci].len ? end : pos + h->chunks[ci].len) - pos;
        iov[got].iov_base = (char *)base + from;
        iov[got].iov_len = (size_t)(to - from);
    }
    if (!err) fuse_reply_iov(req, iov, got);
    for (int i = 0; i < got && slot && mine; i++) {
        if (slot[i] >= 0) unpin(h, slot[i]);
        free(mine[i]);
    }
    if (iov != iov_small) free(iov);
    if (slot != slot_small) free(slot);
    if (mine != mine_small) free(mine);
    if (err == EIO) atomic_fetch_add_explicit(&cf_stats.bad, 1, memory_order_relaxed);
    return err;
}
