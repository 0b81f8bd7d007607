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

from kvfs import native
from kvfs.directory import (BUCKET, HEAD_STRUCT, HEADER, IN_T1, LAYOUT, MAGIC, MAX_CHUNKS, PROBE, SLOT, SPILLED_AT,
                            U64, check_slots, file_size, home_of)

from .arena import SHM_DIR, arena_path

ENTRIES_AT = SPILLED_AT + 8


def _hash(ok: bytes) -> bytes:
    """kvfs.directory.key_hash(ns, key): the xxh3-128 of the object key
    ``ns\\0key`` (``ok`` is exactly those bytes, so no split and re-encode)."""
    return xxhash.xxh3_128_digest(ok)


class DirectoryWriter:
    def __init__(self, root: Path, nslots: int, mode: int = 0o600, shm_dir: Path = SHM_DIR):
        check_slots(nslots)
        self.path = arena_path(root, shm_dir).with_suffix(".dir")
        self.nslots = nslots
        try:
            os.unlink(self.path)  # never trust a directory from an earlier run
        except FileNotFoundError:
            pass
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)
        try:
            os.fchmod(fd, mode)
            os.ftruncate(fd, file_size(nslots))
            # Its pages are allocated and mapped now, not at the first put
            # that lands on each (a page fault per put while the table
            # fills, most of a put's directory cost). A tmpfs too full for
            # that leaves the table sparse, as it was.
            flags = mmap.MAP_SHARED
            try:
                os.posix_fallocate(fd, 0, file_size(nslots))
                flags |= getattr(mmap, "MAP_POPULATE", 0)
            except OSError:
                pass
            self.mm = mmap.mmap(fd, file_size(nslots), flags, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        HEAD_STRUCT.pack_into(self.mm, 0, MAGIC, LAYOUT, PROBE, 0, nslots, 0, 0)
        self.entries = 0
        self.spilled: dict[bytes, Any] = {}  # key hash -> mirror entry of a resident key in no slot
        self._spilled_home: dict[int, set[bytes]] = {}  # home bucket -> spilled key hashes
        self.spills = 0  # times a key found its buckets full
        self._put, self._del = native.backend.dir_put, native.backend.dir_del
        self._put_entry, self._put_entries = native.backend.dir_put_entry, native.backend.dir_put_entries

    def _counts(self) -> None:
        U64.pack_into(self.mm, ENTRIES_AT, self.entries)
        U64.pack_into(self.mm, SPILLED_AT, len(self.spilled))

    def _place(self, h: bytes, m: Any) -> int:
        """kvfs.directory.put_py (in C when built): 1 new, 0 updated, -1 full."""
        return self._put(self.mm, self.nslots, h, m.size, m.seq, m.checksum, m.t0, 0 if m.dirty else IN_T1,
                         m.exts)

    # A spilled key's buckets are all full (it spilled because they were, and
    # ``_readmit`` hands every slot freed there to a spilled key), so the C
    # put of a spilled key always answers "full": only those answers need
    # the key's hash and the spilled table.

    def put(self, ok: bytes, m: Any) -> None:
        """Publish (or update) where the resident object ``ok`` lives."""
        r = self._put_entry(self.mm, self.nslots, ok, m)  # hashes ok itself: twice per T0 put
        if r < 0:
            self._spill(ok, m)
            self._counts()
        elif r:
            self.entries += 1
            U64.pack_into(self.mm, ENTRIES_AT, self.entries)

    def put_many(self, oks: list[bytes], ms: list[Any]) -> None:
        """``put`` of each, one call into C."""
        taken, full = self._put_entries(self.mm, self.nslots, oks, ms)
        if taken:
            self.entries += taken
            U64.pack_into(self.mm, ENTRIES_AT, self.entries)
        for i in full:
            self._spill(oks[i], ms[i])
        if full:
            self._counts()

    def _spill(self, ok: bytes, m: Any) -> None:
        """``ok`` found its buckets full: keep (or update) it in the spilled
        table. The caller writes the header's counts (``_counts``)."""
        h = _hash(ok)
        spilled = self.spilled
        if h not in spilled:  # (a busy node's every new key while the table is full: no spare set)
            home = self._home(h)
            hs = self._spilled_home.get(home)
            if hs is None:
                self._spilled_home[home] = {h}
            else:
                hs.add(h)
            self.spills += 1
        spilled[h] = m

    def remove(self, ok: bytes) -> None:
        """Take ``ok`` out (before its removal is acknowledged, and before
        the generation bump of its removal)."""
        h = _hash(ok)
        if self.spilled.pop(h, None) is not None:
            self._unspill(h)
            self._counts()
            return
        off = self._del(self.mm, self.nslots, h)
        if off < 0:
            return
        self.entries -= 1
        self._readmit(off)
        self._counts()

    def _home(self, h: bytes) -> int:
        return home_of(h, self.nslots)

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
                placed = self._place(h, m)  # the freed slot is in its buckets
                assert placed == 1
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
