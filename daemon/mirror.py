"""The in-memory mirror of the index: one ``MemEntry`` per resident object.

Invariants:
- the mirror is changed only after the LMDB commit that changes the index
  (a T0 put's dirty entry is the exception: it is published in the mirror
  first, and in LMDB by its write-back; kvfsd.tiering);
- ``wire`` is replaced, never mutated, so a reply being encoded on the
  event loop never sees a half-made change;
- an entry's containers are tuples of numbers and bytes: the cyclic GC
  stops tracking those, so a store of millions of objects adds one tracked
  object each (the entry) to every full collection, not five.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .index import ObjEntry


@dataclass
class MemEntry:
    """The in-memory mirror of one index entry: what lookups answer with.
    Lookups, contains and prefix_match read only this mirror, so they never
    touch LMDB (or disk) and run on the event loop; LMDB is the durable copy,
    and the mirror is changed only after the commit that changes LMDB."""

    __slots__ = ("size", "checksum", "seq", "exts", "spans", "wire", "t0", "dirty", "deleted", "hits", "meta",
                 "created")

    def __init__(self, size: int, checksum: bytes, seq: int, exts: tuple[tuple[Any, ...], ...],
                 spans: tuple[tuple[int, int], ...], *, t0: int = -1, dirty: bool = False):
        self.size = size
        self.checksum = checksum
        self.seq = seq
        self.exts = exts  # ((stripe, seg, payload_off, length, chunk_sum), ...)
        self.spans = spans  # ((seg, record bytes), ...); () while dirty: not yet counted live
        self.t0 = t0  # arena offset of the T0 copy, -1: none
        self.dirty = dirty  # in T0 only: write-back to T1 not committed yet
        self.deleted = False  # removed while dirty: the write-back must not publish it
        self.hits = 0  # T1 hits (promotion policy)
        self.meta: bytes | None = None  # kept only while dirty (LMDB has it after)
        self.created = 0.0  # for the mount's mtime
        self.wire: tuple[Any, ...] = ()
        self.rewire()

    def rewire(self) -> None:
        """What lookups answer: [size, checksum, seq, extents, t0] where t0 is
        None or [arena offset, also in T1]. Replaced, never mutated, so a
        reply being encoded on the loop never sees a half-made change."""
        self.wire = (self.size, self.checksum, self.seq, self.exts,
                     None if self.t0 < 0 else (self.t0, not self.dirty))

    @classmethod
    def of(cls, e: ObjEntry) -> "MemEntry":
        m = cls(e.size, e.checksum, e.seq, tuple(x.wire() for x in e.extents),
                tuple((x.seg, sp) for x, sp in zip(e.extents, e.spans)))
        m.created = e.created
        return m
