"""The Python half of the C mount (kvfsd._cfuse, native/cfuse.c).

The C workers call ``Bridge(op, args)`` for every request they do not
serve themselves (object reads and new files' writes they do serve), with the GIL held and from their own threads. The
bridge runs the pyfuse3 mount's own handler (kvfsd.fuse_ops.KvfsOps) on
the daemon's trio loop and answers ``(errno, value)``; it never raises
into C. So both mounts keep the same rules, from the same code: names,
the trust model, immutability, drafts, commits, stats, xattrs.

Values are plain tuples, laid out as native/cfuse.c parses them
(``attr_tuple``, ``read_spec``).

What runs outside the loop, in the calling worker thread: building the
read spec of an opened object (it may open segment files), reserving a
chunk of a new file (it may evict) and re-checking an object whose chunk
failed verification (blocking, as the pyfuse3 mount does these in a worker
thread too).
"""
from __future__ import annotations

import errno
import logging
from typing import Any, Awaitable, Callable

import trio

from . import fuse_types as ft
from .fuse_errors import errno_of
from .fuse_ops import KvfsOps, ReadHandle
from .fuse_write import WriteHandle

log = logging.getLogger("kvfsd.fuse")


class Ctx:
    """The caller of a request, as pyfuse3's RequestContext shows it."""
    __slots__ = ("uid", "gid", "pid", "umask")

    def __init__(self, uid: int, gid: int, pid: int, umask: int) -> None:
        self.uid, self.gid, self.pid, self.umask = uid, gid, pid, umask


class SetattrFields:
    """Which attributes a setattr changes (pyfuse3's SetattrFields): only
    the size matters to the handlers; the rest are accepted and ignored."""
    __slots__ = ("update_size",)

    def __init__(self, update_size: bool) -> None:
        self.update_size = update_size


def attr_tuple(a: Any) -> tuple[int | float, ...]:
    return (a.st_ino, a.generation, a.entry_timeout, a.attr_timeout, a.st_mode, a.st_nlink, a.st_uid, a.st_gid,
            a.st_rdev, a.st_size, a.st_blksize, a.st_blocks, a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns)


