"""The daemon's side of the location directory (layout and rules in
kvfs.directory). Called only with the engine's lock held: one writer.

Invariants kept here:
- a key is in at most one slot, always among its PROBE buckets, and the
  hop bit of its home for that bucket is set before the key is written
  there and cleared only once no key of that home is left in it;
- every key in a slot is resident (in the engine's mirror); a new resident
  always enters (``enter``: displacing the coldest key of full buckets),
  an update of one outside the table takes a free slot or stays outside;
  a refill (``fill``) enters keys outside into free slots and touches no
  key that has one;
- the header's ``outside`` is at least the number of resident keys in no
  slot: the C writer counts a displaced key before it leaves its slot, and
  each batch writes ``resident() - entries`` (exact once the batch's keys
  are in the mirror; a removal is called after its key left the mirror).
"""
from __future__ import annotations

import mmap
import os
import threading
from pathlib import Path
from typing import Any, Callable

import xxhash

from kvfs import native
from kvfs.directory import (BUCKET, CLOCK_AT, DISPLACE, ENTRIES_AT, FILL, HEAD_STRUCT, LAYOUT, MAGIC, MAX_CHUNKS,
                            OUTSIDE_AT, PROBE, U64, UPDATE, check_slots, file_size)

from .arena import SHM_DIR, arena_path


class DirectoryWriter:
    def __init__(self, root: Path, nslots: int, resident: Callable[[], int], mode: int = 0o600,
                 shm_dir: Path = SHM_DIR):
        """``resident()``: how many objects the engine's mirror holds."""
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
        HEAD_STRUCT.pack_into(self.mm, 0, MAGIC, LAYOUT, PROBE, 0, nslots, 0, 0, 0, 0)
        self.entries = 0
        self.resident = resident
        self.displaced = 0  # times a new key took another's slot
        self.freed = 0  # slots freed by removals (a refill is worth trying only after some)
        self.clock = 0
        self._put_entry, self._put_entries = native.backend.dir_put_entry, native.backend.dir_put_entries
        self._del = native.backend.dir_del

    @property
    def outside(self) -> int:
        """Resident objects in no slot (at least: see the invariants)."""
        return max(0, self.resident() - self.entries)

    def _counts(self) -> None:
        U64.pack_into(self.mm, ENTRIES_AT, self.entries)
        U64.pack_into(self.mm, OUTSIDE_AT, self.outside)

    def _tick(self) -> None:
        """The clock every slot write stamps, one tick per write call (the
        slot written longest ago goes first)."""
        self.clock += 1
        U64.pack_into(self.mm, CLOCK_AT, self.clock)

    def enter(self, ok: bytes, m: Any) -> None:
        """Publish where the new resident ``ok`` lives (already in the mirror),
        or that it was just read (a daemon lookup of a key outside)."""
        self._tick()
        self._result(self._put_entry(self.mm, self.nslots, ok, m, DISPLACE))

    def put(self, ok: bytes, m: Any) -> None:
        """Update where the resident ``ok`` lives (in a free slot if it was outside)."""
        self._tick()
        self._result(self._put_entry(self.mm, self.nslots, ok, m))

    def _result(self, r: int) -> None:
        if r == 1:
            self.entries += 1
        elif r == 2:
            self.displaced += 1
        if r > 0:
            self._counts()

    def enter_many(self, oks: list[bytes], ms: list[Any]) -> None:
        """``enter`` of each, one call into C."""
        self._tick()
        taken, displaced, _left = self._put_entries(self.mm, self.nslots, oks, ms, DISPLACE, None, _yield_gil())
        self.entries += taken
        self.displaced += displaced
        self._counts()

    def put_many(self, oks: list[bytes], ms: list[Any], current: dict[bytes, Any] | None = None) -> None:
        """``put`` of each, one call into C; with ``current`` (the mirror),
        only of those still ``current[key]``."""
        self._write_many(oks, ms, UPDATE, current)

    def fill(self, oks: list[bytes], ms: list[Any], current: dict[bytes, Any]) -> int:
        """Enter those of ``oks`` that are in no slot into free ones (keys
        outside since the table overflowed, after removals freed slots);
        a key with a slot is left as it is, one whose buckets are full stays
        outside. Only entries still ``current[key]``. Returns how many entered."""
        return self._write_many(oks, ms, FILL, current)

    def _write_many(self, oks: list[bytes], ms: list[Any], mode: int, current: dict[bytes, Any] | None) -> int:
        """One batch of slot writes that never displaces: the slots it took."""
        self._tick()
        taken, _displaced, _left = self._put_entries(self.mm, self.nslots, oks, ms, mode, current, _yield_gil())
        if taken:
            self.entries += taken
            self._counts()
        return int(taken)

    def remove(self, ok: bytes) -> None:
        """Take ``ok`` out, after it left the mirror (before its removal is
        acknowledged, and before the generation bump of its removal)."""
        if self._del(self.mm, self.nslots, xxhash.xxh3_128_digest(ok)) >= 0:
            self.entries -= 1
            self.freed += 1
        self._counts()

    def stats(self) -> dict[str, Any]:
        outside = self.outside
        return {"path": str(self.path), "slots": self.nslots, "entries": self.entries, "outside": outside,
                "displaced": self.displaced, "complete": not outside, "probe_buckets": PROBE, "bucket": BUCKET,
                "max_chunks": MAX_CHUNKS}

    def close(self) -> None:
        self.mm.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


_MAIN = threading.main_thread().ident


def _yield_gil() -> bool:
    """Whether a batch of slot writes may give the GIL up while it places
    them: not on the daemon's event loop (the main thread). The loop
    answers every request on one thread, so it bounds how many objects the
    daemon commits a second; when it gave the GIL up, a write-back thread
    took it, and the loop then waited to get it back (the largest source
    of futex wake-ups on the loop in the 4 KiB steady state). A write-back
    thread's batches still give it up, so the loop runs meanwhile."""
    return threading.get_ident() != _MAIN
