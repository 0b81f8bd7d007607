/*
 * The location directory's slot layout (kvfs/directory.py), shared by its
 * reader and writer (directory.c) and the direct reads (kvfs_native.c).
 *
 * Slot: HEAD = u64 version | 16s key hash | u64 size | u64 seq | 16s sum |
 * i64 T0 offset | u32 flags | u32 nchunks, then DIR_MAX_CHUNKS x CHUNK =
 * u32 stripe | u32 length | u64 segment | u64 offset | 16s chunk sum.
 */
#ifndef KVFS_DIRECTORY_H
#define KVFS_DIRECTORY_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#define DIR_HEADER 4096
#define DIR_SLOT 192
#define DIR_BUCKET 4
#define DIR_PROBE 8
#define DIR_HEAD 72
#define DIR_CHUNK 40
#define DIR_MAX_CHUNKS 3
/* byte offsets in the header: resident keys outside the table, and how
   many times a key took another's slot (kvfs.directory's reader rule) */
#define DIR_OUTSIDE_AT 24
#define DIR_DISPLACED_AT 40
/* the writer's clock (kvfs.directory: one tick per write call); every slot
   write stamps its low 31 bits into the slot's flags above bit 0 */
#define DIR_CLOCK_AT 48
#define DIR_STAMP_SHIFT 1
#define DIR_STAMP_MASK 0x7FFFFFFFu

/* byte offsets in a slot */
#define SLOT_HASH 8
#define SLOT_SIZE 24
#define SLOT_SEQ 32
#define SLOT_SUM 40
#define SLOT_T0 56
#define SLOT_FLAGS 64
#define SLOT_NCHUNKS 68
/* byte offsets in a chunk */
#define CHUNK_STRIPE 0
#define CHUNK_LENGTH 4
#define CHUNK_SEG 8
#define CHUNK_OFFSET 16
#define CHUNK_SUM 24

/* The stable slot of ns/key, for a plain ASCII key: 1 found (slot in out),
   0 absent, -1 unknown or not a plain key (the caller takes the Python path). */
int kv_dir_find(const unsigned char *dir, uint64_t nslots, const char *ns, size_t nslen, PyObject *key,
                unsigned char *out);
/* 1 if the buffer holds a directory of nslots slots, else 0 with ValueError set. */
int kv_dir_check(Py_buffer *dir, unsigned long long nslots);

#endif