class Bridge:
    def __init__(self, ops: KvfsOps, direntplus_base: int, write_state: Callable[[int], Any]) -> None:
        self.ops = ops
        ops.c_writes = True
        self.write_state = write_state  # kvfsd._cfuse.WriteState
        self.eng = ops.eng
        self.base = direntplus_base
        self.token: trio.lowlevel.TrioToken | None = None  # set by the mount once the loop runs
        on_loop: dict[str, Callable[..., Awaitable[Any]]] = {
            "lookup": self.lookup, "forget": self.forget, "getattr": self.getattr, "setattr": self.setattr,
            "mkdir": self.mkdir, "unlink": self.unlink, "rmdir": self.rmdir, "rename": self.rename,
            "open": self.open, "create": self.create, "read": self.read, "write": self.write,
            "flush": self.flush, "release": self.release, "opendir": self.opendir,
            "readdirplus": self.readdirplus, "releasedir": self.releasedir, "statfs": self.statfs,
            "getxattr": self.getxattr, "listxattr": self.listxattr, "access": self.access,
        }
        self.on_loop = on_loop

    def __call__(self, op: str, args: tuple[Any, ...]) -> tuple[int, Any]:
        try:
            if op == "reserve":
                return self.reserve(*args)
            if op == "bad":
                self.bad(*args)
                return 0, None
            value = trio.from_thread.run(self.on_loop[op], *args, trio_token=self.token)
            if op == "open":
                value = self._with_read_spec(value)
            return 0, value
        except ft.FUSEError as e:
            return e.errno, None
        except trio.RunFinishedError:
            return errno.ENOTCONN, None  # the daemon is stopping
        except BaseException:  # noqa: BLE001 - nothing may raise into the C workers
            log.exception("internal error in the C mount's %s", op)
            return errno.EIO, None

    # -- object reads: what the C side needs to serve them -----------------
    def _with_read_spec(self, value: tuple[Any, ...]) -> tuple[Any, ...]:
        fh = value[0]
        h = self.ops.handles.get(fh)
        if isinstance(h, WriteHandle):  # a draft reopened for writing: the C side writes it
            return value[:3] + (h.cw,)
        if not isinstance(h, ReadHandle):
            return value
        try:
            return value[:3] + (self.read_spec(h),)
        except BaseException:
            trio.from_thread.run(self.ops.release, fh, trio_token=self.token)  # the lease is not kept
            raise

    def read_spec(self, h: ReadHandle) -> tuple[Any, ...] | None:
        """(size, unit, [(fd, offset, length, checksum)], arena view or
        None): an object's chunks, as the C side reads and verifies them.
        Every chunk but the last has the object's chunk size (the stripe
        unit it was stored with, which need not be today's). The fds stay
        the daemon's (the C side takes dups); the lease of the open keeps
        the segments and the arena bytes where they are."""
        total, exts, t0 = h.item[0], h.item[3], h.item[4]
        if not exts:
            return None  # no chunk to verify: the handlers serve it
        unit = exts[0][3] if len(exts) > 1 else max(total, 1)
        fds = {seg: self.eng.segment_fd(seg) for seg in {e[1] for e in exts}}
        chunks = [(fds[seg], off, length, csum) for _stripe, seg, off, length, csum in exts]
        view = None
        if t0 is not None and self.eng.t0 is not None:
            view = self.eng.t0.arena.view[t0[0]:t0[0] + total]
        return total, unit, chunks, view

    # -- new files: where the C side writes their bytes ----------------------
    def reserve(self, fh: int, i: int) -> tuple[int, Any]:
        """(0, (fd, payload offset)) of chunk ``i`` of a file being written,
        reserved the first time it is asked for, or (errno, None) (blocking:
        it may evict; the calling C worker waits for it)."""
        w = self.ops.handles.get(fh)
        if not isinstance(w, WriteHandle) or w.put is None or w.committed:
            return errno.EBADF, None
        try:
            ch = w.put.reserve(i)
            return 0, (self.eng.segment_fd(ch.seg), ch.payload_off)
        except BaseException as e:  # noqa: BLE001 - answered as the write's errno
            return errno_of(e, "write"), None

    def bad(self, fh: int) -> None:
        """A chunk of this open object failed verification: report it as a
        client would (the daemon re-checks the object and drops it)."""
        h = self.ops.handles.get(fh)
        if isinstance(h, ReadHandle):
            self.eng.verify_object(h.ns, h.key, h.item[2])

    # -- the handlers, on the loop -------------------------------------------
    async def lookup(self, parent: int, name: bytes, ctx: tuple[int, ...]) -> tuple[Any, ...]:
        return attr_tuple(await self.ops.lookup(parent, name, Ctx(*ctx)))

    async def forget(self, pairs: list[tuple[int, int]]) -> None:
        await self.ops.forget(pairs)

    async def getattr(self, ino: int, ctx: tuple[int, ...]) -> tuple[Any, ...]:
        return attr_tuple(await self.ops.getattr(ino, Ctx(*ctx)))

    async def setattr(self, ino: int, size: int | None, fh: int | None, ctx: tuple[int, ...]) -> tuple[Any, ...]:
        attr = ft.EntryAttributes()
        if size is not None:
            attr.st_size = size
        return attr_tuple(await self.ops.setattr(ino, attr, SetattrFields(size is not None), fh, Ctx(*ctx)))

    async def mkdir(self, parent: int, name: bytes, mode: int, ctx: tuple[int, ...]) -> tuple[Any, ...]:
        return attr_tuple(await self.ops.mkdir(parent, name, mode, Ctx(*ctx)))

    async def unlink(self, parent: int, name: bytes, ctx: tuple[int, ...]) -> None:
        await self.ops.unlink(parent, name, Ctx(*ctx))

    async def rmdir(self, parent: int, name: bytes, ctx: tuple[int, ...]) -> None:
        await self.ops.rmdir(parent, name, Ctx(*ctx))

    async def rename(self, parent: int, name: bytes, newparent: int, newname: bytes, flags: int,
                     ctx: tuple[int, ...]) -> None:
        await self.ops.rename(parent, name, newparent, newname, flags, Ctx(*ctx))

    async def open(self, ino: int, flags: int, ctx: tuple[int, ...]) -> tuple[Any, ...]:
        fi = await self.ops.open(ino, flags, Ctx(*ctx))
        return fi.fh, bool(fi.direct_io), bool(fi.keep_cache), None

    async def create(self, parent: int, name: bytes, mode: int, flags: int, ctx: tuple[int, ...]) -> tuple[Any, ...]:
        fi, attr = await self.ops.create(parent, name, mode, flags, Ctx(*ctx))
        w = self.ops.handles[fi.fh]
        assert isinstance(w, WriteHandle)
        w.cw = self.write_state(self.eng.stripe_unit)
        return fi.fh, bool(fi.direct_io), bool(fi.keep_cache), (attr_tuple(attr), w.cw)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return bytes(await self.ops.read(fh, off, size))

    async def write(self, fh: int, off: int, data: bytes) -> int:
        return await self.ops.write(fh, off, data)

    async def flush(self, fh: int) -> None:
        await self.ops.flush(fh)

    async def release(self, fh: int) -> None:
        await self.ops.release(fh)

    async def opendir(self, ino: int, ctx: tuple[int, ...]) -> int:
        return await self.ops.opendir(ino, Ctx(*ctx))

    async def readdirplus(self, fh: int, off: int, size: int) -> list[tuple[bytes, tuple[Any, ...], int]]:
        token = ft.DirReply(size, self.base)
        await self.ops.readdir(fh, off, token)
        return [(name, attr_tuple(a), nxt) for name, a, nxt in token.entries]

    async def releasedir(self, fh: int) -> None:
        await self.ops.releasedir(fh)

    async def statfs(self, ctx: tuple[int, ...]) -> tuple[int, ...]:
        s = await self.ops.statfs(Ctx(*ctx))
        return (s.f_bsize, s.f_frsize, s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree, s.f_favail,
                s.f_namemax)

    async def getxattr(self, ino: int, name: bytes, ctx: tuple[int, ...]) -> bytes:
        return bytes(await self.ops.getxattr(ino, name, Ctx(*ctx)))

    async def listxattr(self, ino: int, ctx: tuple[int, ...]) -> bytes:
        return b"".join(n + b"\0" for n in await self.ops.listxattr(ino, Ctx(*ctx)))

    async def access(self, ino: int, mask: int, ctx: tuple[int, ...]) -> bool:
        return bool(await self.ops.access(ino, mask, Ctx(*ctx)))
