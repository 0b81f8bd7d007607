/*
 * The C entry points kvfs._native lends to other extensions of kvfs (the C
 * mount, native/cfuse*.c), through the capsule "kvfs._native._C_API":
 * the hashing loops picked at import for this CPU (hash_impl.h), so a
 * second extension neither compiles them again nor picks differently.
 * Bump KV_C_API_VERSION when a member changes.
 */
#ifndef KV_API_H
#define KV_API_H
#include <stddef.h>
#include <stdint.h>

#define KV_C_API_CAPSULE "kvfs._native._C_API"
#define KV_C_API_VERSION 1

typedef struct {
    int version;
    /* xxh3-128 of p[0:n], canonical (big-endian) bytes */
    void (*hash16)(const void *p, size_t n, unsigned char out[16]);
    /* pread len bytes at off into dst, hashed as they land: 0 ok, 1 short file, 2 mismatch, -errno */
    int (*read_verify)(int fd, int64_t off, char *dst, size_t len, const unsigned char *want);
    /* a streaming xxh3-128 (state of hstate_size() bytes, 64-byte aligned) */
    size_t (*hstate_size)(void);
    void (*hreset)(void *st);
    void (*hupdate)(void *st, const void *p, size_t n);
    void (*hdigest)(void *st, unsigned char out[16]);
} kv_c_api;

#endif
