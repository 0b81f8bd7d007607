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
copies (compaction never evicts). An *open* segment at least ``threshold``
dead is sealed first (the next put on its stripe opens a fresh one), once
the writes already placed in it have landed: otherwise a young store, whose
dead bytes all sit in its open segments, would never give space back.

The report names every segment that still holds dead bytes afterwards,
with the reason it kept them (``not_reclaimed``).
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
    from .engine import Engine
    from .segments import ChunkPlan

log = logging.getLogger("kvfsd")

RESERVED_WAIT_S = 5.0  # how long compaction waits for puts placed in a segment it just sealed


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


def seal_open(eng: "Engine", threshold: float, stripe: int | None = None) -> list[int]:
    """Seal the open segments at least ``threshold`` dead (of ``stripe``,
    or all); the next reservation on each stripe opens a fresh segment.
    Reservations already placed in one still land there (they lie below its
    end); ``candidates`` skips it until they have."""
    sealed = []
    with eng._lock:
        for st, sid in list(eng.open_seg.items()):
            s = eng.segs.get(sid)
            if (stripe is not None and st != stripe) or s is None or s.end <= 0:
                continue
            # bytes still being written (T0 write-backs not yet committed) are
            # not dead: counted so, a young segment read as all dead and was
            # sealed at every check, leaving segments of a few KiB behind
            pending = sum(end - start for start, end in s.reserved.items())
            if 1 - (s.live + pending) / s.end < threshold:
                continue
            eng.seal(s)
            del eng.open_seg[st]
            sealed.append(sid)
    return sealed


def _wait_unreserved(eng: "Engine", sids: list[int], timeout: float = RESERVED_WAIT_S) -> None:
    """Let puts already placed in ``sids`` land (they are ms away: the
    caller settled the T0 write-backs first), for at most ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with eng._lock:
            if not any(sid in eng.segs and eng.segs[sid].reserved for sid in sids):
                return
        time.sleep(0.005)


def compact(eng: "Engine", threshold: float = 0.5, stripe: int | None = None,
            progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Compact every segment at least ``threshold`` dead (of ``stripe``, or
    all), open ones included. Blocking. Returns what it did."""
    t0 = time.monotonic()
    usage_before = eng.disk_usage()
    sealed = seal_open(eng, threshold, stripe)
    _wait_unreserved(eng, sealed)
    segs = candidates(eng, threshold, stripe)
    total = sum(live for _s, _n, live in segs)
    rep: dict[str, Any] = {"segments": 0, "segments_pending_lease": 0, "open_segments_sealed": len(sealed),
                           "objects_moved": 0, "bytes_copied": 0, "chunks_skipped": 0, "corrupt_dropped": 0,
                           "stopped_for_room": False}
    done = 0
    no_room: set[int] = set()
    for i, (sid, _size, live) in enumerate(segs):
        if eng.disk_usage() + live + fmt.PAGE * 64 > eng.capacity:
            rep["stopped_for_room"] = True
            no_room = {s for s, _n, _l in segs[i:]}
            log.warning("compaction stopped: no room for the %d live bytes of segment %d", live, sid)
            break
        _compact_segment(eng, sid, rep)
        done += live
        if progress is not None:
            progress("bytes", done, total)
    with eng._lock:
        rep["segments_pending_lease"] = sum(1 for sid, _n, _l in segs if sid in eng.segs and eng.segs[sid].live <= 0)
        rep["not_reclaimed"] = not_reclaimed(eng, threshold, stripe, no_room)
    rep["dead_bytes_left"] = sum(r["dead_bytes"] for r in rep["not_reclaimed"])
    rep["bytes_reclaimed"] = max(0, usage_before - eng.disk_usage())
    rep["seconds"] = time.monotonic() - t0
    return rep


def not_reclaimed(eng: "Engine", threshold: float, stripe: int | None, no_room: set[int]) -> list[dict[str, Any]]:
    """Every segment (of ``stripe``, or all) still holding dead bytes, and
    why compaction left them. Caller holds ``eng._lock``."""
    out = []
    for s in sorted(eng.segs.values(), key=lambda s: s.seg):
        dead = s.end - s.live
        if dead <= 0 or (stripe is not None and s.stripe != stripe):
            continue
        share = dead / s.end
        is_open = eng.open_seg.get(s.stripe) == s.seg
        if s.live <= 0 and eng.leases.seg_leased(s.seg):
            why = "all dead; a reader's lease holds it (it goes when the lease ends)"
        elif s.reserved:
            why = "writes are still landing in it"
        elif s.seg in no_room:
            why = "no free space for its live records' copies"
        elif share < threshold:
            why = f"{'open' if is_open else 'sealed'} segment {share:.0%} dead, below the threshold {threshold:.0%}"
        else:
            why = "its records changed while they were copied (run kvfs compact again)"
        out.append({"segment": s.seg, "stripe": str(eng.cfg.stripes[s.stripe]), "open": is_open,
                    "dead_bytes": dead, "dead_share": round(share, 4), "reason": why})
    return out


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
    copied_before = rep["bytes_copied"]
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
        # durability order: the copies are synced before the commit that
        # points the index at them, in fast mode too. They hold puts that
        # were durable already (sync puts among them), and a commit is on
        # disk once the next one syncs LMDB's pages (MDB_NOMETASYNC,
        # kvfsd.index), not only at the periodic index sync: with unsynced
        # copies a power cut lost acknowledged sync puts (recovery found
        # their copies bad and dropped them). The old segment goes after.
        eng.sync_segments(touched)
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
            m.exts = tuple(x.wire() for x in e.extents)
            m.rewire()
            eng._dir_put(ok, m)
        rep["objects_moved"] += len(applied)
        # counted as each segment goes, not when the run ends: stats must never
        # show a segment's bytes freed while its compaction is not yet counted
        eng.counters["compacted_bytes"] += rep["bytes_copied"] - copied_before
        if applied:
            eng.generation.bump()  # after the commit, before any unlink
    for ns, key, seq in corrupt:  # dropped if that put is still the object, and still bad
        rep["corrupt_dropped"] += int(eng.verify_object(ns, key, seq))
    with eng._lock:
        if sid in eng.segs and eng.segs[sid].live <= 0:
            eng.counters["compactions"] += 1
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
            # deleted or stored again meanwhile: the copy is dead bytes, and
            # known as such (segdead), so kvfs verify never takes it for a
            # put the index lost; its reservation ends only after this commit
            for mv in mvs:
                txn.put(segobj_key(mv.new.seg, mv.new.hdr_off), ok, db=idx.segdead)
            continue
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

