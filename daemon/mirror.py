"""The in-memory mirror of the index: one ``MemEntry`` per resident object.

Lookups, contains and prefix_match read only this mirror, so they never
touch LMDB (or disk) and run on the event loop; LMDB is the durable copy.

Invariants:
- the mirror is changed only after the LMDB commit that changes the index
  (a T0 put's dirty entry is the exception: it is published in the mirror
  first, and in LMDB by its write-back; kvfsd.tiering);
- ``wire`` is replaced, never mutated, so a reply being encoded on the
  event loop never sees a half-made change;
- an entry refers only to numbers, bytes, None and tuples of those, so it
  is never part of a reference cycle: the C type (native/mirror.c) is not
  tracked by the cyclic collector at all, and a store of millions of
  objects adds nothing to a full collection (the Python twin's entries
  are tracked, their tuples not).

``MemEntry``, ``t0_publish`` (publish_t0's loop) and ``t0_written_back``
(the write-back's) come from the data plane in use (kvfs.native): the C
type and functions, or their twins in kvfs._native_py.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from kvfs import native

from .index import ObjEntry

if TYPE_CHECKING:
    from kvfs._native_py import MemEntry, t0_publish, t0_written_back
else:  # chosen once: every entry of a daemon is of one type
    MemEntry = native.backend.MemEntry
    t0_publish = native.backend.t0_publish
    t0_written_back = native.backend.t0_written_back


def entry_of(e: ObjEntry) -> MemEntry:
    """The mirror entry of an index entry (recovery)."""
    m = MemEntry(e.size, e.checksum, e.seq, tuple(x.wire() for x in e.extents),
                 tuple((x.seg, sp) for x, sp in zip(e.extents, e.spans)))
    m.created = e.created
    return m


__all__ = ["MemEntry", "entry_of", "t0_publish", "t0_written_back"]
