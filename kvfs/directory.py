"""The location directory: a lossy hash table of object locations in shared
memory that the daemon keeps and clients read without a round trip.

A client's first get of a key, even one put by another process, then costs
a few microseconds instead of a lookup round trip through the daemon; what
the directory does not hold (objects of more than MAX_CHUNKS chunks, keys
that lost their slot to a collision) is looked up as before.

Layout: ``nslots`` slots of SLOT bytes in buckets of BUCKET slots; a key's
bucket is picked by the low bits of ``key_hash(ns, key)`` (xxh3-128 of
``ns NUL key``, as the index names objects). Slot (little-endian):

    u64 version | 16s key hash | u64 size | u64 seq | 16s checksum |
    i64 T0 offset (-1: none) | u32 flags (1: also in T1) | u32 nchunks |
    MAX_CHUNKS x (u32 stripe | u32 length | u64 segment | u64 offset | 16s chunk sum)

Concurrency: one writer (the daemon, under its engine lock) and any number
of lock-free readers. The writer makes a slot's version odd, changes the
slot, and makes it even again (a seqlock); a reader copies the slot and
keeps the copy only if the version was even and unchanged around the copy.

Invariant (kept by the daemon): a location leaves the directory *before*
the removal generation is bumped for the removal that ends it, and T0 bytes
are reused only after such a bump; so a reader that read the generation
before probing, copied the bytes, and finds the generation unchanged, read
bytes of a live location (kvfs.loccache relies on the same rule). And
everything read is verified by its checksum as well, unless verification
is off.
"""
from __future__ import annotations

import mmap
import os
import struct
from typing import Any

import xxhash

SLOT = 192
BUCKET = 4
MAX_CHUNKS = 3
HEAD = struct.Struct("<Q16sQQ16sqII")
CHUNK = struct.Struct("<IIQQ16s")
VERSION = struct.Struct("<Q")
assert HEAD.size + MAX_CHUNKS * CHUNK.size == SLOT
IN_T1 = 1


def key_hash(ns: str, key: str) -> bytes:
    return xxhash.xxh3_128_digest(ns.encode() + b"\x00" + key.encode())


def bucket_of(h: bytes, nslots: int) -> int:
    return (int.from_bytes(h[:8], "little") & (nslots // BUCKET - 1)) * BUCKET


class DirectoryReader:
    def __init__(self, path: str, nslots: int):
        if nslots < BUCKET or nslots & (nslots - 1):
            raise ValueError("directory slots must be a power of two")
        fd = os.open(path, os.O_RDONLY)
        try:
            self.mm = mmap.mmap(fd, nslots * SLOT, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)
        self.nslots = nslots

    def _slot(self, off: int, h: bytes) -> list[Any] | None:
        mm = self.mm
        for _ in range(4):
            v1 = VERSION.unpack_from(mm, off)[0]
            if v1 & 1:
                continue  # being written
            raw = mm[off:off + SLOT]
            if VERSION.unpack_from(mm, off)[0] != v1:
                continue
            _v, kh, size, seq, csum, t0, flags, n = HEAD.unpack_from(raw, 0)
            if kh != h or not n or n > MAX_CHUNKS:
                return None
            exts = []
            for i in range(n):
                stripe, length, seg, coff, ccs = CHUNK.unpack_from(raw, HEAD.size + i * CHUNK.size)
                exts.append([stripe, seg, coff, length, ccs])
            return [size, csum, seq, exts, None if t0 < 0 else [t0, bool(flags & IN_T1)]]
        return None

    def lookup_many(self, ns: str, keys: list[str], idx: list[int]) -> dict[int, list[Any]]:
        """Locations (lookup's wire form) of ``keys[i]`` for i in ``idx`` that
        the directory holds."""
        out: dict[int, list[Any]] = {}
        mm = self.mm
        nb = self.nslots // BUCKET - 1
        nsb = ns.encode() + b"\x00"
        digest = xxhash.xxh3_128_digest
        for i in idx:
            h = digest(nsb + keys[i].encode())
            base = (int.from_bytes(h[:8], "little") & nb) * BUCKET * SLOT
            for j in range(BUCKET):
                off = base + j * SLOT
                if mm[off + 8:off + 24] == h:
                    item = self._slot(off, h)
                    if item is not None:
                        out[i] = item
                    break
        return out

    def close(self) -> None:
        self.mm.close()
