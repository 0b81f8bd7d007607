/*
 * Hashing loops of kvfs._native, compiled twice: hash_generic.c (baseline
 * x86-64 / any CPU) and hash_avx2.c (AVX2), picked at import by CPU
 * support. xxh3 with AVX2 is what lets a copy verified on the fly run near
 * memcpy speed (see README, "native"). KV_FN(name) adds the variant suffix.
 *
 * The fused loops copy or read a step of bytes, then hash those bytes while
 * they are still in cache, instead of a second pass over cold memory; the
 * streaming digest equals the one-shot digest.
 */
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#define XXH_INLINE_ALL
#include "vendor/xxhash.h"

/* Copies are hashed in 16 KiB steps (what was just copied is still in L1);
 * reads in 1 MiB steps (fewer syscalls matter more there: see the
 * README's native figures). */
#define SUB (16u << 10)
#define SUB_READ (1024u << 10)

void KV_FN(hash16)(const void *p, size_t n, unsigned char out[16]) {
    XXH128_canonical_t c;
    XXH128_canonicalFromHash(&c, XXH3_128bits(p, n));
    memcpy(out, c.digest, 16);
}

/* Copies of at least NT_MIN bytes store around the cache (non-temporal
 * stores): the destination is written once and read later by someone else
 * (an H2D copy, a model), so loading it into the cache first (the
 * read-for-ownership of a plain memcpy) is a third stream of memory traffic
 * for nothing. Measured here: a verified 1 MiB copy at 0.75 x memcpy with
 * memcpy + hash of the destination, 1.0 x with this + hash of the source
 * while it is still in cache. An sfence ends every such copy, so the bytes
 * are visible before anyone is told the copy is done. */
#define NT_MIN (32u << 10)
#if defined(__x86_64__) && defined(__GNUC__)
#include <emmintrin.h>
#define NT_ABOVE (NT_MIN - 1)
static void copy_nt(char *dst, const char *src, size_t n) {
    size_t head = (16 - ((uintptr_t)dst & 15)) & 15;
    if (head > n) head = n;
    memcpy(dst, src, head);
    size_t i = head;
    for (; i + 64 <= n; i += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)(src + i));
        __m128i b = _mm_loadu_si128((const __m128i *)(src + i + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(src + i + 32));
        __m128i d = _mm_loadu_si128((const __m128i *)(src + i + 48));
        _mm_stream_si128((__m128i *)(dst + i), a);
        _mm_stream_si128((__m128i *)(dst + i + 16), b);
        _mm_stream_si128((__m128i *)(dst + i + 32), c);
        _mm_stream_si128((__m128i *)(dst + i + 48), d);
    }
    memcpy(dst + i, src + i, n - i);
}
#define NT_FENCE() _mm_sfence()
#else
#define NT_ABOVE SIZE_MAX /* no streaming stores here: every copy is a memcpy */
#define copy_nt memcpy
#define NT_FENCE() ((void)0)
#endif

/* A plain copy (no verification): non-temporal from NT_MIN bytes. */
void KV_FN(copy_plain)(char *dst, const char *src, size_t len) {
    if (len <= NT_ABOVE) {
        memcpy(dst, src, len);
        return;
    }
    copy_nt(dst, src, len);
    NT_FENCE();
}

/* Returns 0 if the copy's xxh3-128 is `want`, 2 if not. From NT_MIN bytes
 * the step is hashed in the source, where the copy just loaded it, since
 * the non-temporal destination is not in cache. That verifies the bytes the
 * copy read: a source that changed between the copy and its hash could only
 * be arena space reused under a reader, and every arena read checks the
 * removal generation after its copy for exactly that (kvfs/directory.py). */
int KV_FN(copy_verify)(char *dst, const char *src, size_t len, const unsigned char *want) {
    XXH3_state_t st;
    XXH3_128bits_reset(&st);
    int nt = len > NT_ABOVE;
    for (size_t pos = 0; pos < len; pos += SUB) {
        size_t n = len - pos < SUB ? len - pos : SUB;
        if (nt)
            copy_nt(dst + pos, src + pos, n);
        else
            memcpy(dst + pos, src + pos, n);
        XXH3_128bits_update(&st, (nt ? src : dst) + pos, n);
    }
    if (nt) NT_FENCE();
    XXH128_canonical_t c;
    XXH128_canonicalFromHash(&c, XXH3_128bits_digest(&st));
    return memcmp(c.digest, want, 16) == 0 ? 0 : 2;
}

