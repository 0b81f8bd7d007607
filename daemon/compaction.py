"""Online compaction: give back the dead bytes of sealed segments.

Disk space returns only when a segment dies whole, so a segment whose
records are mostly dead (deleted, evicted, superseded) keeps its file for a
few survivors. Compaction copies those survivors forward and lets the old
segment go, while clients read and write:

1. The survivors (the index's ``segobj`` rows of the segment) are read,
   verified against their checksums (rot is not copied forward: such an
   object is dropped as corrupt), and written as new records, with the same
   sequence number and checksum, at the end of the open segment of the
   same stripe (striping is kept).
2. In ``sync`` mode the new records are fdatasync'd. Then one index commit
   points every survivor that is still the same object at the same place
   to its new record, and marks the old records dead. A survivor deleted or
   stored again meanwhile keeps its new state; its copy is dead bytes.
3. The daemon's mirror and the shared location directory follow, and the
   removal generation is bumped (clients drop cached locations) before
   anything is unlinked.
4. The old segment, now without live records, is unlinked as soon as no
   lease pins it (a reader still copying from it keeps it until done).

Only sealed segments no reservation points into are compacted, one at a
time, the most dead first, and only while the store has room for the
copies (compaction never evicts).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from kvfs import format as fmt

from .index import SEG_SEALED, Extent, ObjEntry, segobj_key, split_obj_key

if TYPE_CHECKING:
    from .engine import ChunkPlan, Engine

log = logging.getLogger("kvfsd")


@dataclass
class _Move:
    ok: bytes
    seq: int
    chunk: int
    old_hdr: int
    new: "ChunkPlan"


def candidates(eng: "Engine", threshold: float, stripe: int | None = None) -> list[tuple[int, int, int]]:
    """(segment, bytes, live bytes) of sealed, unreserved segments at least
    ``threshold`` dead, the most dead first. Caller holds no lock."""
    with eng._lock:
        out = [(s.seg, s.end, s.live) for s in eng.segs.values()
               if s.state == SEG_SEALED and not s.reserved and s.end > 0
               and eng.open_seg.get(s.stripe) != s.seg and (stripe is None or s.stripe == stripe)
               and 1 - s.live / s.end >= threshold]
    return sorted(out, key=lambda t: t[2] / t[1])


def compact(eng: "Engine", threshold: float = 0.5, stripe: int | None = None,
            progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Compact every segment at least ``threshold`` dead (of ``stripe``, or
    all). Blocking. Returns what it did."""
    t0 = time.monotonic()
    usage_before = eng.disk_usage()
    segs = candidates(eng, threshold, stripe)
    total = sum(live for _s, _n, live in segs)
    rep: dict[str, Any] = {"segments": 0, "segments_pending_lease": 0, "objects_moved": 0, "bytes_copied": 0,
           "chunks_skipped": 0, "corrupt_dropped": 0, "stopped_for_room": False}
    done = 0
    for sid, _size, live in segs:
        if eng.disk_usage() + live + fmt.PAGE * 64 > eng.capacity:
            rep["stopped_for_room"] = True
            log.warning("compaction stopped: no room for the %d live bytes of segment %d", live, sid)
            break
        _compact_segment(eng, sid, rep)
        done += live
        if progress is not None:
            progress("bytes", done, total)
    with eng._lock:
        rep["segments_pending_lease"] = sum(1 for sid, _n, _l in segs if sid in eng.segs and eng.segs[sid].live <= 0)
        eng.counters["compactions"] += rep["segments"]
        eng.counters["compacted_bytes"] += rep["bytes_copied"]
    rep["bytes_reclaimed"] = max(0, usage_before - eng.disk_usage())
    rep["seconds"] = time.monotonic() - t0
    return rep


