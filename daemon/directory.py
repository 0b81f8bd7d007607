"""The daemon's side of the location directory (layout and rules in
kvfs.directory). Called only with the engine's lock held: one writer.

Invariants kept here:
- a key is in at most one slot, always among its PROBE buckets, and the
  hop bit of its home for that bucket is set before the key is written
  there and cleared only once no key of that home is left in it;
- ``spilled`` holds exactly the keys that are resident but in no slot, and
  the header's spilled count is its size: while it is not 0, readers must
  ask the daemon about keys they do not find;
- a slot freed by a removal is offered to a spilled key that may live
  there before the removal returns, so the table fills back up.
"""
from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Any

import xxhash

from kvfs.directory import (BUCKET, CHUNK, HEAD, HEAD_STRUCT, HEADER, IN_T1, LAYOUT, MAGIC, MAX_CHUNKS, PROBE, SLOT,
                            SPILLED_AT, U64, VERSION, check_slots, file_size, home_of, hops_at, slot_offsets)

from .arena import arena_path

_EMPTY = bytes(16)
ENTRIES_AT = SPILLED_AT + 8


def _hash(ok: bytes) -> bytes:
    """kvfs.directory.key_hash(ns, key): the xxh3-128 of the object key
    ``ns\\0key`` (``ok`` is exactly those bytes, so no split and re-encode)."""
    return xxhash.xxh3_128_digest(ok)


class DirectoryWriter:
    def __init__(self, root: Path, nslots: int, mode: int = 0o600):
        check_slots(nslots)
        self.path = arena_path(root).with_suffix(".dir")
        self.nslots = nslots
        try:
            os.unlink(self.path)  # never trust a directory from an earlier run
        except FileNotFoundError:
            pass
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)
        try:
            os.fchmod(fd, mode)
            os.ftruncate(fd, file_size(nslots))
            self.mm = mmap.mmap(fd, file_size(nslots), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        HEAD_STRUCT.pack_into(self.mm, 0, MAGIC, LAYOUT, PROBE, 0, nslots, 0, 0)
        self._hops = hops_at(nslots)
        self._nb = nslots // BUCKET
        self.entries = 0
        self.spilled: dict[bytes, Any] = {}  # key hash -> mirror entry of a resident key in no slot
        self._spilled_home: dict[int, set[bytes]] = {}  # home bucket -> spilled key hashes
        self.spills = 0  # times a key found its buckets full

    def _find(self, h: bytes) -> tuple[int, int]:
        """(the slot holding ``h`` or -1, the first free slot of its buckets or -1)."""
        mm = self.mm
        for off in slot_offsets(h, self.nslots, mm[self._hops + self._home(h)]):
            if mm[off + 8:off + 24] == h:
                return off, -1
        for off in slot_offsets(h, self.nslots):
            if mm[off + 8:off + 24] == _EMPTY:
                return -1, off
        return -1, -1

    def _write(self, off: int, body: bytes | memoryview) -> None:
        mm = self.mm
        v = VERSION.unpack_from(mm, off)[0]
        VERSION.pack_into(mm, off, v + 1)  # odd: readers retry or miss
        mm[off + 8:off + 8 + len(body)] = body
        VERSION.pack_into(mm, off, v + 2)

    def _counts(self) -> None:
        U64.pack_into(self.mm, ENTRIES_AT, self.entries)
        U64.pack_into(self.mm, SPILLED_AT, len(self.spilled))

    @staticmethod
    def _body(h: bytes, m: Any) -> bytes:
        body = bytearray(SLOT)
        exts = m.exts if 0 < len(m.exts) <= MAX_CHUNKS else []  # more: present, location asked of the daemon
        HEAD.pack_into(body, 0, 0, h, m.size, m.seq, m.checksum, m.t0 if m.t0 >= 0 else -1,
                       0 if m.dirty else IN_T1, len(exts))
        for i, (stripe, seg, coff, length, ccs) in enumerate(exts):
            CHUNK.pack_into(body, HEAD.size + i * CHUNK.size, stripe, length, seg, coff, ccs)
        return bytes(memoryview(body)[8:])

    def put(self, ok: bytes, m: Any) -> None:
        """Publish (or update) where the resident object ``ok`` lives."""
        h = _hash(ok)
        if h in self.spilled:
            self.spilled[h] = m
            return
        off, free = self._find(h)
        if off < 0:
            if free < 0:
                self.spilled[h] = m
                self._spilled_home.setdefault(self._home(h), set()).add(h)
                self.spills += 1
                self._counts()
                return
            off = free
            self.entries += 1
            self._hop(h, off, True)  # before the key is there
        self._write(off, self._body(h, m))
        self._counts()

    def remove(self, ok: bytes) -> None:
        """Take ``ok`` out (before its removal is acknowledged, and before
        the generation bump of its removal)."""
        h = _hash(ok)
        if self.spilled.pop(h, None) is not None:
            self._unspill(h)
            self._counts()
            return
        off, _free = self._find(h)
        if off < 0:
            return
        self._write(off, bytes(SLOT - 8))
        self.entries -= 1
        self._hop(h, off, False)  # after it left
        self._readmit(off)
        self._counts()

    def _home(self, h: bytes) -> int:
        return home_of(h, self.nslots)

    def _hop(self, h: bytes, off: int, placed: bool) -> None:
        """Keep the hop bit of ``h``'s home for the bucket of slot ``off``:
        set it (a key of that home goes there), or clear it if no key of
        that home is left in that bucket."""
        home = self._home(h)
        bucket = (off - HEADER) // SLOT // BUCKET
        bit = 1 << ((bucket - home) % self._nb)
        at = self._hops + home
        if placed:
            self.mm[at] |= bit
            return
        first = HEADER + bucket * BUCKET * SLOT
        for o in range(first, first + BUCKET * SLOT, SLOT):
            kh = self.mm[o + 8:o + 24]
            if kh != _EMPTY and self._home(kh) == home:
                return  # another key of that home is still there
        self.mm[at] &= ~bit & 0xFF

    def _unspill(self, h: bytes) -> None:
        home = self._home(h)
        hs = self._spilled_home.get(home)
        if hs is not None:
            hs.discard(h)
            if not hs:
                del self._spilled_home[home]

    def _readmit(self, off: int) -> None:
        """A slot freed: give it to a spilled key that may live there (one
        whose home bucket is this one or one of the PROBE-1 before it)."""
        if not self.spilled:
            return
        nb = self.nslots // BUCKET
        bucket = (off - HEADER) // SLOT // BUCKET
        for back in range(PROBE):
            for h in self._spilled_home.get((bucket - back) % nb, ()):
                m = self.spilled.pop(h)
                self._unspill(h)
                self._hop(h, off, True)
                self._write(off, self._body(h, m))
                self.entries += 1
                return

    def stats(self) -> dict[str, Any]:
        return {"path": str(self.path), "slots": self.nslots, "entries": self.entries,
                "spilled": len(self.spilled), "spills": self.spills, "complete": not self.spilled,
                "probe_buckets": PROBE, "bucket": BUCKET, "max_chunks": MAX_CHUNKS}

    def close(self) -> None:
        self.mm.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
