"""The FUSE namespace: the handlers of both mounts, run on the daemon's trio
loop (pyfuse3's mount calls them there; the C mount, kvfsd.mount_c, serves
object reads itself and hands every other request to them).

    /                      namespaces, and .kvfs
    /<namespace>/          one directory per namespace
    /<namespace>/<key>     one read-only regular file per object
    /.kvfs/stats           the daemon's stats as JSON (same as `kvfs stats --json`)

Rules kept here:
- Handlers only ever raise FUSEError: ``fuse_errors`` maps everything else
  (kvfs errors, OSError, bugs) to an errno, and logs what is not expected.
- Handlers never block the loop on disk or LMDB: every such call goes
  through ``trio.to_thread``; what runs on the loop touches memory only.
- Reads are served chunk by chunk, each chunk verified against its checksum
  before any byte of it is returned: a corrupted object reads as EIO, never
  as wrong bytes. An open file holds a lease, so its bytes stay put.
- Objects are immutable: an existing object cannot be opened for writing
  (EROFS). New files are written by the FileWrites half (kvfsd.fuse_write).
- Objects are immutable and content-addressed, so their attributes and
  entries are cached by the kernel for long, and opens keep the page cache
  (except on a shared mount: kvfsd.fuse_access).
- Every request that names a path is checked against the trust model
  (kvfsd.fuse_access) before anything else; reads and writes were checked
  at their open.

pyfuse3 is imported only by the fuse_* modules (through kvfsd.fuse_types,
which stands in for it where it is absent), which are imported only when a
mount is asked for.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import stat
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Sequence

import trio

from kvfs import format as fmt
from kvfs import native
from kvfs.errors import InvalidKey
from kvfs.keys import normalize_key, normalize_ns

from . import fuse_types as ft
from .access import Policy, Right
from .engine import Engine
from .fuse_access import MountAccess
from .fuse_errors import entry_name, fuse_errors
from .fuse_write import FileWrites, WriteHandle

log = logging.getLogger("kvfsd.fuse")

ROOT = ft.ROOT_INODE
KVFS_DIR = ROOT + 1
STATS = ROOT + 2
FIRST_DYNAMIC = 16
OBJECT_TIMEOUT = 60.0  # immutable: attributes never change while the object exists
DIR_TIMEOUT = 1.0  # directory contents change
CHUNK_CACHE = 6  # verified chunks kept per open file
READ_AHEAD_CHUNKS = 2  # chunks loaded ahead of a sequential reader (two disk reads in flight)
ADVISE_CHUNKS = 4  # chunks beyond those the kernel is asked to read (posix_fadvise WILLNEED)

@dataclass
class ReadHandle:
    ns: str
    key: str
    item: tuple[Any, ...]  # lookup's wire form: (size, checksum, seq, extents, t0)
    lease: int
    chunks: dict[int, bytes] = field(default_factory=dict)  # verified chunk index -> bytes
    loading: dict[int, trio.Event] = field(default_factory=dict)  # chunk loads in flight
    bad: bool = False  # a chunk failed verification
    advised: set[int] = field(default_factory=set)  # chunks the kernel was asked to read ahead


@dataclass
class StatsHandle:
    data: bytes


@dataclass
class DirHandle:
    entries: list[tuple[str, int]]  # a snapshot taken at opendir: (name, inode)


class KvfsOps(FileWrites, ft.Operations):
    def __init__(self, engine: Engine, settle: Callable[[], Awaitable[bool]], policy: Policy):
        super().__init__()
        self.eng = engine
        self.settle = settle  # waits until T0 puts are in the index (listings read it)
        self.acc = MountAccess(policy)
        self.file_mode, self.dir_mode = self.acc.file_mode, self.acc.dir_mode
        self.uid, self.gid = self.acc.uid, self.acc.gid
        self.started_ns = int(time.time() * 1e9)
        # inode numbers are never reused while the daemon runs
        self.ino_of: dict[tuple[str, ...], int] = {}
        self.what: dict[int, tuple[str, ...]] = {}
        self.next_ino = FIRST_DYNAMIC
        # the kernel's lookup count per dynamic inode: an inode is forgotten
        # (and its numbers dropped) only when the kernel says so
        self.nlookup: dict[int, int] = {}
        self.handles: dict[int, ReadHandle | WriteHandle | StatsHandle | DirHandle] = {}
        self.next_fh = 1
        self.pending: dict[tuple[str, str], WriteHandle] = {}  # new files not yet committed
        self.nursery: trio.Nursery | None = None  # for read-ahead loads (set by the mount)
        self.c_writes = False  # set by the C mount: it writes new files' bytes itself
        self.mount_stats: Callable[[], dict[str, Any]] | None = None  # the mount's own view (set by it)
        self.counters = {"reads": 0, "read_bytes": 0, "writes": 0, "write_bytes": 0, "chunks_loaded": 0,
                         "commits": 0}

    # -- inodes --------------------------------------------------------------
    def _ino(self, *what: str) -> int:
        ino = self.ino_of.get(what)
        if ino is None:
            ino = self.next_ino
            self.next_ino += 1
            self.ino_of[what] = ino
            self.what[ino] = what
        return ino

    def _entry(self, attr: ft.EntryAttributes) -> ft.EntryAttributes:
        """An attribute reply that the kernel counts as one more lookup."""
        ino = attr.st_ino
        if ino >= FIRST_DYNAMIC:
            self.nlookup[ino] = self.nlookup.get(ino, 0) + 1
        return attr

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, n in inode_list:
            left = self.nlookup.get(ino, 0) - n
            if left > 0:
                self.nlookup[ino] = left
                continue
            self.nlookup.pop(ino, None)
            what = self.what.get(ino)
            if what is not None and not (what[0] == "obj" and (what[1], what[2]) in self.pending):
                del self.what[ino]
                if self.ino_of.get(what) == ino:
                    del self.ino_of[what]

    def _kind(self, ino: int) -> tuple[str, ...]:
        if ino == ROOT:
            return ("root",)
        if ino == KVFS_DIR:
            return ("kvfsdir",)
        if ino == STATS:
            return ("stats",)
        w = self.what.get(ino)
        if w is None:
            raise ft.FUSEError(errno.ENOENT)
        return w

    def _attr(self, ino: int, mode: int, size: int, mtime_ns: int, timeout: float) -> ft.EntryAttributes:
        a = ft.EntryAttributes()
        a.st_ino = ino
        a.generation = 0
        a.entry_timeout = a.attr_timeout = self.acc.timeout(timeout)
        a.st_mode = mode
        a.st_nlink = 2 if stat.S_ISDIR(mode) else 1
        a.st_uid = self.uid
        a.st_gid = self.gid
        a.st_rdev = 0
        a.st_size = size
        a.st_blksize = 1 << 20
        a.st_blocks = -(-size // 512)
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = mtime_ns
        return a

    def _dir_attr(self, ino: int) -> ft.EntryAttributes:
        return self._attr(ino, stat.S_IFDIR | self.dir_mode, 0, self.started_ns, DIR_TIMEOUT)

    def _stats_json(self) -> bytes:
        st = self.eng.stats()
        st["fuse"] = dict(self.mount_stats() if self.mount_stats else self.counters, inodes=len(self.what))
        return (json.dumps(st, indent=2, sort_keys=True) + "\n").encode()

    def _namespaces_now(self) -> set[str]:
        return set(self.eng.ns_objects)

    async def _namespace_exists(self, ns: str) -> bool:
        if ns in self.eng.ns_objects:
            return True
        return ns in await trio.to_thread.run_sync(self.eng.namespaces)

    async def _attr_of(self, ino: int) -> ft.EntryAttributes:
        kind = self._kind(ino)
        if kind[0] in ("root", "kvfsdir", "ns"):
            return self._dir_attr(ino)
        if kind[0] == "stats":
            return self._attr(ino, stat.S_IFREG | self.file_mode, len(self._stats_json()), time.time_ns(), 0)
        _, ns, key = kind
        w = self.pending.get((ns, key))
        if w is not None and not w.committed:
            w.pull()
            return self._attr(ino, stat.S_IFREG | self.file_mode | 0o200, w.size, time.time_ns(), 0)
        m = self.eng.object_entry(ns, key)
        if m is None:
            raise ft.FUSEError(errno.ENOENT)
        return self._attr(ino, stat.S_IFREG | self.file_mode, m.size, int(m.created * 1e9), OBJECT_TIMEOUT)

    # -- lookup and attributes ----------------------------------------------
    @fuse_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> ft.EntryAttributes:
        self.acc.require(ctx, Right.READ)
        n = entry_name(name)
        kind = self._kind(parent_inode)
        if n == ".":
            return self._entry(await self._attr_of(parent_inode))
        if n == "..":
            return self._entry(await self._attr_of(ROOT))
        if kind[0] == "root":
            if n == ".kvfs":
                return self._entry(self._dir_attr(KVFS_DIR))
            try:
                ns = normalize_ns(n)
            except InvalidKey:
                raise ft.FUSEError(errno.ENOENT) from None
            if not await self._namespace_exists(ns):
                raise ft.FUSEError(errno.ENOENT)
            return self._entry(self._dir_attr(self._ino("ns", ns)))
        if kind[0] == "kvfsdir":
            if n == "stats":
                return self._entry(await self._attr_of(STATS))
            raise ft.FUSEError(errno.ENOENT)
        if kind[0] != "ns":
            raise ft.FUSEError(errno.ENOTDIR)
        try:
            key = normalize_key(n)
        except InvalidKey:
            raise ft.FUSEError(errno.ENOENT) from None
        ns = kind[1]
        if self.eng.object_entry(ns, key) is None and (ns, key) not in self.pending:
            raise ft.FUSEError(errno.ENOENT)
        return self._entry(await self._attr_of(self._ino("obj", ns, key)))

    @fuse_errors
    async def getattr(self, inode: int, ctx: Any = None) -> ft.EntryAttributes:
        self.acc.require(ctx, Right.READ)
        return await self._attr_of(inode)

    @fuse_errors
    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        kind = self._kind(inode)[0]
        return self.acc.access(ctx, kind in ("root", "kvfsdir", "ns"), kind in ("root", "ns"), mode)

    @fuse_errors
    async def setattr(self, inode: int, attr: Any, fields: Any, fh: int | None, ctx: Any) -> ft.EntryAttributes:
        self.acc.require(ctx, Right.WRITE if fields.update_size else Right.READ)
        kind = self._kind(inode)
        if kind[0] == "obj":
            w = self.pending.get((kind[1], kind[2]))
            if w is not None and not w.committed:
                if fields.update_size:
                    await self._truncate_pending(w, attr.st_size)
                return await self._attr_of(inode)
            if fields.update_size:
                raise ft.FUSEError(errno.EROFS)  # objects are immutable
        # mode and times of immutable objects and directories: accepted, ignored
        return await self._attr_of(inode)

    # -- directories ---------------------------------------------------------
    @fuse_errors
    async def opendir(self, inode: int, ctx: Any) -> int:
        self.acc.require(ctx, Right.READ)
        kind = self._kind(inode)
        if kind[0] == "root":
            names = sorted(self._namespaces_now() | set(await trio.to_thread.run_sync(self.eng.namespaces)))
            entries = [(".kvfs", KVFS_DIR)] + [(ns, self._ino("ns", ns)) for ns in names]
        elif kind[0] == "kvfsdir":
            entries = [("stats", STATS)]
        elif kind[0] == "ns":
            await self.settle()
            ns = kind[1]
            keys: list[str] = []
            after: str | None = None
            while True:
                page, more = await trio.to_thread.run_sync(self.eng.keys, ns, after, 10000)
                keys += page
                if not more or not page:
                    break
                after = page[-1]
            entries = [(k, self._ino("obj", ns, k)) for k in keys]
        else:
            raise ft.FUSEError(errno.ENOTDIR)
        return self._new_fh(DirHandle(entries))

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        h = self.handles.get(fh)
        if not isinstance(h, DirHandle):
            raise ft.FUSEError(errno.EBADF)
        for i in range(start_id, len(h.entries)):
            name, ino = h.entries[i]
            try:
                attr = await self._attr_of(ino)
            except ft.FUSEError:
                continue  # removed since the snapshot
            if not ft.readdir_reply(token, name.encode(), attr, i + 1):
                return
            self._entry(attr)  # readdirplus: each entry sent counts as a lookup

    @fuse_errors
    async def releasedir(self, fh: int) -> None:
        self.handles.pop(fh, None)

    @fuse_errors
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> ft.EntryAttributes:
        self.acc.require(ctx, Right.WRITE)
        if parent_inode != ROOT:
            raise ft.FUSEError(errno.EPERM)  # namespaces are one level deep
        n = entry_name(name)
        if n == ".kvfs":
            raise ft.FUSEError(errno.EEXIST)
        ns = normalize_ns(n)
        if await self._namespace_exists(ns):
            raise ft.FUSEError(errno.EEXIST)
        await trio.to_thread.run_sync(self.eng.create_namespace, ns)
        return self._entry(self._dir_attr(self._ino("ns", ns)))

    @fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self.acc.require(ctx, Right.ADMIN)
        if parent_inode != ROOT:
            raise ft.FUSEError(errno.ENOTDIR)
        n = entry_name(name)
        if n == ".kvfs":
            raise ft.FUSEError(errno.EPERM)
        ns = normalize_ns(n)
        if not await self._namespace_exists(ns):
            raise ft.FUSEError(errno.ENOENT)
        await self.settle()
        if not await trio.to_thread.run_sync(self.eng.remove_namespace, ns):
            raise ft.FUSEError(errno.ENOTEMPTY)

    @fuse_errors
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
                     flags: int, ctx: Any) -> None:
        # An object's key is its content address: renaming one would give
        # bytes a name that does not describe them. EXDEV makes `mv` copy
        # (a new object under the new key) and delete, which is exactly right.
        raise ft.FUSEError(errno.EXDEV)

    # -- reading -------------------------------------------------------------
    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: Any) -> ft.FileInfo:
        self.acc.require(ctx, Right.READ)
        kind = self._kind(inode)
        if kind[0] == "stats":
            if flags & (os.O_WRONLY | os.O_RDWR):
                raise ft.FUSEError(errno.EROFS)
            fh = self._new_fh(StatsHandle(self._stats_json()))
            return ft.FileInfo(fh=fh, direct_io=True, keep_cache=False)
        if kind[0] != "obj":
            raise ft.FUSEError(errno.EISDIR)
        _, ns, key = kind
        w = self.pending.get((ns, key))
        if w is not None and not w.committed:
            if not w.closed_empty:
                raise ft.FUSEError(errno.EBUSY)  # being written by another open
            if flags & (os.O_WRONLY | os.O_RDWR):
                return await self._reopen_draft(w, flags)
            # `cp empty DIR/ns/k; cat DIR/ns/k`: reading a draft stores it as
            # it is, now (later writes get EROFS)
            await self._commit_now(w)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise ft.FUSEError(errno.EROFS)  # objects are immutable
        fh = self.next_fh
        self.next_fh += 1
        lid, items = self.eng.lookup(ns, [key], ("fuse", fh))  # memory only
        if items[0] is None:
            raise ft.FUSEError(errno.ENOENT)
        self.handles[fh] = ReadHandle(ns, key, items[0], lid)
        return ft.FileInfo(fh=fh, keep_cache=True)

    def _new_fh(self, h: ReadHandle | WriteHandle | StatsHandle | DirHandle) -> int:
        fh = self.next_fh
        self.next_fh += 1
        self.handles[fh] = h
        return fh

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:  # type: ignore[override]
        """Bytes of an open file. pyfuse3's stub says bytes, but it replies
        from any contiguous buffer (PyObject_GetBuffer), so a view of a
        verified chunk goes out without a copy."""
        h = self.handles.get(fh)
        if isinstance(h, StatsHandle):
            return h.data[off:off + size]
        if not isinstance(h, ReadHandle):
            raise ft.FUSEError(errno.EBADF)
        total, exts = h.item[0], h.item[3]
        end = min(total, off + size)
        self.counters["reads"] += 1
        self.counters["read_bytes"] += max(0, end - off)
        # every chunk but the last has the object's chunk size (the stripe
        # unit it was stored with, which need not be today's)
        unit = exts[0][3] if len(exts) > 1 else max(total, 1)
        out: list[memoryview] = []
        ci = off // unit
        while ci < len(exts) and ci * unit < end:
            pos = ci * unit
            data = await self._chunk(h, ci, pos)
            # a view, not a copy: pyfuse3 replies from any buffer
            out.append(memoryview(data)[off - pos if off > pos else 0:min(exts[ci][3], end - pos)])
            ci += 1
        if len(out) == 1:
            return out[0]
        return b"".join(out)

    async def _chunk(self, h: ReadHandle, ci: int, pos: int) -> bytes:
        """Chunk ``ci`` of an open file, verified; starts loading the next one
        (sequential readers then find it ready: read-ahead at chunk size)."""
        while True:
            data = h.chunks.get(ci)
            if data is not None:
                break
            ev = h.loading.get(ci)
            if ev is None:
                ev = h.loading[ci] = trio.Event()
                await self._load(h, ci, pos, ev)
            else:
                await ev.wait()
            if h.bad:
                # report it like a client would: the daemon re-checks and drops it
                await trio.to_thread.run_sync(self.eng.verify_object, h.ns, h.key, h.item[2])
                raise ft.FUSEError(errno.EIO)
        exts = h.item[3]
        npos = pos + exts[ci][3]
        for nxt in range(ci + 1, min(len(exts), ci + 1 + READ_AHEAD_CHUNKS)):
            if nxt not in h.chunks and nxt not in h.loading and self.nursery is not None:
                # registered before the task starts, so a reader of it waits instead of loading it twice
                h.loading[nxt] = trio.Event()
                self.nursery.start_soon(self._load, h, nxt, npos, h.loading[nxt])
            npos += exts[nxt][3]
        return data

    async def _load(self, h: ReadHandle, ci: int, pos: int, ev: trio.Event) -> None:
        """Load and verify one chunk; never raises (it also runs as a
        background read-ahead task, which must not take the mount down)."""
        try:
            data = await trio.to_thread.run_sync(self._read_chunk, h, ci, pos)
            self.counters["chunks_loaded"] += 1
            if data is None:
                h.bad = True
                return
            while len(h.chunks) >= CHUNK_CACHE:
                h.chunks.pop(next(iter(h.chunks)))
            h.chunks[ci] = data
        except Exception:  # noqa: BLE001
            log.exception("loading chunk %d of %s/%s", ci, h.ns, h.key)
            h.bad = True
        finally:
            if h.loading.get(ci) is ev:
                del h.loading[ci]
            ev.set()

    def _advise_ahead(self, h: ReadHandle, ci: int) -> None:
        """Ask the kernel to start reading the chunks beyond the loaded
        read-ahead (blocking, briefly). A cold sequential reader then keeps
        the disk busy without more threads; the chunks still go through
        pread and verification when their turn comes."""
        exts = h.item[3]
        i = ci + 1 + READ_AHEAD_CHUNKS
        if i < len(exts) and i not in h.advised:
            for j in range(i, min(len(exts), i + ADVISE_CHUNKS)):
                if j not in h.advised:
                    h.advised.add(j)
                    _stripe, seg, off, length, _csum = exts[j]
                    fd = self.eng.segment_fd(seg)
                    if fd >= 0:
                        os.posix_fadvise(fd, off, length, os.POSIX_FADV_WILLNEED)

    def _read_chunk(self, h: ReadHandle, ci: int, pos: int) -> bytes | None:
        """One chunk, verified (blocking: a worker thread). None: bad."""
        stripe, seg, off, length, csum = h.item[3][ci]
        t0 = h.item[4]
        t0tier = self.eng.t0
        if t0 is not None and t0tier is not None:
            data = bytes(t0tier.arena.view[t0[0] + pos:t0[0] + pos + length])
        else:
            fd = self.eng.segment_fd(seg)
            if fd < 0:
                return None
            self._advise_ahead(h, ci)
            data = os.pread(fd, length, off)
        if len(data) != length or native.backend.hash_many([data], 1)[0] != csum:
            return None
        return data

    # -- writing -------------------------------------------------------------
    @fuse_errors
    async def release(self, fh: int) -> None:
        h = self.handles.pop(fh, None)
        if isinstance(h, ReadHandle):
            freed = self.eng.release([h.lease], ("fuse", fh)) if h.lease else []
            if freed:
                await trio.to_thread.run_sync(self.eng.reclaim, freed)
        elif isinstance(h, WriteHandle) and not h.committed:
            await self._release_write(h)

    @fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self.acc.require(ctx, Right.ADMIN)
        kind = self._kind(parent_inode)
        if kind[0] != "ns":
            raise ft.FUSEError(errno.EPERM)
        key = normalize_key(entry_name(name))
        await self.settle()
        if not await trio.to_thread.run_sync(self.eng.delete, kind[1], [key]):
            raise ft.FUSEError(errno.ENOENT)

    # -- extended attributes, statfs -------------------------------------------
    XATTRS = (b"user.kvfs.checksum", b"user.kvfs.tier", b"user.kvfs.meta")

    @fuse_errors
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        self.acc.require(ctx, Right.READ)
        return list(self.XATTRS) if self._kind(inode)[0] == "obj" else []

    @fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        self.acc.require(ctx, Right.READ)
        kind = self._kind(inode)
        if kind[0] != "obj" or name not in self.XATTRS:
            raise ft.FUSEError(ft.ENOATTR)
        _, ns, key = kind
        m = self.eng.object_entry(ns, key)
        if m is None:
            raise ft.FUSEError(errno.ENOENT)
        if name == b"user.kvfs.checksum":
            return m.checksum.hex().encode()
        if name == b"user.kvfs.tier":
            return b"T0" if m.dirty else (b"T0+T1" if m.t0 >= 0 else b"T1")
        if m.dirty:
            return m.meta or b""
        info = await trio.to_thread.run_sync(self.eng.stat, ns, key)
        return (info["meta"] or "").encode()

    @fuse_errors
    async def statfs(self, ctx: Any) -> ft.StatvfsData:
        self.acc.require(ctx, Right.READ)
        s = ft.StatvfsData()
        bs = fmt.PAGE
        s.f_bsize = s.f_frsize = bs
        s.f_blocks = self.eng.capacity // bs
        s.f_bfree = s.f_bavail = max(0, self.eng.capacity - self.eng.disk_usage()) // bs
        s.f_files = len(self.eng.lru) + 1
        s.f_ffree = s.f_favail = 1 << 30
        s.f_namemax = 255
        return s