def _compact_segment(eng: "Engine", sid: int, rep: dict[str, Any]) -> None:
    idx = eng.index
    with idx.env.begin() as txn:
        records = [(off, ok, idx.get(txn, *split_obj_key(ok))) for off, ok in idx.iter_segment_records(txn, sid)]
    with eng._lock:
        seg = eng.segs.get(sid)
        if seg is None:
            return
        stripe, path = seg.stripe, seg.path
    try:
        fd = os.open(path, os.O_RDONLY)  # its own: readable even if the file goes meanwhile
    except FileNotFoundError:
        return
    moves: list[_Move] = []
    corrupt: list[tuple[str, str, int]] = []
    touched: set[int] = set()
    try:
        for off, ok, e in records:
            if e is None:
                continue
            i = next((i for i, (x, h) in enumerate(zip(e.extents, e.header_offsets)) if x.seg == sid and h == off), -1)
            if i < 0:
                continue
            x = e.extents[i]
            data = os.pread(fd, x.length, x.offset)
            ns, key = split_obj_key(ok)
            if fmt.checksum(data) != x.checksum:
                corrupt.append((ns, key, e.seq))  # not copied forward
                continue
            with eng._lock:
                ch = eng._place_chunk(stripe, len(ns.encode()), len(key.encode()), i, x.length, touched)
            moves.append(_Move(ok, e.seq, i, off, ch))  # reserved: released after the commit
            ch.checksum = x.checksum
            ch.chunk_off = sum(y.length for y in e.extents[:i])
            head = eng.record_head(ns, key, len(e.extents), e.size, e.seq, ch)
            eng._pwrite(ch, [head, data], len(head) + len(data))
            rep["bytes_copied"] += x.length
        if eng.cfg.durability == "sync":
            for s in touched:
                os.fdatasync(eng.segs[s].fd)
        # durability order: the copies are written (and synced) above; this
        # commit points the index at them; the old segment goes after it
        applied: list[tuple[bytes, ObjEntry]] = eng.writer.call(lambda txn: _switch(eng, txn, sid, moves),
                                                                sync=eng.cfg.durability == "sync")
    finally:
        os.close(fd)
        released: list[int] = []
        with eng._lock:
            for mv in moves:
                dest = eng.segs.get(mv.new.seg)
                if dest is not None:
                    dest.reserved.pop(mv.new.start, None)
                    released.append(mv.new.seg)
    moved = {ok for ok, _e in applied}
    rep["chunks_skipped"] += sum(1 for mv in moves if mv.ok not in moved)
    with eng._lock:
        for ok, e in applied:
            m = eng.lru.get(ok)
            if m is None or m.seq != e.seq or m.dirty:
                continue
            for sid_, span in m.spans:
                if sid_ in eng.segs:
                    eng.segs[sid_].drop_live(span)
            m.spans = tuple((x.seg, sp) for x, sp in zip(e.extents, e.spans))
            for sid_, span in m.spans:
                eng.segs[sid_].add_live(span)
            m.exts = [x.wire() for x in e.extents]
            m.rewire()
            eng._dir_put(ok, m)
        rep["objects_moved"] += len(applied)
        if applied:
            eng.generation.bump()  # after the commit, before any unlink
    for ns, key, seq in corrupt:  # dropped if that put is still the object, and still bad
        rep["corrupt_dropped"] += int(eng.verify_object(ns, key, seq))
    with eng._lock:
        dead = sid in eng.segs and eng.segs[sid].live <= 0
    if dead:
        rep["segments"] += 1
    eng._reclaim([sid] + released)


def _switch(eng: "Engine", txn: Any, sid: int, moves: list[_Move]) -> list[tuple[bytes, ObjEntry]]:
    """Writer thread: point each object still as it was to its new records."""
    idx = eng.index
    eng._persist_segments(txn)  # rows of segments the copies opened
    by_obj: dict[bytes, list[_Move]] = {}
    for mv in moves:
        by_obj.setdefault(mv.ok, []).append(mv)
    out = []
    for ok, mvs in by_obj.items():
        ns, key = split_obj_key(ok)
        e = idx.get(txn, ns, key)
        if e is None or any(e.seq != mv.seq or e.extents[mv.chunk].seg != sid
                            or e.header_offsets[mv.chunk] != mv.old_hdr for mv in mvs):
            continue  # deleted or stored again meanwhile: the copy is dead bytes
        for mv in mvs:
            c = mv.new
            e.extents[mv.chunk] = Extent(c.stripe, c.seg, c.payload_off, c.length, c.checksum)
            e.header_offsets[mv.chunk] = c.hdr_off
            e.spans[mv.chunk] = c.end - c.hdr_off
            txn.delete(segobj_key(sid, mv.old_hdr), db=idx.segobj)
            txn.put(segobj_key(sid, mv.old_hdr), ok, db=idx.segdead)
        idx.put_object(txn, ns, key, e)
        out.append((ok, e))
    return out

