"""Writing new files through the mount (a part of KvfsOps, kvfsd.fuse_ops).

- A new file's bytes go straight to their place in T1 as they are written
  (``StreamPut``, queued by ``WriteBehind``), and it is committed as one
  object when a descriptor that wrote to it is closed; until then no other
  reader sees it. A failed write discards the file: no partial objects.
- A file closed with nothing written is a *draft* (``_reopen_draft``): it
  may be opened for writing again (fio's layout: create, ftruncate, close,
  reopen), and is stored as it is when read or DRAFT_S after its last close.
- Once committed the object is immutable: later writes get EROFS.
"""
from __future__ import annotations

import errno
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from kvfs.keys import normalize_key

from . import fuse_types as ft
from .access import Right
from .fuse_errors import entry_name, fuse_errors
from .stream_put import StreamPut
from .write_behind import WriteBehind

if TYPE_CHECKING:
    from .engine import Engine
    from .fuse_access import MountAccess

log = logging.getLogger("kvfsd.fuse")

# a file closed with nothing written stays a reopenable draft this long
DRAFT_S = float(os.environ.get("KVFS_FUSE_DRAFT_S", "5"))


@dataclass
class WriteHandle:
    ns: str
    key: str
    ino: int
    put: StreamPut | None  # None while create is still setting it up
    behind: WriteBehind | None = None  # queued writes (None: written before the reply)
    size: int = 0  # the file's size as writers see it (queued writes included)
    committed: bool = False
    failed: bool = False  # a write failed: the file is never committed (no partial objects)
    written: bool = False  # a write reached it (a truncate alone is not one)
    closed_empty: bool = False  # a descriptor was closed before anything was written: a draft
    opens: int = 1  # descriptors open on it (create, and reopens of a draft for writing)
    # the C mount writes the bytes itself (kvfsd._cfuse.WriteState): size,
    # written and failed are its, taken by pull() before they are read here
    cw: Any = None

    def pull(self) -> None:
        """Take what the C mount's writes did to the file (memory only;
        writes answered but still in flight are counted, not waited for)."""
        if self.cw is not None:
            self._take(self.cw.state())

    def _take(self, state: tuple[int, int, int]) -> None:
        size, written, err = state
        self.size = size
        if self.put is not None:
            self.put.size = size
        self.written = self.written or bool(written)
        if err:
            self.failed = True

    async def settle(self, final: bool = False) -> None:
        """Every write acknowledged so far is in T1 (raises the first write
        error). ``final``: the file is being stored; the C mount refuses
        later writes from here on, so the size taken now is the object's."""
        if self.behind is not None:
            await self.behind.settle()
        if self.cw is not None:
            self._take(await trio.to_thread.run_sync(self.cw.seal if final else self.cw.settle))
            err = self.cw.state()[2]
            if err:
                raise OSError(err, os.strerror(err))


