"""Space: disk capacity, eviction, removal, and what leases ending frees.

Invariants:
- eviction keeps usage below the high watermark by removing least recently
  used objects that are neither leased nor dirty (T0 only), down to the low
  watermark; a put that finds only dirty objects left waits (up to
  DIRTY_WAIT) for their write-back, which makes them evictable;
- a removal unpublishes in one commit, leaves the directory, bumps the
  removal generation, and only then reclaims segments left fully dead;
- a segment is unlinked only when it has no live record, no reservation and
  no lease: its row goes in a commit first, then the file (emptied first:
  a client's cached descriptor then reads short, never stale bytes).
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Hashable

from kvfs.errors import CapacityError, InvalidArgument
from kvfs.keys import normalize_key, normalize_ns

from .eviction import choose_victims
from .index import obj_key, split_obj_key
from .placement import Placement
from .segments import SegState

log = logging.getLogger("kvfsd")

# how long a put that needs room waits for T0 write-backs to end (their
# values then become evictable) before it is refused
DIRTY_WAIT = 10.0


class NeedRoom(Exception):
    """prepare_put(may_evict=False) found that eviction must run first."""


class Space(Placement):
    def disk_usage(self) -> int:
        return self._usage

    def needs_room(self, need: int) -> bool:
        return self._usage + need > self.capacity * self.cfg.high_watermark

    def _make_room(self, need: int) -> None:
        cap = self.capacity
        if need > cap:
            raise CapacityError(f"value needs {need} bytes on disk; the capacity is {cap}",
                                needed=need, capacity=cap, used=self.disk_usage())
        with self._evict_lock:
            deadline = time.monotonic() + DIRTY_WAIT
            while True:
                used = self.disk_usage()
                if used + need <= cap * self.cfg.high_watermark:
                    return
                self._evict_for(used, need)
                used = self.disk_usage()
                if used + need <= cap:
                    return
                # what is left may be T0 puts whose write-back is under way:
                # once written back they can be evicted, so wait for it
                if not self._wait_written_back(deadline):
                    raise CapacityError(
                        f"no room for {need} bytes: {used} of {cap} bytes used and nothing more can be "
                        f"evicted (leased or in flight)", needed=need, capacity=cap, used=used)

    def _evict_for(self, used: int, need: int) -> None:
        """Evict least recently used objects, neither leased nor dirty, down
        to the low watermark less ``need``. Caller holds the eviction lock."""
        target = int(self.capacity * self.cfg.low_watermark) - need
        with self._lock:
            # a generator: the walk stops as soon as the target is reached,
            # instead of copying the whole LRU order under the lock
            lru = ((ok, m.spans) for ok, m in self.lru.items())
            seg_live = {s: st.live for s, st in self.segs.items()}
            seg_size = {s: st.end for s, st in self.segs.items()}
            v = choose_victims(
                lru, seg_live, seg_size, used, max(target, 0),
                evictable=lambda ok: not self.leases.obj_leased(ok) and not self.lru[ok].dirty,
                seg_reclaimable=lambda s: self.segs[s].inflight == 0 and not self.leases.seg_leased(s))
        if v.objects:
            self._remove_objects(v.objects, reason="evictions")

    def _wait_written_back(self, deadline: float) -> bool:
        """Wait (a worker thread) until no T0 write-back is pending; False if
        none was, or it did not end before ``deadline``."""
        t0 = self.t0
        if t0 is None or not t0.backlog_objects:
            return False
        while t0.backlog_objects and time.monotonic() < deadline:
            time.sleep(0.002)
        return not t0.backlog_objects

    def evict(self, to: int, ns: str | None = None) -> dict[str, Any]:
        """``kvfs evict``: evict least recently used objects (of ``ns``, or
        of the whole store) until their values total at most ``to`` bytes.
        Leased objects and those not yet written back from T0 are skipped.
        Disk space comes back as segments die whole (compaction moves the
        survivors of mostly-dead ones); the report says what it was and is.
        Blocking."""
        if to < 0:
            raise InvalidArgument("the target size must be >= 0")
        prefix = None if ns is None else obj_key(normalize_ns(ns), "")
        with self._evict_lock:
            disk_before = self.disk_usage()
            with self._lock:
                scope = [(ok, m) for ok, m in self.lru.items() if prefix is None or ok.startswith(prefix)]
                before = sum(m.size for _ok, m in scope)
                left = before
                victims: list[bytes] = []
                skipped = 0
                for ok, m in scope:  # least recently used first
                    if left <= to:
                        break
                    if m.dirty or self.leases.obj_leased(ok):
                        skipped += 1
                        continue
                    victims.append(ok)
                    left -= m.size
            removed = self._remove_objects(victims, reason="evictions") if victims else 0
        return {"ns": ns, "to": to, "objects": removed, "bytes_before": before, "bytes_after": left,
                "reached": left <= to, "skipped_in_use": skipped,
                "disk_before": disk_before, "disk_after": self.disk_usage()}

    def delete(self, ns: str, keys: list[Any]) -> int:
        ns = normalize_ns(ns)
        oks = [obj_key(ns, normalize_key(k)) for k in keys]
        n = self._remove_objects(oks, reason="deletes")
        return n

    def _remove_objects(self, oks: list[bytes], reason: str) -> int:
        """Unpublish objects (one commit), then reclaim segments left dead."""
        def job(txn: Any) -> list[bytes]:
            out = []
            marked: set[bytes] = set()  # a set: a list's `in` made deleting n dirty keys O(n^2)
            with self._lock:
                # T0-only objects are in the mirror, not in LMDB: marking them
                # here, on the writer thread, orders it with their publish job
                for ok in oks:
                    m = self.lru.get(ok)
                    if m is not None and m.dirty and ok not in marked:
                        m.deleted = True
                        marked.add(ok)
                        out.append(ok)
            for ok in oks:
                ns, key = split_obj_key(ok)
                if self.index.delete_object(txn, ns, key) is not None and ok not in marked:
                    marked.add(ok)
                    out.append(ok)
            return out
        removed: list[bytes] = self.writer.call(job, sync=self.cfg.durability == "sync")
        segs: list[int] = []
        with self._lock:
            owed: list[int] = []  # seqs of removed T0 puts not yet written back: the journal owes them no more
            for ok in removed:
                m = self.lru.pop(ok, None)
                if m is None:
                    continue  # never mirrored (a lost race): its spans were not counted
                ns, _key = split_obj_key(ok)
                if m.dirty:
                    owed.append(m.seq)
                if self.dir is not None:
                    self.dir.remove(ok)  # before the generation bump below
                self._dirty_atime.pop(ok, None)
                self.promote_q.pop(ok, None)
                self.ns_objects[ns] -= 1
                if self.ns_objects[ns] <= 0:
                    del self.ns_objects[ns]
                self.logical_bytes -= m.size
                if self.t0 is not None and m.t0 >= 0 and not m.dirty:
                    self.t0.drop(ok, m)  # a dirty one is freed when its write-back ends
                for seg, span in m.spans:  # () while dirty: never counted
                    s = self.segs.get(seg)
                    if s is not None:
                        s.drop_live(span)
                        segs.append(seg)
            if owed and self.journal is not None:
                # before the removal is acknowledged: a daemon killed before
                # their write-backs end must not replay them (a deleted key
                # would come back)
                self.journal.done(*owed)
                self.journal.flush()
            self.counters[reason] += len(removed)
            if removed:
                # after the unpublishing commit, before any unlink: clients
                # drop cached locations (see kvfs.generation)
                self.generation.bump()
        self._reclaim(segs)
        return len(removed)

    def _reclaim(self, segs: list[int]) -> None:
        """Unlink segments that are fully dead, unleased and not being written.
        Their rows are deleted in a commit first; files go after it."""
        doomed: list[SegState] = []
        with self._lock:
            for sid in set(segs):
                s = self.segs.get(sid)
                if s is None or s.live > 0 or s.inflight > 0 or self.leases.seg_leased(sid):
                    continue
                if self.open_seg.get(s.stripe) == sid:
                    del self.open_seg[s.stripe]
                del self.segs[sid]
                self.unpersisted.discard(sid)
                self._usage -= s.end
                doomed.append(s)
        if not doomed:
            return
        def job(txn: Any) -> None:
            for s in doomed:
                self.index.delete_segment(txn, s.seg)
        # An unlink may reach the disk at any later directory fsync, so the
        # commits that moved or removed every record of these segments (and
        # the copies they point at) must be on disk first: a power cut must
        # not leave the index naming a segment that is gone.
        self.durable_round()
        self.writer.call(job, sync=True)
        for s in doomed:
            s.close()
            try:
                # emptied first: a client may still hold the file open (its
                # data plane caches descriptors), and an unlinked file keeps
                # its blocks while any descriptor does. No lease pins it, so
                # no reader may rely on its bytes: a stale one reads short
                # and looks up again.
                os.truncate(s.path, 0)
                os.unlink(s.path)
            except FileNotFoundError:
                pass
        with self._lock:
            self.counters["segments_deleted"] += len(doomed)

    def _reclaimable(self, sid: int) -> bool:
        s = self.segs.get(sid)
        return s is not None and s.live <= 0 and s.inflight == 0

    def reclaim(self, segs: list[int]) -> None:
        self._reclaim(segs)

    def release(self, lids: list[int], owner: Hashable | None) -> list[int]:
        """End leases (memory only: safe on the event loop). Returns segments
        no longer leased; the caller passes them to ``reclaim`` (which may
        block) if any."""
        with self._lock:
            freed: list[int] = []
            for lid in lids:
                freed += self.leases.release(lid, owner)
            self._drain_unpinned()
        return [s for s in freed if self._reclaimable(s)]

    def release_owner(self, owner: Hashable) -> None:
        with self._lock:
            freed = self.leases.release_owner(owner)
            self._drain_unpinned()
        if freed:
            self._reclaim(freed)

    def expire_leases(self) -> None:
        with self._lock:
            freed = self.leases.expire(time.monotonic())
            self._drain_unpinned()
        if freed:
            self._reclaim(freed)

    def _drain_unpinned(self) -> None:
        """Free T0 extents whose objects lost their last lease. Caller holds the lock."""
        freed = self.leases.take_unpinned()
        if self.t0 is not None and self.t0.zombies:
            self.t0.unpinned(freed)

    def remove_namespace(self, ns: str) -> bool:
        """Remove an empty namespace; False if it holds objects. Blocking."""
        ns = normalize_ns(ns)

        def job(txn: Any) -> bool:
            with self._lock:
                if self.ns_objects.get(ns):
                    return False
            keys, _more = self.index.iter_keys(txn, ns, None, 1)
            return not keys and self.index.delete_namespace(txn, ns)
        return bool(self.writer.call(job, sync=self.cfg.durability == "sync"))
