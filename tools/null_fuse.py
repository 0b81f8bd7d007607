"""A pyfuse3 filesystem that accepts writes and discards them, and reads
as zeros: the ceiling any pyfuse3 write (or read) path can reach on this
machine (the cost of the kernel's FUSE round trip and of pyfuse3's
dispatch, with nothing stored or read).
kvfstools.null_fuse_c is the same for libfuse's low-level API in C.

`kvfs bench --fuse` runs them beside the mount, in the same run, so the
write figure of the mount can be read against what FUSE itself allows.

    python -m kvfstools.null_fuse MOUNTPOINT     (runs until unmounted)
"""
from __future__ import annotations

import errno
import stat
import sys
from typing import Any

import pyfuse3
import trio

FILE_INO = pyfuse3.ROOT_INODE + 1
ZEROS = bytes(1 << 20)  # reads are at most 1 MiB (libfuse's cap)


class NullOps(pyfuse3.Operations):
    def __init__(self) -> None:
        super().__init__()
        self.size = 0
        self.exists = False

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.st_mode = (stat.S_IFDIR | 0o755) if inode == pyfuse3.ROOT_INODE else (stat.S_IFREG | 0o644)
        a.st_size = self.size if inode == FILE_INO else 0
        a.st_blksize = 1 << 20  # as the kvfs mount: `cp` then writes 1 MiB at a time
        a.attr_timeout = a.entry_timeout = 1.0
        return a

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if self.exists and name == b"f":
            return await self.getattr(FILE_INO)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: Any) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        self.exists, self.size = True, 0
        return pyfuse3.FileInfo(fh=1), await self.getattr(FILE_INO)

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        return pyfuse3.FileInfo(fh=1, keep_cache=True)  # as the mount's objects

    async def read(self, fh: int, off: int, size: int) -> bytes:
        """Zeros: the ceiling of a read that reaches the daemon."""
        return ZEROS[:max(0, min(size, self.size - off))]

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        self.size = max(self.size, off + len(buf))
        return len(buf)

    async def setattr(self, inode: int, attr: Any, fields: Any, fh: int | None, ctx: Any) -> pyfuse3.EntryAttributes:
        if fields.update_size:
            self.size = attr.st_size
        return await self.getattr(inode)

    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self.exists = False


def main() -> None:
    pyfuse3.init(NullOps(), sys.argv[1], {"fsname=kvfs-null"})
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
