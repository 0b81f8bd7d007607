"""``kvfs verify``: reconcile the index and the segments, both ways.

1. Index -> data: every chunk of every indexed object must be where its
   entry says, under a header that names exactly that chunk (``--deep``:
   and its payload must hash to its checksum). An object with any chunk
   that fails is *broken*.
2. Data -> index: every segment is scanned. An *orphan* is a key that is
   not in the index although a put of it left every chunk intact in the
   segments, and none of whose records was ever published (the index's
   ``segdead`` remembers unpublished ones until their segment goes, so a
   deleted or evicted object is not an orphan): the index lost it, or the
   daemon crashed between writing it and publishing it.

``--repair`` drops broken objects and indexes orphans (without meta: the
segments do not hold it). Offline (``kvfs verify --root``) the index is
changed directly; online the daemon drops broken objects as any corrupt
object and stores orphans again through its put path.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .index import Index, ObjEntry, obj_key
from .rebuild import store_stripes
from .rootlock import RootLock
from .storecheck import ScanCounts, check_record, entry_of, newest_intact, scan_segments, segment_files

MAX_LISTED = 1000  # problems listed by name in a report (all are counted)


@dataclass
class VerifyReport:
    mode: str = "offline"
    deep: bool = False
    objects: int = 0
    chunks: int = 0
    broken: list[list[str]] = field(default_factory=list)  # [ns, key, reason]
    broken_count: int = 0
    orphans: list[list[Any]] = field(default_factory=list)  # [ns, key, size]
    orphan_count: int = 0
    segments: int = 0
    bytes_scanned: int = 0
    records: int = 0
    records_bad: int = 0
    repaired_dropped: int = 0
    repaired_indexed: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def add_broken(self, ns: str, key: str, reason: str) -> None:
        self.broken_count += 1
        if len(self.broken) < MAX_LISTED:
            self.broken.append([ns, key, reason])

    def add_counts(self, c: ScanCounts) -> None:
        self.segments, self.bytes_scanned = c.segments, c.bytes_scanned
        self.records, self.records_bad = c.records, c.records_bad


Progress = Callable[[str, int, int], None]  # (phase, done, total)


def check_index(index: Index, fd_of: Callable[[int], int], deep: bool, rep: VerifyReport,
                progress: Progress | None = None) -> list[tuple[str, str, int]]:
    """Pass 1. Returns the broken objects as (ns, key, seq)."""
    broken = []
    with index.env.begin() as txn:
        total = txn.stat(index.objects)["entries"]
        for n, (ns, key, e) in enumerate(index.iter_objects(txn)):
            rep.objects += 1
            reason = check_entry(fd_of, ns, key, e, deep)
            rep.chunks += len(e.extents)
            if reason is not None:
                rep.add_broken(ns, key, reason)
                broken.append((ns, key, e.seq))
            if progress is not None and (n % 1000 == 999 or n + 1 == total):
                progress("objects", n + 1, total)
    return broken


def check_entry(fd_of: Callable[[int], int], ns: str, key: str, e: ObjEntry, deep: bool) -> str | None:
    for i, (x, h) in enumerate(zip(e.extents, e.header_offsets)):
        fd = fd_of(x.seg)
        if fd < 0:
            return f"chunk {i}: segment {x.seg} is missing"
        reason = check_record(fd, h, ns, key, e, i, deep)
        if reason is not None:
            return reason
    return None


def find_orphans(index: Index, files: list[tuple[int, int, int, int]], fds: dict[int, int], deep: bool,
                 rep: VerifyReport, progress: Progress | None = None,
                 writing: Callable[[], Callable[[int, int], bool]] | None = None) -> list[tuple[str, str, ObjEntry]]:
    """Pass 2 over (stripe, segment id, fd, size) files. Returns the orphans
    with the index entry each would get. ``writing()`` (online) gives, just
    before the index is read, which (segment, header offset) belong to puts
    still being written: those are not orphans."""
    found, counts = scan_segments(files, deep, (lambda d, t: progress("segments", d, t)) if progress else None)
    rep.add_counts(counts)
    out = []
    busy = writing() if writing is not None else (lambda seg, off: False)
    with index.env.begin() as txn:
        for (ns, key), puts in found.items():
            if txn.get(obj_key(ns, key), db=index.objects) is not None:
                continue  # indexed: the index says which put is the object (checked in pass 1)
            winner = newest_intact(puts)
            if winner is None or any(index.was_published(txn, p.seg, p.rec.header_offset)
                                     or busy(p.seg, p.rec.header_offset) for p in winner.values()):
                continue  # broken leftovers, an object deleted/evicted since, or one being written
            e = entry_of(winner, fds)
            out.append((ns, key, e))
            rep.orphan_count += 1
            if len(rep.orphans) < MAX_LISTED:
                rep.orphans.append([ns, key, e.size])
    return out


def verify_offline(root: Path, deep: bool = False, repair: bool = False, progress: Progress | None = None,
                   map_size: int = 1 << 40) -> VerifyReport:
    """``kvfs verify --root``: the daemon stopped (the store's lock is taken)."""
    root = Path(root).expanduser().absolute()
    stripes = store_stripes(root, "kvfs verify")
    lock = RootLock(root, "kvfs verify")
    t0 = time.monotonic()
    rep = VerifyReport(mode="offline", deep=deep)
    fds: dict[int, int] = {}
    index = Index(root, map_size)
    try:
        files = segment_files(stripes)
        for _si, sid, path in files:
            fds[sid] = os.open(path, os.O_RDONLY)
        broken = check_index(index, lambda seg: fds.get(seg, -1), deep, rep, progress)
        orphans = find_orphans(index, [(si, sid, fds[sid], os.fstat(fds[sid]).st_size) for si, sid, _p in files],
                               fds, deep, rep, progress)
        if repair and (broken or orphans):
            with index.env.begin(write=True) as txn:
                for ns, key, _seq in broken:
                    if index.delete_object(txn, ns, key) is not None:
                        rep.repaired_dropped += 1
                for ns, key, e in orphans:
                    index.put_object(txn, ns, key, e)
                    index.add_namespace(txn, ns, e.created)
                    rep.repaired_indexed += 1
                nxt = max([index.get_counter(txn, b"next_seq")] + [e.seq + 1 for _n, _k, e in orphans])
                index.set_counter(txn, b"next_seq", nxt)
    finally:
        for fd in fds.values():
            os.close(fd)
        index.close()
        lock.release()
    rep.seconds = time.monotonic() - t0
    return rep