class FileWrites:
    """The write half of the FUSE operations. KvfsOps provides the state
    and the inode helpers declared here."""

    eng: "Engine"
    acc: "MountAccess"
    pending: dict[tuple[str, str], WriteHandle]  # new files not yet committed
    handles: dict[int, Any]
    c_writes: bool  # the C mount writes new files' bytes itself (no write-behind here)
    nursery: trio.Nursery | None
    counters: dict[str, int]

    if TYPE_CHECKING:
        def _kind(self, ino: int) -> tuple[str, ...]: ...
        def _ino(self, *what: str) -> int: ...
        def _new_fh(self, h: Any) -> int: ...
        def _entry(self, attr: ft.EntryAttributes) -> ft.EntryAttributes: ...
        async def _attr_of(self, ino: int) -> ft.EntryAttributes: ...

    @fuse_errors
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: Any) -> tuple[ft.FileInfo, ft.EntryAttributes]:
        self.acc.require(ctx, Right.WRITE)
        kind = self._kind(parent_inode)
        if kind[0] != "ns":
            raise ft.FUSEError(errno.EPERM if kind[0] == "root" else errno.EROFS)
        ns, key = kind[1], normalize_key(entry_name(name))
        if self.eng.object_entry(ns, key) is not None or (ns, key) in self.pending:
            raise ft.FUSEError(errno.EEXIST)
        ino = self._ino("obj", ns, key)
        w = self.pending[(ns, key)] = WriteHandle(ns, key, ino, None)  # the name is taken
        try:
            w.put = StreamPut(self.eng, ns, key)
            if self.nursery is not None and not self.c_writes:
                w.behind = WriteBehind(w.put, self.nursery)
        except BaseException:
            self.pending.pop((ns, key), None)
            raise
        fh = self._new_fh(w)
        return ft.FileInfo(fh=fh, direct_io=False, keep_cache=False), self._entry(await self._attr_of(ino))

    async def _reopen_draft(self, w: WriteHandle, flags: int) -> ft.FileInfo:
        """A file created and closed with nothing written (``touch``, or
        fio's layout: create, ftruncate, close) is a draft, not yet an
        object: it may be opened for writing again, and what is written
        then is stored when that descriptor closes. A draft nobody writes
        is stored as it is (empty, or zeros up to its truncated size) when
        it is opened for reading or DRAFT_S after its last close."""
        if w.put is None:
            raise ft.FUSEError(errno.EBUSY)
        w.pull()
        if flags & os.O_TRUNC and w.size:
            await self._truncate_pending(w, 0)
        w.closed_empty = False
        w.opens += 1
        return ft.FileInfo(fh=self._new_fh(w), direct_io=False, keep_cache=False)

    async def _commit_draft_later(self, w: WriteHandle) -> None:
        """Store a draft nobody reopened (a background task: never raises)."""
        await trio.sleep(DRAFT_S)
        if w.committed or w.opens > 0 or not w.closed_empty:
            return  # stored, or reopened meanwhile
        try:
            await self._commit_now(w)
        except Exception:  # noqa: BLE001 - logged; the mount serves on
            log.exception("storing the draft %s/%s", w.ns, w.key)

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        w = self.handles.get(fh)
        if not isinstance(w, WriteHandle):
            raise ft.FUSEError(errno.EBADF)
        if w.committed:
            raise ft.FUSEError(errno.EROFS)  # closed once: the object is immutable now
        assert w.put is not None
        try:
            if w.behind is not None:
                n = await w.behind.write(buf, off)
            else:
                n = await trio.to_thread.run_sync(w.put.write, buf, off)
        except BaseException:
            w.failed = True
            raise
        w.size = max(w.size, off + n)
        w.written = True
        self.counters["writes"] += 1
        self.counters["write_bytes"] += n
        return n

    @fuse_errors
    async def flush(self, fh: int) -> None:
        """close(2) of a descriptor: commit a new file once something was
        written, so it is readable when `cp` returns. (A close that comes
        before any write, like dd's dup2-then-close, commits nothing; an
        empty file is committed at release.)"""
        w = self.handles.get(fh)
        if isinstance(w, WriteHandle) and not w.committed:
            w.pull()
            if w.written:
                await self._commit_now(w)
            else:
                w.closed_empty = True  # a draft (see _reopen_draft)

    async def _commit_now(self, w: WriteHandle) -> None:
        try:
            error: Exception | None = None
            try:
                await w.settle(final=True)
            except Exception as e:  # a queued write failed: close(2) reports it
                w.failed, error = True, e
            if w.behind is not None:
                w.behind.close()
            if w.failed or w.put is None:
                log.warning("%s/%s: a write failed; the file is discarded, not stored", w.ns, w.key)
                if w.put is not None:
                    await trio.to_thread.run_sync(w.put.abort)
                if error is not None:
                    raise error
                return
            t = time.monotonic()
            put, cw = w.put, w.cw
            try:
                if cw is None:
                    await trio.to_thread.run_sync(put.commit)
                else:  # hashes() waits for a write in flight: off the loop
                    await trio.to_thread.run_sync(lambda: put.commit_hashed(cw.hashes()))
            except BaseException:
                await trio.to_thread.run_sync(put.abort)
                raise
            self.counters["commits"] += 1
            log.debug("stored %s/%s (%d bytes) in %.3f s", w.ns, w.key, w.size, time.monotonic() - t)
        finally:
            w.committed = True
            self.pending.pop((w.ns, w.key), None)
            if w.cw is not None:
                await trio.to_thread.run_sync(w.cw.close)

    async def _release_write(self, w: WriteHandle) -> None:
        """The last reference to a descriptor on a new file went away."""
        w.pull()
        w.opens -= 1
        if w.written:
            await self._commit_now(w)
        elif w.opens <= 0 and self.nursery is not None:
            w.closed_empty = True
            self.nursery.start_soon(self._commit_draft_later, w)
        elif w.opens <= 0:
            await self._commit_now(w)

    async def _truncate_pending(self, w: WriteHandle, size: int) -> None:
        """A new file's size set (ftruncate, or O_TRUNC): the rest of the
        object beyond it reads as zeros, or is cut off."""
        if w.put is None:
            raise ft.FUSEError(errno.EBUSY)
        put, cw = w.put, w.cw
        w.pull()

        def cut() -> None:
            put.truncate(size)
            if cw is not None:
                cw.truncate(size)
        try:
            await w.settle()
            await trio.to_thread.run_sync(cut)
        except BaseException:
            w.failed = True
            raise
        w.size = size