/* Returns 0 ok, 1 short file, 2 mismatch, -errno. */
int KV_FN(read_verify)(int fd, int64_t off, char *dst, size_t len, const unsigned char *want) {
    XXH3_state_t st;
    XXH3_128bits_reset(&st);
    for (size_t pos = 0; pos < len;) {
        size_t n = len - pos < SUB_READ ? len - pos : SUB_READ;
        size_t got = 0;
        while (got < n) {
            ssize_t r = pread(fd, dst + pos + got, n - got, off + (int64_t)(pos + got));
            if (r < 0) {
                if (errno == EINTR) continue;
                return -errno;
            }
            if (r == 0) return 1;
            got += (size_t)r;
        }
        XXH3_128bits_update(&st, dst + pos, n);
        pos += n;
    }
    XXH128_canonical_t c;
    XXH128_canonicalFromHash(&c, XXH3_128bits_digest(&st));
    return memcmp(c.digest, want, 16) == 0 ? 0 : 2;
}

/* One pass over a value: the xxh3-128 of each `chunk`-byte chunk (the last
 * may be shorter) into outs[16*i], and of the whole value into `whole`,
 * both fed the same step while it is in cache. A value of at most one chunk
 * is hashed once (its chunk sum is its whole sum). With `dst` the value is
 * also copied there, step by step, the hash taken of the source the copy
 * just loaded (a put's checksums are of the caller's bytes, not of the copy
 * another process could scribble on): one pass over the source instead of
 * a copy and then a hash. */
void KV_FN(hash_chunked)(char *dst, const char *p, size_t len, size_t chunk, unsigned char *whole,
                         unsigned char *outs) {
    if (len <= chunk && !dst) {
        KV_FN(hash16)(p, len, whole);
        memcpy(outs, whole, 16);
        return;
    }
    int single = len <= chunk;
    int nt = dst && len > NT_ABOVE;
    XXH3_state_t w, c;
    XXH128_canonical_t can;
    XXH3_128bits_reset(&w);
    size_t ci = 0;
    for (size_t cs = 0; cs < len || (len == 0 && ci == 0); cs += chunk, ci++) {
        size_t ce = len - cs < chunk ? len : cs + chunk;
        if (!single) XXH3_128bits_reset(&c);
        for (size_t pos = cs; pos < ce; pos += SUB) {
            size_t n = ce - pos < SUB ? ce - pos : SUB;
            if (nt)
                copy_nt(dst + pos, p + pos, n);
            else if (dst)
                memcpy(dst + pos, p + pos, n);
            if (!single) XXH3_128bits_update(&c, p + pos, n);
            XXH3_128bits_update(&w, p + pos, n);
        }
        if (!single) {
            XXH128_canonicalFromHash(&can, XXH3_128bits_digest(&c));
            memcpy(outs + 16 * ci, can.digest, 16);
        }
        if (len == 0) break;
    }
    if (nt) NT_FENCE();
    XXH128_canonicalFromHash(&can, XXH3_128bits_digest(&w));
    memcpy(whole, can.digest, 16);
    if (single) memcpy(outs, whole, 16);
}

/* A streaming xxh3-128 behind an opaque pointer (kvfs_native.c hashes the
 * pieces of one task in order, from whichever thread lands them): state
 * size (allocate 64-byte aligned), reset, update, canonical digest. */
size_t KV_FN(hstate_size)(void) { return sizeof(XXH3_state_t); }
void KV_FN(hreset)(void *st) { XXH3_128bits_reset((XXH3_state_t *)st); }
void KV_FN(hupdate)(void *st, const void *p, size_t n) { XXH3_128bits_update((XXH3_state_t *)st, p, n); }
void KV_FN(hdigest)(void *st, unsigned char out[16]) {
    XXH128_canonical_t c;
    XXH128_canonicalFromHash(&c, XXH3_128bits_digest((XXH3_state_t *)st));
    memcpy(out, c.digest, 16);
}
