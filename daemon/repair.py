"""Repair: verify objects against their checksums, drop what fails,
and (``kvfs verify --repair``) put back what can be rebuilt.

Invariants:
- a chunk that fails its checksum is never served: its object is removed
  (T1) or its T0 copy dropped and reread from T1;
- verification reads under the same leases as any reader.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

from kvfs import format as fmt
from kvfs import native
from kvfs.keys import normalize_key, normalize_ns

from .index import ObjEntry, obj_key
from .storecheck import check_record
from .tiering import Tiering

log = logging.getLogger("kvfsd")


class Repair(Tiering):
    @staticmethod
    def _verify_record(fd: int, hdr_off: int, ns: str, key: str, e: ObjEntry, i: int) -> bool:
        return check_record(fd, hdr_off, ns, key, e, i) is None

    def verify_object(self, ns: str, key: str, seq: int | None = None) -> bool:
        """Re-read an object and drop it if any chunk fails. True if dropped."""
        ns, key = normalize_ns(ns), normalize_key(key)
        if self._verify_t0(ns, key, seq):
            return True
        # No lease is held: compaction may move the object and reclaim the
        # segment read here (its fd then gone, or closed under the read). A
        # failed check counts only if the index still names the same place.
        bad = None
        for _attempt in range(3):
            with self.index.env.begin() as txn:
                e = self.index.get(txn, ns, key)
            if e is None or (seq is not None and e.seq != seq):
                return False
            if bad is not None and bad[0] == e.extents:
                log.warning("corrupt object %s/%s (chunk %d): dropped (%s)", ns, key, bad[1], bad[2])
                self._remove_objects([obj_key(ns, key)], reason="corrupt_dropped")
                return True
            bad = None
            for i, x in enumerate(e.extents):
                fd = self.segment_fd(x.seg)
                why = "its segment is gone" if fd < 0 else check_record(fd, e.header_offsets[i], ns, key, e, i)
                if why is not None:
                    bad = (e.extents, i, why)
                    break
            if bad is None:
                return False
        return False  # moved at every look: whatever is wrong, it is not this object's bytes

    def verify_store(self, deep: bool = False, repair: bool = False,
                     progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
        """``kvfs verify`` while serving (kvfsd.verify explains the checks).
        Blocking; clients go on reading and writing. What pass 1 finds
        broken is checked again under a lease before it counts (an object
        deleted or moved meanwhile is no problem); pass 2 scans every
        segment with its own file descriptors, and leaves out records of
        puts still being written, segments reclaimed during the scan and
        keys the daemon holds in memory (T0 puts not yet written back)."""
        from .verify import MAX_LISTED, VerifyReport, check_index, find_orphans

        t0 = time.monotonic()
        rep = VerifyReport(mode="online", deep=deep)
        suspects = check_index(self.index, self.segment_fd, deep, rep, progress)
        rep.broken, rep.broken_count = [], 0
        broken = []
        for ns, key, seq in suspects:
            reason = self._recheck(ns, key, seq, deep)
            if reason is not None:
                rep.add_broken(ns, key, reason)
                broken.append(obj_key(ns, key))
        with self._lock:
            segs = [(s.stripe, s.seg, s.path) for s in self.segs.values()]
        fds: dict[int, int] = {}

        def writing() -> Callable[[int, int], bool]:
            # taken before find_orphans reads the index: a put commits, then
            # ends its reservation, so a record is in one or the other
            with self._lock:
                busy = {sid: dict(s.reserved) for sid, s in self.segs.items() if s.reserved}
            return lambda seg, off: any(a <= off < b for a, b in busy.get(seg, {}).items())
        try:
            for _st, sid, path in segs:
                try:
                    fds[sid] = os.open(path, os.O_RDONLY)
                except FileNotFoundError:
                    continue  # reclaimed since
            orphans = find_orphans(self.index, [(st, sid, fds[sid], os.fstat(fds[sid]).st_size)
                                                for st, sid, _p in segs if sid in fds], fds, deep, rep, progress,
                                   writing)
            with self._lock:
                orphans = [(ns, k, e) for ns, k, e in orphans
                           if all(x.seg in self.segs for x in e.extents) and obj_key(ns, k) not in self.lru]
            rep.orphan_count = len(orphans)
            rep.orphans = [[ns, k, e.size] for ns, k, e in orphans][:MAX_LISTED]
            if repair:
                if broken:
                    rep.repaired_dropped = self._remove_objects(broken, reason="corrupt_dropped")
                for ns, k, e in orphans:
                    rep.repaired_indexed += self._put_again(ns, k, e, fds)
        finally:
            for fd in fds.values():
                os.close(fd)
        rep.seconds = time.monotonic() - t0
        return rep.as_dict()

    def _recheck(self, ns: str, key: str, seq: int, deep: bool) -> str | None:
        """What is wrong with ``ns``/``key`` (put ``seq``) now, under a lease;
        None if nothing, or if it is gone or was stored again meanwhile."""
        from .verify import check_entry
        ok = obj_key(ns, key)
        with self._lock:
            m = self.lru.get(ok)
            if m is None or m.seq != seq:
                return None
            lid = self.leases.grant("verify", [seg for seg, _span in m.spans], [ok], time.monotonic())
        try:
            with self.index.env.begin() as txn:
                e = self.index.get(txn, ns, key)
            if e is None or e.seq != seq:
                return None
            return check_entry(self.segment_fd, ns, key, e, deep)
        finally:
            freed = self.release([lid], "verify")
            if freed:
                self._reclaim(freed)

    def _put_again(self, ns: str, key: str, e: ObjEntry, fds: dict[int, int]) -> int:
        """Store an orphan through the put path (a copy: its old records stay
        dead bytes). 1 if stored, 0 if its key appeared meanwhile or its bytes
        no longer verify."""
        data = bytearray()
        for x in e.extents:
            chunk = os.pread(fds[x.seg], x.length, x.offset)
            if fmt.checksum(chunk) != x.checksum:
                return 0
            data += chunk
        return int(self._store_value(ns, key, None, memoryview(data), False))

    def read_verified(self, ns: str, key: str, head: Callable[[int, bytes, bytes | None], bytes] | None = None
                      ) -> tuple[int, bytes, bytes | None, memoryview] | None:
        """An object's (size, checksum, meta, bytes) read from T1 under a
        lease, every chunk checked against its sum (the shared tier's
        uploads). ``head(size, checksum, meta)``: bytes to put in front, in
        the same buffer (the bytes returned are then head and value). None:
        not stored, not yet in T1, or a chunk failed (that object is then
        verified and dropped as any reader's report would)."""
        ns, key = normalize_ns(ns), normalize_key(key)
        ok = obj_key(ns, key)
        with self._lock:
            m = self.lru.get(ok)
            if m is None:
                return None
            lid = self.leases.grant(("read",), [seg for seg, _span in m.spans], [ok], time.monotonic())
        try:
            with self.index.env.begin() as txn:
                e = self.index.get(txn, ns, key)
            if e is None:
                return None
            front = head(e.size, e.checksum, e.meta) if head is not None else b""
            buf = bytearray(len(front) + e.size)
            buf[:len(front)] = front
            view = memoryview(buf)
            pos = len(front)
            for x in e.extents:
                fd = self.segment_fd(x.seg)
                part = view[pos:pos + x.length]
                if fd < 0 or os.preadv(fd, [part], x.offset) != x.length or fmt.checksum(part) != x.checksum:
                    bad = True
                    break
                pos += x.length
            else:
                bad = False
        finally:
            freed = self.release([lid], ("read",))
            if freed:
                self._reclaim(freed)
        if bad:
            self.verify_object(ns, key, e.seq)
            return None
        return e.size, e.checksum, e.meta, view

    def _store_value(self, ns: str, key: str, meta: bytes | None, value: memoryview, sync: bool) -> bool:
        """Put one value from the daemon itself (blocking). False: the key is there."""
        return self.put_values(ns, [(key, meta, value)], sync)[0]

    def _verify_t0(self, ns: str, key: str, seq: int | None) -> bool:
        """Re-hash an object's T0 copy (any client may write the arena: see
        the README's trust model). A bad copy of an object also in T1 is
        dropped from T0; a bad T0-only object is dropped altogether (its
        write-back would carry the damage). True if the object is gone."""
        ok = obj_key(ns, key)
        with self._lock:
            m = self.lru.get(ok)
            if self.t0 is None or m is None or m.t0 < 0 or (seq is not None and m.seq != seq):
                return False
            lid = self.leases.grant(("verify",), (), [ok], time.monotonic())  # keeps the extent
            off, exts, dirty = m.t0, m.exts, m.dirty
        try:
            view = self.t0.arena.view
            parts, pos = [], 0
            for x in exts:
                parts.append(view[off + pos:off + pos + x[3]])
                pos += x[3]
            good = native.backend.hash_many(parts) == [x[4] for x in exts]
            for p in parts:
                p.release()
        finally:
            with self._lock:
                self.leases.release(lid)
                self._drain_unpinned()
        if good:
            return False
        log.warning("corrupt T0 copy of %s/%s: dropped%s", ns, key, " (not yet in T1: object lost)" if dirty else "")
        if dirty:
            self._remove_objects([ok], reason="corrupt_dropped")
            return True
        with self._lock:
            if self.lru.get(ok) is m and m.t0 >= 0:
                self.t0.drop(ok, m)
                self.generation.bump()
                self.t0.counters["corrupt_dropped"] += 1
        return False
