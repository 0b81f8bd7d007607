"""The client's session with the daemon: connections (one per thread),
the daemon's layout from its hello, leases, and what a client remembers
between calls (locations, touches).

Invariants:
- each thread has its own connection (answers come in order on one, so
  threads overlap only on separate ones); holds share one of their own;
- a reply from a restarted daemon (another ``instance``) makes the client
  take its layout again (arena, directory, generation epoch) and drop what
  it remembered of the old one: locations, file descriptors;
- a lease is released on the connection that took it;
- cache hits reported late (``_touch``) go out before anything that could
  evict.
"""
from __future__ import annotations

import logging
import mmap
import os
import time
from typing import Any, Callable, Collection, Sequence

from . import protocol as P
from .connection import Connection
from .directory import DirectoryReader
from .errors import DaemonUnavailable, KvfsError, ProtocolError
from .format import segment_name
from .generation import EPOCH, GenerationReader
from .loccache import LocationCache
from .store_state import StoreState

log = logging.getLogger("kvfs")

MADV_POPULATE_WRITE = 23  # Linux 5.14+: map (and fault in) a range's pages in one call
POPULATE_REGION = 2 << 20


class ArenaMapping:
    """The client's mapping of the daemon's shared-memory arena (T0):
    read-write for a client that may put, read-only for a reader (the
    daemon's ACL on the file grants it no more)."""

    def __init__(self, path: str, size: int, writable: bool = True):
        fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        try:
            self.mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0))
        finally:
            os.close(fd)
        try:  # where the daemon's tmpfs backs the arena with 2 MiB pages, map them as such (kvfsd.arena)
            self.mm.madvise(mmap.MADV_HUGEPAGE)
        except (AttributeError, OSError):
            pass
        self.path = path
        self.size = size
        self.writable = writable
        self.rw = memoryview(self.mm)  # read-only itself for a reader: puts never reach it (alloc is refused)
        self.ro = self.rw.toreadonly()
        # 2 MiB regions this process has faulted in (``populate``): its page
        # table entries stay for as long as the mapping (the daemon never
        # punches holes in the arena), so a region is populated once
        self._populated = bytearray(-(-size // POPULATE_REGION))

    def populate(self, lo: int, hi: int) -> None:
        """Fault in this process's pages of ``[lo, hi)`` at once, before the
        CPU writes them: the first write to each arena page costs a page
        fault per process (about half of a 64 KiB put's copy), one madvise
        over a range far less. Regions done before are skipped: asking again
        costs 1-4 ms per 32 MiB on this VM even with every page present, as
        much as copying a few MiB. Nothing happens where the kernel has no
        such advice (before Linux 5.14)."""
        first, last = lo // POPULATE_REGION, -(-hi // POPULATE_REGION)
        i = first
        while i < last:
            if self._populated[i]:
                i += 1
                continue
            j = i
            while j < last and not self._populated[j]:
                self._populated[j] = 1
                j += 1
            start, end = i * POPULATE_REGION, min(j * POPULATE_REGION, self.size)
            try:
                self.mm.madvise(MADV_POPULATE_WRITE, start, end - start)
            except (OSError, ValueError):
                pass
            i = j

    def close(self) -> None:
        """Unmap (only once no slice of it is held elsewhere; else the
        mapping goes when the last one does)."""
        try:
            self.ro.release()
            self.rw.release()
            self.mm.close()
        except BufferError:
            pass


class Session(StoreState):
    def _adopt(self, hello: dict[str, Any]) -> None:
        """Take the daemon's layout from a hello reply (at connect, and after
        reconnecting to a restarted daemon: new arena, new generation epoch)."""
        if hello.get("version") != P.PROTOCOL_VERSION:
            raise ProtocolError(f"daemon speaks protocol {hello.get('version')}, client {P.PROTOCOL_VERSION}")
        self.stripes: list[str] = list(hello["stripes"])
        self.stripe_unit: int = int(hello["stripe_unit"])
        self.daemon_pid: int = int(hello["pid"])
        self._instance = hello.get("instance")
        if self._gen is None:
            try:
                self._gen = GenerationReader(hello["generation"])
            except (OSError, KeyError, ValueError):
                pass  # cannot map the counter: no location cache, fds kept until LRU-closed
            self._fd_gen = self._gen.value if self._gen is not None else 0
            self._locs = LocationCache(self._gen) if self.cache_locations and self._gen is not None else None
        self._epoch = self._gen.value // EPOCH if self._gen is not None else 0
        dr = hello.get("directory")
        if self._dir is not None:
            self._dir.close()  # the old daemon's
        self._dir = None
        if dr and self._gen is not None:  # directory reads need the generation (seqlock)
            try:
                self._dir = DirectoryReader(dr["path"], int(dr["slots"]), int(hello["pid"]))
            except (OSError, ValueError):
                pass  # no access: every first get asks the daemon
        ar = hello.get("arena")
        # An old mapping is just dropped, never closed: views handed out by
        # get_view may still point into it (the orphaned file stays valid).
        if self.arena is not None and self._gpu is not None:
            self._gpu.forget_arena(self.arena)
        self.arena = None
        self.right: str | None = hello.get("right")  # read, write or admin (kvfsd.access)
        # a daemon with a shared tier: local misses are read through it (a
        # get's lookup says so), and contains/prefix_match ask it for the rest
        self.remote_tier: dict[str, Any] | None = hello.get("remote")
        self._fetch: dict[str, bool] = {"fetch": True} if self.remote_tier else {}
        if ar:
            try:
                self.arena = ArenaMapping(ar["path"], int(ar["size"]), writable=self.right != "read")
            except (OSError, ValueError):
                pass  # no access to the arena: T1 only (see the README's trust model)

    def _conn(self) -> Connection:
        if self._closed:
            raise KvfsError("store is closed")
        c: Connection | None = getattr(self._local, "conn", None)
        if c is None or c.broken:
            if c is not None:
                c.close()
                if self._locs is not None:
                    self._locs.clear()  # the daemon went away: start from what it says now
            c = self._new_conn()
            self._local.conn = c
        return c

    def _new_conn(self) -> Connection:
        c = Connection(self.socket_path)
        # A thread that ended leaves its connection behind (thread-local, but
        # listed here for close()): with it an arena reservation the daemon
        # keeps for it, and a socket. Those of ended threads close as soon as
        # any thread connects, so a pool whose threads come and go (an
        # engine's executor) does not pile up connections and their
        # reservations until the arena looks full to everyone.
        with self._conns_lock:
            ended = [x for x in self._conns if not x.broken and not x.owner.is_alive()]
            self._conns = [x for x in self._conns if not x.broken and x.owner.is_alive()] + [c]
        for x in ended:
            try:
                if x.deferred:
                    x.drain()  # answers to puts it sent without waiting (their errors are counted there)
            except Exception:  # noqa: BLE001 - it is closed either way
                pass
            x.close()
        if hasattr(self, "daemon_pid"):
            hello = c.call(P.HELLO, {"version": P.PROTOCOL_VERSION})
            if hello.get("instance") != self._instance:
                self._adopt(hello)  # a restarted daemon
        return c

    def _call(self, op: str, args: dict[str, Any], trailer: Sequence[memoryview] = ()) -> Any:
        conn = self._conn()
        if self._touches:
            self._flush_touches(conn)  # hits go out before anything that could evict
        try:
            return conn.call(op, args, trailer)
        except DaemonUnavailable:
            if not conn.answered or op not in P.RESENDABLE:
                raise
            # a connection that worked was cut (the daemon restarted): ask
            # once more on a new one, which is safe for these ops
            return self._conn().call(op, args, trailer)

    def close(self) -> None:
        if self._closed:
            return
        c_own: Connection | None = getattr(self._local, "conn", None)
        if c_own is not None and c_own.deferred and not c_own.broken:
            c_own.drain()  # this thread's puts sent without waiting: their answers, before the socket goes
        self._closed = True
        with self._conns_lock:
            for c in self._conns:
                c.close()
            self._conns.clear()
        self.reader.close()
        if self._gpu is not None:
            self._gpu.close()
        if self._gen is not None:
            self._gen.close()
        if self._dir is not None:
            self._dir.close()

    def _path(self, stripe: int, seg: int) -> str:
        return os.path.join(self.stripes[stripe], segment_name(seg))

    def _check_restart(self) -> None:
        """A restarted daemon moves the generation to a new epoch (same
        file): then the arena and directory mapped here are orphans, and
        must not be used again. Re-hello before any data-plane step."""
        if self._gen is not None and self._gen.value // EPOCH != self._epoch:
            try:
                hello = self._conn().call(P.HELLO, {"version": P.PROTOCOL_VERSION})
            except DaemonUnavailable:  # that connection was to the dead daemon
                hello = self._conn().call(P.HELLO, {"version": P.PROTOCOL_VERSION})
            self._adopt(hello)

    def _release(self, lease: int) -> None:
        """End a lease, fire-and-forget, on this thread's connection. If that
        connection is gone the daemon ended the lease itself (or died): a
        release never reconnects and never raises."""
        c: Connection | None = getattr(self._local, "conn", None)
        if c is not None and not c.broken:
            c.notify(P.RELEASE, {"leases": [lease]})

    def _caught_up(self, g: int) -> bool:
        """The generation ``g`` (just read) is the one this client last caught
        up with (``_drop_stale_fds``, ``_check_restart``): nothing removed
        and no restart since, so its cached locations and its mappings of
        the arena and the directory still hold."""
        return g == self._fd_gen and g // EPOCH == self._epoch

    def _drop_stale_fds(self) -> None:
        """Something was removed, so segment files may have been unlinked:
        close idle fds so they do not pin the space of deleted files."""
        if self._gen is not None and self._gen.value != self._fd_gen:
            self._fd_gen = self._gen.value
            self.reader.fds.drop_idle()
            self.reader.wfds.drop_idle()

    def _touch(self, ns: str, keys: list[str]) -> None:
        """Report cache hits to the daemon in batches (fire-and-forget).
        Hits are hints for its LRU, and this is on every direct read's path:
        no lock here, so a race with another thread's flush may drop a few
        (each step is atomic under the GIL: nothing raises)."""
        if not keys:
            return
        t = self._touches.get(ns)
        if t is None:
            t = self._touches.setdefault(ns, [])
        t.extend(keys)
        self._n_touches += len(keys)
        if self._n_touches < 256 and time.monotonic() - self._touched_at < 0.5:
            return
        self._flush_touches(self._conn())

    def _flush_touches(self, conn: Connection) -> None:
        with self._touch_lock:
            batches, self._touches = self._touches, {}
            self._n_touches, self._touched_at = 0, time.monotonic()
        for bns, bkeys in batches.items():
            conn.notify(P.TOUCH, {"ns": bns, "keys": bkeys})

    def _known_locations(self, cache: LocationCache, ns: str, ks: list[str]) -> tuple[int, dict[int, list[Any]]]:
        """Locations known without a round trip: this process's cache, then
        the shared directory. Returns them with the generation read before
        (a read from them is valid only if it has not moved after)."""
        gen = cache.generation()
        cached = cache.get_many(ns, ks)
        d = self._dir
        if d is not None and len(cached) < len(ks):
            try:
                found = d.lookup_many(ns, ks, [i for i in range(len(ks)) if i not in cached])
            except ValueError:  # closed under us by a reconnect to a restarted daemon
                found = {}
            cached.update(found)
            cache.put_many(ns, [(ks[i], item) for i, item in found.items()], gen)
        return gen, cached

    def _settle_known(self, cache: LocationCache, ns: str, ks: list[str], cached: Collection[int],
                      missed: set[int], sizes: list[int], todo: list[int]) -> list[int]:
        """After reads from known locations (the items ``cached``): forget
        those that failed (or were not read), count the hits, and return
        what is left to look up."""
        missed.update([i for i in cached if sizes[i] < 0])
        for i in missed:
            sizes[i] = -1
            cache.drop(ns, ks[i])
        self._touch(ns, [ks[i] for i in cached if i not in missed])
        return [i for i in todo if i not in cached or i in missed]

    def _hold_connection(self) -> Connection:
        c = self._hold_conn
        if c is None or c.broken:
            if self._closed:
                raise KvfsError("store is closed")
            c = self._hold_conn = self._new_conn()
        return c

    def _end_hold(self, conn: Connection, lease: int) -> None:
        with self._hold_lock:
            conn.notify(P.RELEASE, {"leases": [lease]})  # a broken one: the daemon ended it already

    def _wait_job(self, jid: int, progress: Callable[[str, int, int], None] | None, poll: float) -> dict[str, Any]:
        while True:
            st = self._call(P.JOB, {"id": jid})
            if st["state"] == "failed":
                raise KvfsError(f"{st['kind']} failed in the daemon: {st['error']}")
            if progress is not None and st["total"]:
                progress(st["phase"], st["done"], st["total"])  # the last one shows the bar full
            if st["state"] == "done":
                return dict(st["result"])
            time.sleep(poll)
