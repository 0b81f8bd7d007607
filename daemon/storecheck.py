"""What the segments say, checked against what the index says: the pieces
shared by recovery, ``kvfs verify`` and ``kvfs rebuild-index``.

- ``check_record``: does the record an index entry points to still name
  exactly that object's chunk (and, deep, does its payload hash right)?
- ``scan_segments``: every record of every segment file (kvfs.format's
  scanner), grouped by (namespace, key) -> put (sequence number) -> chunk.
- ``newest_intact``: of those puts, the newest that left every chunk
  intact and consistent; ``entry_of`` makes its index entry.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import xxhash

from kvfs import format as fmt

from .index import Extent, ObjEntry


@dataclass
class Piece:
    stripe: int
    seg: int
    rec: fmt.ScannedRecord


Puts = dict[int, dict[int, Piece]]  # seq -> chunk index -> piece


@dataclass
class ScanCounts:
    segments: int = 0
    bytes_scanned: int = 0
    records: int = 0
    records_bad: int = 0  # payload checksum mismatch (deep scans only)


def check_record(fd: int, hdr_off: int, ns: str, key: str, e: ObjEntry, i: int, deep: bool = True) -> str | None:
    """Why chunk ``i`` of the index entry ``e`` of ``ns``/``key`` is not
    what the segment holds at ``hdr_off`` (None: it is)."""
    ext = e.extents[i]
    try:
        hdr, hlen = fmt.decode_header(os.pread(fd, ext.offset - hdr_off, hdr_off))
    except fmt.BadRecord as err:
        return f"chunk {i}: bad record header ({err})"
    except OSError as err:
        return f"chunk {i}: unreadable ({err})"
    if (hdr.ns, hdr.key, hdr.seq, hdr.chunk_idx, hdr.length) != (ns, key, e.seq, i, ext.length):
        return f"chunk {i}: the header names another record"
    if fmt.payload_offset(hdr_off, hlen, hdr.length) != ext.offset or hdr.checksum != ext.checksum:
        return f"chunk {i}: the header disagrees with the index"
    if deep:
        data = os.pread(fd, ext.length, ext.offset)
        if len(data) < ext.length:
            return f"chunk {i}: the segment ends inside the payload"
        if fmt.checksum(data) != ext.checksum:
            return f"chunk {i}: payload checksum mismatch"
    return None


def segment_files(stripes: list[Path]) -> list[tuple[int, int, Path]]:
    """(stripe, segment id, path) of every segment file."""
    out = []
    for si, sdir in enumerate(stripes):
        for name in sorted(os.listdir(sdir)):
            sid = fmt.parse_segment_name(name)
            if sid is not None:
                out.append((si, sid, Path(sdir) / name))
    return out


def scan_segments(files: list[tuple[int, int, int, int]], deep: bool,
                  progress: Callable[[int, int], None] | None = None,
                  bad: Callable[[Piece], None] | None = None) -> tuple[dict[tuple[str, str], Puts], ScanCounts]:
    """Scan (stripe, segment id, fd, size) files. ``deep``: verify every
    payload (a bad one is passed to ``bad``)."""
    found: dict[tuple[str, str], Puts] = {}
    counts = ScanCounts()
    total = sum(f[3] for f in files)
    for si, sid, fd, size in files:
        for rec in fmt.scan_records(fd, size, verify_payload=deep):
            counts.records += 1
            h = rec.header
            piece = Piece(si, sid, rec)
            if rec.payload_ok is False:
                counts.records_bad += 1
                if bad is not None:
                    bad(piece)
            found.setdefault((h.ns, h.key), {}).setdefault(h.seq, {})[h.chunk_idx] = piece
        counts.segments += 1
        counts.bytes_scanned += size
        if progress is not None:
            progress(counts.bytes_scanned, total)
    return found, counts


def _intact(chunks: dict[int, Piece]) -> bool:
    """Every chunk of one put is there, not known bad, and they agree on the
    object's shape."""
    first = next(iter(chunks.values())).rec.header
    if set(chunks) != set(range(first.chunk_cnt)):
        return False
    off = 0
    for i in range(first.chunk_cnt):
        h = chunks[i].rec.header
        if chunks[i].rec.payload_ok is False or h.chunk_cnt != first.chunk_cnt or h.obj_size != first.obj_size \
                or h.chunk_off != off:
            return False
        off += h.length
    return off == first.obj_size


def newest_intact(puts: Puts) -> dict[int, Piece] | None:
    return next((puts[s] for s in sorted(puts, reverse=True) if _intact(puts[s])), None)


def entry_of(chunks: dict[int, Piece], fds: dict[int, int], now: float | None = None) -> ObjEntry:
    """The index entry of an intact put (no meta: the segments do not hold
    it). The whole-value sum of a multi-chunk value is read back and hashed."""
    pieces = [chunks[i] for i in range(len(chunks))]
    h0 = pieces[0].rec.header
    if len(pieces) == 1:
        whole = h0.checksum
    else:
        hasher = xxhash.xxh3_128()
        for p in pieces:
            pos = 0
            while pos < p.rec.header.length:
                data = os.pread(fds[p.seg], min(p.rec.header.length - pos, 8 << 20), p.rec.payload_offset + pos)
                if not data:
                    raise OSError(f"segment {p.seg} ends inside a payload")
                hasher.update(data)
                pos += len(data)
        whole = hasher.digest()
    t = time.time() if now is None else now
    return ObjEntry(h0.obj_size, whole, h0.seq, t, t, None,
                    [Extent(p.stripe, p.seg, p.rec.payload_offset, p.rec.header.length, p.rec.header.checksum)
                     for p in pieces],
                    [p.rec.header_offset for p in pieces], [p.rec.end - p.rec.header_offset for p in pieces])
