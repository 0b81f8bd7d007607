/*
 * XXH3-128 of long inputs (> 240 bytes), cut so that a GPU can compute it.
 *
 * One source for two compilers: kvfs/gpu_hash.py compiles it with NVRTC
 * (KV_HD = __device__) to hash device memory before a put copies it to the
 * host, and native/kvfs_native.c compiles it for the CPU (KV_HD empty) so
 * the same functions are tested against xxHash on machines without a GPU.
 * It must stay plain C that both accept: no headers, no standard library.
 *
 * Why this split is exact. XXH3's long-input loop keeps 8 64-bit lanes. A
 * 64-byte stripe adds to lane l a term that depends only on the stripe's
 * bytes and the secret (the 8 bytes of lane l^1, plus the 32x32->64
 * product of lane l's bytes xor the secret); after each 1 KiB block
 * (16 stripes) every lane is scrambled on its own. Addition is associative
 * (mod 2^64), so:
 *   phase 1 (every block of the value in parallel, memory-bound):
 *       bs[b][l] = sum over the 16 stripes of block b of lane l's term;
 *   phase 2 (per hashed range and lane, a short sequential chain):
 *       acc[l] = scramble(acc[l] + bs[b][l])   for each full block b,
 *   then the range's last partial block and last stripe straight from the
 *   data, and the standard merge of the 8 lanes into 128 bits.
 * A range that starts on a 1 KiB boundary of the value (every chunk does:
 * the stripe unit is a multiple of 1 KiB) reuses the value's block sums,
 * so one phase 1 serves a value's whole-value sum and its chunk sums.
 * Lanes never mix before the merge, so each runs in its own thread.
 *
 * Layout of the block sums: 8 kv_u64 per 1 KiB block, lane-major inside a
 * block. Data loads in phase 1 are aligned 8-byte loads: the value's first
 * byte must be 8-byte aligned (the caller checks). Tails and the secret are
 * read byte by byte (any alignment).
 */
#ifndef KV_XXH3_LANES_H
#define KV_XXH3_LANES_H

#ifndef KV_HD
#define KV_HD static inline
#endif
#ifndef KV_SECRET_QUAL
#define KV_SECRET_QUAL static const
#endif

typedef unsigned long long kv_u64;
typedef unsigned char kv_u8;

#define KV_STRIPE 64
#define KV_BLOCK 1024
#define KV_LANES 8
#define KV_MIDSIZE_MAX 240 /* longer inputs take the long path below */

#define KV_P32_1 0x9E3779B1ULL
#define KV_P32_2 0x85EBCA77ULL
#define KV_P32_3 0xC2B2AE3DULL
#define KV_P64_1 0x9E3779B185EBCA87ULL
#define KV_P64_2 0xC2B2AE3D27D4EB4FULL
#define KV_P64_3 0x165667B19E3779F9ULL
#define KV_P64_4 0x85EBCA77C2B2AE63ULL
#define KV_P64_5 0x27D4EB2F165667C5ULL

/* XXH3's default secret (xxhash.h, XXH3_kSecret) */
KV_SECRET_QUAL kv_u8 kv_secret[192] = {
    0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c,
    0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f,
    0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21,
    0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26, 0x4c,
    0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3,
    0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8,
    0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d,
    0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31, 0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64,
    0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb, 0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb,
    0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0, 0xda, 0x49, 0xd3, 0x16, 0x55, 0x26, 0x29, 0xd4, 0x68, 0x9e,
    0x2b, 0x16, 0xbe, 0x58, 0x7d, 0x47, 0xa1, 0xfc, 0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce,
    0x45, 0xcb, 0x3a, 0x8f, 0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e,
};

