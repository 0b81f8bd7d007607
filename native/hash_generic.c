/* The hashing loops for any x86-64 (SSE2) or other CPU. See hash_impl.h. */
#define _GNU_SOURCE
#define KV_FN(name) kv_##name##_generic
#include "hash_impl.h"
