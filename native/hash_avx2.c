/* The hashing loops built for AVX2; used only where the CPU has it. See hash_impl.h. */
#define _GNU_SOURCE
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx2")
#define XXH_VECTOR XXH_AVX2
#define KV_FN(name) kv_##name##_avx2
#include "hash_impl.h"
#define KV_HAVE_AVX2 1
#endif
int kv_avx2_built(void) {
#ifdef KV_HAVE_AVX2
    return 1;
#else
    return 0;
#endif
}
