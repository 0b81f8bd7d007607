"""Segments and put plans: the data the placement layer hands out.

A put is planned (``PutPlan``: per object an ``ObjPlan``, per chunk a
``ChunkPlan`` reserved at the end of its stripe's open segment), written,
then committed or aborted. Invariants:
- a chunk's reservation (``SegState.reserved``: start -> end) lives from its
  planning to its commit or abort; a segment with one is never unlinked;
- ``SegState.end`` is the reserved end: every reservation lies below it;
- ``SegState.live`` counts only published records (a T0 put's records
  count once their write-back is committed).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .mirror import MemEntry


@dataclass
class SegState:
    seg: int
    stripe: int
    path: Path
    state: int
    end: int  # reserved end: every reservation lies below it
    live: int = 0  # bytes of published records (header to aligned end)
    records: int = 0  # published records (chunks) in it
    # reservations not yet committed or aborted: start -> end (a record being
    # written lies inside one; kvfs verify does not call it an orphan)
    reserved: dict[int, int] = field(default_factory=dict)
    fd: int = -1
    persisted: bool = False  # has a row in the segments table

    def add_live(self, span: int) -> None:
        self.live += span
        self.records += 1

    def drop_live(self, span: int) -> None:
        self.live -= span
        self.records -= 1

    @property
    def inflight(self) -> int:
        return len(self.reserved)

    def ensure_fd(self) -> int:
        if self.fd < 0:
            # the owner's alone until its kind's ACL is applied (Engine._segment_for)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass(slots=True)  # one or more per object put: slots make them cheaper to make and read
class ChunkPlan:
    stripe: int
    seg: int
    hdr_off: int
    payload_off: int
    end: int
    length: int
    chunk_off: int
    idx: int
    checksum: bytes = b""
    start: int = -1  # where the reservation begins (the segment's end before it)


@dataclass(slots=True)
class ObjPlan:
    key: str
    size: int
    meta: bytes | None
    seq: int
    chunks: list[ChunkPlan]
    ok: bytes = b""  # the object key (kvfsd.index.obj_key), encoded once per put
    hasher: Any = None  # running xxh3-128 of the whole value (multi-chunk)
    checksum: bytes = b""
    t0: int = -1  # arena extent the client fills (T0 put), -1: the client writes T1 itself
    via_t0: bool = False  # a T0 put item (stays True after t0 is handed to ``mem``)
    mem: "MemEntry | None" = None  # the dirty mirror entry publish_t0 made
    t0_stored: bool = False  # publish_t0's answer for this item

    def exts(self) -> tuple[tuple[Any, ...], ...]:
        """Its chunks as the mirror keeps them: (stripe, seg, payload_off, length, sum)."""
        cs = self.chunks
        if len(cs) == 1:  # most puts: no generator (twice per T0 put)
            c = cs[0]
            return ((c.stripe, c.seg, c.payload_off, c.length, c.checksum),)
        return tuple((c.stripe, c.seg, c.payload_off, c.length, c.checksum) for c in cs)

    def spans(self) -> tuple[tuple[int, int], ...]:
        """(segment, record bytes from header to aligned end) per chunk."""
        cs = self.chunks
        if len(cs) == 1:
            c = cs[0]
            return ((c.seg, c.end - c.hdr_off),)
        return tuple((c.seg, c.end - c.hdr_off) for c in cs)


@dataclass
class PutPlan:
    ns: str
    items: list[ObjPlan | None]  # None: already there (or repeated in the batch)
    sizes: list[int]
    touched: set[int] = field(default_factory=set)  # segments written to
