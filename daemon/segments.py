"""Segments and put plans: the data the placement layer hands out.

A put is planned (``PutPlan``: per object an ``ObjPlan``, per chunk a
``ChunkPlan`` reserved at the end of its stripe's open segment), written,
then committed or aborted. Invariants:
- a chunk's reservation (``SegState.reserved``: start -> end) lives from its
  planning to its commit or abort; a segment with one is never unlinked;
- ``SegState.end`` is the reserved end: every reservation lies below it;
- ``SegState.live`` counts only published records (a T0 put's records
  count once their write-back is committed).

``ObjPlan`` and ``ChunkPlan`` are the data plane's (kvfs.native): C types
(native/plans.c) whose fields the batch loops in C read from the struct, or
their twins in kvfs._native_py; every plan of a daemon is of one kind.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from kvfs import native


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
    named: bool = False  # its name in the stripe directory is durable (kvfsd.durable)

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


if TYPE_CHECKING:
    from kvfs._native_py import ChunkPlan, ObjPlan
else:  # chosen once, as the mirror's MemEntry: the C types, or their twins in kvfs._native_py
    ChunkPlan = native.backend.ChunkPlan
    ObjPlan = native.backend.ObjPlan


@dataclass
class PutPlan:
    ns: str
    items: list[ObjPlan | None]  # None: already there (or repeated in the batch)
    sizes: list[int]
    touched: set[int] = field(default_factory=set)  # segments written to
