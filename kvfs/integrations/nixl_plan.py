"""Where kvfs's bytes are, as NIXL transfer descriptors (no NIXL imported).

The sans-I/O half of ``kvfs.integrations.nixl``: it turns what the daemon
says (a hold's locations, a reservation's extents) into the two
descriptor lists a NIXL transfer takes, and back into per-item results.

- T1 chunks are ``FILE`` descriptors ``(payload offset, length, fd)``: NIXL's
  file backends (POSIX, GDS, GDS_MT) read or write the segment file at
  that offset. One descriptor per chunk, as the index stores it, so each
  carries its own checksum.
- T0 copies are ``DRAM`` descriptors ``(arena address + offset, length, 0)``:
  a memory backend (UCX) moves them. Also one per chunk (the value cut at
  the stripe unit, exactly as T1 holds it), so verification is the same.

Every descriptor has a ``Piece``: the item it belongs to, where it goes
within the item's destination, and the checksum that destination must have
afterwards. A destination descriptor list is made from the caller's
per-item addresses (``local``), in the same order.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence


@dataclass(frozen=True)
class Piece:
    item: int  # index in the batch
    pos: int  # offset within the item's value (and its destination)
    length: int
    checksum: bytes  # xxh3-128 of these bytes (b"" on the write side: computed from the source)


@dataclass
class Plan:
    """Descriptors of one batch: ``file`` (FILE: offset, length, fd) and
    ``dram`` (DRAM: address, length, 0), each with its pieces; ``sizes``
    per item (-1: a miss, nothing to move)."""
    sizes: list[int]
    file: list[tuple[int, int, int]] = field(default_factory=list)
    file_pieces: list[Piece] = field(default_factory=list)
    dram: list[tuple[int, int, int]] = field(default_factory=list)
    dram_pieces: list[Piece] = field(default_factory=list)
    segments: set[int] = field(default_factory=set)  # segment ids the FILE descriptors name

    def pieces(self) -> list[Piece]:
        return self.file_pieces + self.dram_pieces

    def items_of(self, pieces: Sequence[Piece]) -> set[int]:
        return {p.item for p in pieces}


SegmentFd = Callable[[int, int], int]  # (stripe, segment) -> an fd registered with the file backend


def plan_reads(items: Sequence[list[Any] | None], segment_fd: SegmentFd, arena: int | None) -> Plan:
    """Descriptors that read the located ``items`` (a hold's: ``[size,
    checksum, seq, extents, t0]``, extents ``[stripe, segment, offset,
    length, chunk sum]``, t0 None or ``[arena offset, also in T1]``).

    A T0 copy is read from the arena when ``arena`` (its registered address)
    is given; else an item also in T1 is read from there, and one in T0
    only is a miss (as for a client that cannot map the arena)."""
    plan = Plan(sizes=[-1] * len(items))
    for i, item in enumerate(items):
        if item is None:
            continue
        size, _csum, _seq, exts = item[:4]
        t0 = item[4] if len(item) > 4 else None
        if t0 is not None and arena is None and not t0[1]:
            continue
        pos = 0
        for stripe, seg, off, length, csum in exts:
            piece = Piece(i, pos, length, csum)
            if t0 is not None and arena is not None:
                plan.dram.append((arena + t0[0] + pos, length, 0))
                plan.dram_pieces.append(piece)
            else:
                plan.file.append((off, length, segment_fd(stripe, seg)))
                plan.file_pieces.append(piece)
                plan.segments.add(seg)
            pos += length
        plan.sizes[i] = size
    return plan


def plan_writes(items: Sequence[list[Any] | None], sizes: Sequence[int], segment_fd: SegmentFd,
                arena: int | None) -> Plan:
    """Descriptors that fill a reservation's ``items`` (``[seq, chunks, t0]``:
    chunks ``[stripe, segment, offset, length]``, t0 an arena offset or -1).
    An item that is None (already stored) has size -1: nothing to write."""
    plan = Plan(sizes=[-1] * len(items))
    for i, item in enumerate(items):
        if item is None:
            continue
        _seq, chunks, t0 = item
        if t0 >= 0:
            if arena is None:
                raise ValueError("the daemon gave an arena extent, and the arena is not registered here")
            plan.dram.append((arena + t0, sizes[i], 0))
            plan.dram_pieces.append(Piece(i, 0, sizes[i], b""))
        else:
            pos = 0
            for stripe, seg, off, length in chunks:
                plan.file.append((off, length, segment_fd(stripe, seg)))
                plan.file_pieces.append(Piece(i, pos, length, b""))
                plan.segments.add(seg)
                pos += length
        plan.sizes[i] = sizes[i]
    return plan


def local(pieces: Sequence[Piece], bases: Sequence[int], dev: int = 0) -> list[tuple[int, int, int]]:
    """The caller's side of a transfer: each piece at its item's base
    address plus its offset, on device ``dev`` (0 for DRAM)."""
    return [(bases[p.item] + p.pos, p.length, dev) for p in pieces]


def failed_items(pieces: Sequence[Piece], good: Sequence[bool]) -> set[int]:
    return {p.item for p, g in zip(pieces, good) if not g}


def merge_spans(spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """(address, length) spans, overlapping or touching ones merged: the
    regions to register for many destinations (usually slices of one
    buffer: one region)."""
    out: list[tuple[int, int]] = []
    for a, n in sorted((a, n) for a, n in spans if n > 0):
        if out and a <= out[-1][0] + out[-1][1]:
            s, m = out[-1]
            out[-1] = (s, max(s + m, a + n) - s)
        else:
            out.append((a, n))
    return out
