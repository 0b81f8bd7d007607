"""Rebuild the LMDB index from the segment files alone (daemon stopped).

Records are self-describing (kvfs.format), so the index can always be
rebuilt: every segment file of every stripe is scanned (``scan_records``,
which steps over holes and garbage), every record's payload is verified
against its checksum, and records are grouped by (namespace, key, sequence
number). An object comes back if one of its puts left every chunk intact
and consistent (chunk count, object size, offsets); of several such puts of
one key, the newest (highest sequence number) wins.

What the segments do not hold is lost: an object's ``meta`` (kept only in
the index) and its access times (set to the rebuild's time). Objects
deleted or evicted whose segments were not yet reclaimed come back: the
segments hold no tombstones. For a cache of content-addressed blocks both
are harmless: a key always names the same bytes.

The new index is written beside the old one (``index.rebuild``), then
swapped in; the old one is kept as ``index.old-<time>`` until the operator
removes it.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import xxhash

from kvfs import format as fmt
from kvfs.errors import KvfsError

from .index import SEG_SEALED, Extent, Index, ObjEntry
from .rootlock import RootLock

COMMIT_EVERY = 20000  # objects per write transaction


@dataclass
class _Chunk:
    stripe: int
    seg: int
    rec: fmt.ScannedRecord


@dataclass
class RebuildReport:
    segments: int = 0
    bytes_scanned: int = 0
    records: int = 0
    records_bad: int = 0  # payload checksum mismatch
    objects: int = 0
    objects_incomplete: int = 0  # keys none of whose puts left every chunk intact
    namespaces: int = 0
    seconds: float = 0.0
    old_index: str | None = None
    details: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _store_layout(root: Path) -> list[Path]:
    settings = root / "kvfs.json"
    if not settings.exists():
        raise KvfsError(f"{root} is not a kvfs store (no kvfs.json)")
    return [Path(s) for s in json.loads(settings.read_text())["stripes"]]


def _complete(chunks: dict[int, _Chunk]) -> bool:
    """Every chunk of one put is there, intact, and they agree on the
    object's shape."""
    first = next(iter(chunks.values())).rec.header
    if set(chunks) != set(range(first.chunk_cnt)):
        return False
    off = 0
    for i in range(first.chunk_cnt):
        h = chunks[i].rec.header
        if not chunks[i].rec.payload_ok or h.chunk_cnt != first.chunk_cnt or h.obj_size != first.obj_size \
                or h.chunk_off != off:
            return False
        off += h.length
    return off == first.obj_size


def _whole_sum(fds: dict[int, int], chunks: dict[int, _Chunk]) -> bytes:
    if len(chunks) == 1:
        return chunks[0].rec.header.checksum
    h = xxhash.xxh3_128()
    for i in range(len(chunks)):
        r = chunks[i].rec
        pos = 0
        while pos < r.header.length:
            data = os.pread(fds[chunks[i].seg], min(r.header.length - pos, 8 << 20), r.payload_offset + pos)
            if not data:
                raise OSError(f"segment {chunks[i].seg} shrank during the rebuild")
            h.update(data)
            pos += len(data)
    return h.digest()


def rebuild_index(root: Path, progress: Callable[[int, int], None] | None = None,
                  map_size: int = 1 << 40) -> RebuildReport:
    """Scan, rebuild, swap. ``progress(bytes_done, bytes_total)`` is called
    as segments are scanned. Refuses while a daemon holds the store."""
    root = Path(root).expanduser().absolute()
    stripes = _store_layout(root)
    lock = RootLock(root, "kvfs rebuild-index")
    t0 = time.monotonic()
    rep = RebuildReport()
    fds: dict[int, int] = {}
    try:
        files: list[tuple[int, int, Path, int]] = []  # stripe, segment id, path, size
        for si, sdir in enumerate(stripes):
            for name in sorted(os.listdir(sdir)):
                sid = fmt.parse_segment_name(name)
                if sid is not None:
                    files.append((si, sid, sdir / name, (sdir / name).stat().st_size))
        total = sum(f[3] for f in files)
        # (ns, key) -> seq -> chunk index -> where
        found: dict[tuple[str, str], dict[int, dict[int, _Chunk]]] = {}
        max_seq = -1
        for si, sid, path, size in files:
            fd = fds[sid] = os.open(path, os.O_RDONLY)
            for rec in fmt.scan_records(fd, size):
                rep.records += 1
                if not rec.payload_ok:
                    rep.records_bad += 1
                    rep.details.append(f"segment {sid} offset {rec.header_offset}: {rec.header.ns}/{rec.header.key} "
                                       f"chunk {rec.header.chunk_idx}: payload checksum mismatch")
                h = rec.header
                found.setdefault((h.ns, h.key), {}).setdefault(h.seq, {})[h.chunk_idx] = _Chunk(si, sid, rec)
                max_seq = max(max_seq, h.seq)
            rep.segments += 1
            rep.bytes_scanned += size
            if progress is not None:
                progress(rep.bytes_scanned, total)

        new_dir = root / "index.rebuild"
        shutil.rmtree(new_dir, ignore_errors=True)
        new_dir.mkdir()
        idx = Index(root, map_size, name="index.rebuild")
        try:
            now = time.time()
            namespaces: set[str] = set()
            txn = idx.env.begin(write=True)
            pending = 0
            for (ns, key), puts in found.items():
                winner = next((puts[s] for s in sorted(puts, reverse=True) if _complete(puts[s])), None)
                if winner is None:
                    rep.objects_incomplete += 1
                    continue
                chunks = [winner[i] for i in range(len(winner))]
                h0 = chunks[0].rec.header
                e = ObjEntry(h0.obj_size, _whole_sum(fds, winner), h0.seq, now, now, None,
                             [Extent(c.stripe, c.seg, c.rec.payload_offset, c.rec.header.length,
                                     c.rec.header.checksum) for c in chunks],
                             [c.rec.header_offset for c in chunks], [c.rec.end - c.rec.header_offset for c in chunks])
                idx.put_object(txn, ns, key, e)
                namespaces.add(ns)
                rep.objects += 1
                pending += 1
                if pending >= COMMIT_EVERY:
                    txn.commit()
                    txn = idx.env.begin(write=True)
                    pending = 0
            for ns in namespaces:
                idx.add_namespace(txn, ns, now)
            for si, sid, _path, _size in files:
                idx.put_segment(txn, sid, si, SEG_SEALED)
            idx.set_counter(txn, b"next_seg", max([sid + 1 for _si, sid, _p, _s in files], default=0))
            idx.set_counter(txn, b"next_seq", max_seq + 1)
            txn.commit()
            rep.namespaces = len(namespaces)
        finally:
            idx.close()
        old = root / "index"
        if old.exists():
            backup = root / f"index.old-{time.strftime('%Y%m%d-%H%M%S')}"
            os.rename(old, backup)
            rep.old_index = str(backup)
        os.rename(new_dir, old)
    finally:
        for fd in fds.values():
            os.close(fd)
        lock.release()
    rep.seconds = time.monotonic() - t0
    return rep
