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

/* Copies are hashed in 64 KiB steps (the copy's destination is still in
 * L1/L2); reads in 1 MiB steps (fewer syscalls matter more there: see the
 * README's native figures). */
#define SUB (64u << 10)
#define SUB_READ (1024u << 10)

void KV_FN(hash16)(const void *p, size_t n, unsigned char out[16]) {
    XXH128_canonical_t c;
    XXH128_canonicalFromHash(&c, XXH3_128bits(p, n));
    memcpy(out, c.digest, 16);
}

/* Returns 0 if the copy's xxh3-128 is `want`, 2 if not. */
int KV_FN(copy_verify)(char *dst, const char *src, size_t len, const unsigned char *want) {
    XXH3_state_t st;
    XXH3_128bits_reset(&st);
    for (size_t pos = 0; pos < len; pos += SUB) {
        size_t n = len - pos < SUB ? len - pos : SUB;
        memcpy(dst + pos, src + pos, n);
        XXH3_128bits_update(&st, dst + pos, n);
    }
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
 * both fed the same 64 KiB step while it is in cache. A value of at most one
 * chunk is hashed once (its chunk sum is its whole sum). */
void KV_FN(hash_chunked)(const char *p, size_t len, size_t chunk, unsigned char *whole, unsigned char *outs) {
    if (len <= chunk) {
        KV_FN(hash16)(p, len, whole);
        memcpy(outs, whole, 16);
        return;
    }
    XXH3_state_t w, c;
    XXH128_canonical_t can;
    XXH3_128bits_reset(&w);
    size_t ci = 0;
    for (size_t cs = 0; cs < len; cs += chunk, ci++) {
        size_t ce = len - cs < chunk ? len : cs + chunk;
        XXH3_128bits_reset(&c);
        for (size_t pos = cs; pos < ce; pos += SUB) {
            size_t n = ce - pos < SUB ? ce - pos : SUB;
            XXH3_128bits_update(&c, p + pos, n);
            XXH3_128bits_update(&w, p + pos, n);
        }
        XXH128_canonicalFromHash(&can, XXH3_128bits_digest(&c));
        memcpy(outs + 16 * ci, can.digest, 16);
    }
    XXH128_canonicalFromHash(&can, XXH3_128bits_digest(&w));
    memcpy(whole, can.digest, 16);
}