/* little-endian 8 bytes at any alignment */
KV_HD kv_u64 kv_rd64(const kv_u8 *p) {
    kv_u64 v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

/* little-endian 8 bytes at an 8-byte aligned address (phase 1's loads) */
KV_HD kv_u64 kv_ld64(const kv_u8 *p) {
#ifdef __CUDACC_RTC__
    return *(const kv_u64 *)p;
#else
    return kv_rd64(p); /* compiles to one load on little-endian CPUs */
#endif
}

KV_HD kv_u64 kv_mul128_fold64(kv_u64 a, kv_u64 b) {
#ifdef __CUDACC_RTC__
    return (a * b) ^ __umul64hi(a, b);
#else
    unsigned __int128 p = (unsigned __int128)a * b;
    return (kv_u64)p ^ (kv_u64)(p >> 64);
#endif
}

KV_HD kv_u64 kv_init_acc(int lane) {
    switch (lane) {
    case 0: return KV_P32_3;
    case 1: return KV_P64_1;
    case 2: return KV_P64_2;
    case 3: return KV_P64_3;
    case 4: return KV_P64_4;
    case 5: return KV_P32_2;
    case 6: return KV_P64_5;
    default: return KV_P32_1;
    }
}

/* lane l's term of the stripe at p (secret at s): what XXH3_accumulate_512
 * adds to acc[l] (acc[l^1] gets lane l's data: adjacent lanes swap) */
KV_HD kv_u64 kv_stripe_term(kv_u64 mine, kv_u64 other, kv_u64 secret) {
    kv_u64 key = mine ^ secret;
    return other + (key & 0xFFFFFFFFULL) * (key >> 32);
}

KV_HD kv_u64 kv_scramble(kv_u64 acc, int lane) {
    acc ^= acc >> 47;
    acc ^= kv_rd64(kv_secret + 192 - KV_STRIPE + 8 * lane);
    return acc * KV_P32_1;
}

/* Phase 1: the block sums of lanes 2k and 2k+1 of full block `block` of the
 * value at `value` (8-byte aligned), into out[2k] and out[2k+1]. */
KV_HD void kv_block_pair(const kv_u8 *value, kv_u64 block, int k, kv_u64 *out) {
    const kv_u8 *b = value + block * KV_BLOCK + 16 * k;
    kv_u64 s0 = 0, s1 = 0;
#ifdef __CUDACC_RTC__
#pragma unroll
#endif
    for (int s = 0; s < KV_BLOCK / KV_STRIPE; s++) {
        kv_u64 d0 = kv_ld64(b + KV_STRIPE * s), d1 = kv_ld64(b + KV_STRIPE * s + 8);
        s0 += kv_stripe_term(d0, d1, kv_rd64(kv_secret + 8 * s + 16 * k));
        s1 += kv_stripe_term(d1, d0, kv_rd64(kv_secret + 8 * s + 16 * k + 8));
    }
    out[2 * k] = s0;
    out[2 * k + 1] = s1;
}

/* Phase 2, one lane: the accumulator of lane `lane` for the range of `len`
 * (> 240) bytes at `p`, whose full blocks' sums start at `bs` (the range's
 * first block). */
KV_HD kv_u64 kv_range_lane(const kv_u64 *bs, const kv_u8 *p, kv_u64 len, int lane) {
    kv_u64 acc = kv_init_acc(lane);
    kv_u64 nfull = (len - 1) / KV_BLOCK;
    kv_u64 b = 0;
    /* the loads do not depend on acc: batches of them are issued together
     * (on a GPU the chain is latency-bound: many loads in flight per thread) */
    kv_u64 key = kv_rd64(kv_secret + 192 - KV_STRIPE + 8 * lane);
    for (; b + 32 <= nfull; b += 32) {
        kv_u64 t[32];
        for (int i = 0; i < 32; i++) t[i] = bs[(b + i) * KV_LANES + lane];
        for (int i = 0; i < 32; i++) {
            acc += t[i];
            acc ^= acc >> 47;
            acc = (acc ^ key) * KV_P32_1;
        }
    }
    for (; b < nfull; b++) acc = kv_scramble(acc + bs[b * KV_LANES + lane], lane);
    /* the last, partial block: its whole stripes, then the input's last 64
     * bytes against the secret shifted by XXH_SECRET_LASTACC_START (7) */
    const kv_u8 *tail = p + nfull * KV_BLOCK;
    kv_u64 nstripes = ((len - 1) - nfull * KV_BLOCK) / KV_STRIPE;
    for (kv_u64 s = 0; s < nstripes; s++)
        acc += kv_stripe_term(kv_rd64(tail + KV_STRIPE * s + 8 * lane), kv_rd64(tail + KV_STRIPE * s + 8 * (lane ^ 1)),
                              kv_rd64(kv_secret + 8 * s + 8 * lane));
    const kv_u8 *last = p + len - KV_STRIPE;
    acc += kv_stripe_term(kv_rd64(last + 8 * lane), kv_rd64(last + 8 * (lane ^ 1)),
                          kv_rd64(kv_secret + 192 - KV_STRIPE - 7 + 8 * lane));
    return acc;
}

KV_HD kv_u64 kv_merge_accs(const kv_u64 *acc, const kv_u8 *secret, kv_u64 start) {
    kv_u64 r = start;
    for (int i = 0; i < 4; i++)
        r += kv_mul128_fold64(acc[2 * i] ^ kv_rd64(secret + 16 * i), acc[2 * i + 1] ^ kv_rd64(secret + 16 * i + 8));
    r ^= r >> 37;
    r *= 0x165667919E3779F9ULL;
    return r ^ (r >> 32);
}

/* The 8 lanes merged into XXH3-128's canonical form (big-endian high64,
 * then low64: what xxhash's digest() returns). */
KV_HD void kv_finish128(const kv_u64 *acc, kv_u64 len, kv_u8 *out) {
    kv_u64 lo = kv_merge_accs(acc, kv_secret + 11, len * KV_P64_1);
    kv_u64 hi = kv_merge_accs(acc, kv_secret + 192 - 64 - 11, ~(len * KV_P64_2));
    for (int i = 0; i < 8; i++) {
        out[i] = (kv_u8)(hi >> (56 - 8 * i));
        out[8 + i] = (kv_u8)(lo >> (56 - 8 * i));
    }
}

#endif
