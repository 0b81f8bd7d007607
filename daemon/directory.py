"""The daemon's side of the location directory (layout and rules in
kvfs.directory). Called only with the engine's lock held: one writer."""
from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Any

import xxhash

from kvfs.directory import BUCKET, CHUNK, HEAD, IN_T1, MAX_CHUNKS, SLOT, VERSION, bucket_of

from .arena import arena_path

_EMPTY = bytes(16)


def _hash(ok: bytes) -> bytes:
    """kvfs.directory.key_hash(ns, key): the xxh3-128 of the object key
    ``ns\0key`` (``ok`` is exactly those bytes, so no split and re-encode)."""
    return xxhash.xxh3_128_digest(ok)


class DirectoryWriter:
    def __init__(self, root: Path, nslots: int, mode: int = 0o600):
        if nslots < BUCKET or nslots & (nslots - 1):
            raise ValueError("directory slots must be a power of two >= 4")
        self.path = arena_path(root).with_suffix(".dir")
        self.nslots = nslots
        try:
            os.unlink(self.path)  # never trust a directory from an earlier run
        except FileNotFoundError:
            pass
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)
        try:
            os.fchmod(fd, mode)
            os.ftruncate(fd, nslots * SLOT)
            self.mm = mmap.mmap(fd, nslots * SLOT, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.entries = 0
        self.collisions = 0  # puts that took another key's slot

    def _find(self, h: bytes) -> tuple[int, bool]:
        """(slot offset, holds this key): the key's slot, else a free one,
        else a victim picked by the hash (the directory is lossy)."""
        base = bucket_of(h, self.nslots) * SLOT
        mm = self.mm
        free = -1
        for off in range(base, base + BUCKET * SLOT, SLOT):
            kh = mm[off + 8:off + 24]
            if kh == h:
                return off, True
            if free < 0 and kh == _EMPTY:
                free = off
        if free >= 0:
            return free, False
        return base + (h[8] % BUCKET) * SLOT, False

    def _write(self, off: int, body: bytes | memoryview) -> None:
        mm = self.mm
        v = VERSION.unpack_from(mm, off)[0]
        VERSION.pack_into(mm, off, v + 1)  # odd: readers retry or miss
        mm[off + 8:off + 8 + len(body)] = body
        VERSION.pack_into(mm, off, v + 2)

    def put(self, ok: bytes, m: Any) -> None:
        """Publish (or update) where the object ``ok`` lives; objects of more
        than MAX_CHUNKS chunks are left to lookups."""
        h = _hash(ok)
        if len(m.exts) > MAX_CHUNKS or not m.exts:
            self._remove_hash(h)
            return
        off, mine = self._find(h)
        if not mine:
            if self.mm[off + 8:off + 24] != _EMPTY:
                self.collisions += 1
            else:
                self.entries += 1
        body = bytearray(SLOT)
        HEAD.pack_into(body, 0, 0, h, m.size, m.seq, m.checksum, m.t0 if m.t0 >= 0 else -1,
                       0 if m.dirty else IN_T1, len(m.exts))
        for i, (stripe, seg, coff, length, ccs) in enumerate(m.exts):
            CHUNK.pack_into(body, HEAD.size + i * CHUNK.size, stripe, length, seg, coff, ccs)
        self._write(off, memoryview(body)[8:])

    def remove(self, ok: bytes) -> None:
        """Take ``ok`` out (before the generation bump of its removal)."""
        self._remove_hash(_hash(ok))

    def _remove_hash(self, h: bytes) -> None:
        off, mine = self._find(h)
        if mine:
            self._write(off, bytes(SLOT - 8))
            self.entries -= 1

    def stats(self) -> dict[str, Any]:
        return {"path": str(self.path), "slots": self.nslots, "entries": self.entries,
                "collisions": self.collisions, "max_chunks": MAX_CHUNKS}

    def close(self) -> None:
        self.mm.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
