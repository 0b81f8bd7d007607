"""The types the FUSE handlers (kvfsd.fuse_ops, kvfsd.fuse_write) speak,
for both mounts: pyfuse3's own where pyfuse3 is installed (its mount
needs them), plain stand-ins of the same shape where it is not (the C
mount, kvfsd.mount_c, reads them by attribute only).

Imported only when a mount is asked for.
"""
from __future__ import annotations

import errno
from typing import Any

pyfuse3: Any
try:
    import pyfuse3
except ImportError:  # the C mount works without pyfuse3
    pyfuse3 = None

ROOT_INODE = 1
ENOATTR = errno.ENODATA  # what pyfuse3.ENOATTR is on Linux


class DirReply:
    """The C mount's readdir token: collects the entries that fit in the
    kernel's buffer (each entry sent counts as a lookup, so the handler
    must know which did not fit)."""

    def __init__(self, size: int, base: int) -> None:
        self.room = size
        self.base = base  # bytes of an entry with an empty name (kvfsd._cfuse.DIRENTPLUS_BASE)
        self.entries: list[tuple[bytes, Any, int]] = []

    def add(self, name: bytes, attr: Any, next_id: int) -> bool:
        need = (self.base + len(name) + 7) & ~7
        if need > self.room:
            return False
        self.room -= need
        self.entries.append((name, attr, next_id))
        return True


if pyfuse3 is not None:
    FUSEError = pyfuse3.FUSEError
    EntryAttributes = pyfuse3.EntryAttributes
    FileInfo = pyfuse3.FileInfo
    StatvfsData = pyfuse3.StatvfsData
    Operations: Any = pyfuse3.Operations
    assert pyfuse3.ROOT_INODE == ROOT_INODE and pyfuse3.ENOATTR == ENOATTR

    def readdir_reply(token: Any, name: bytes, attr: Any, next_id: int) -> bool:
        if isinstance(token, DirReply):
            return token.add(name, attr, next_id)
        return bool(pyfuse3.readdir_reply(token, name, attr, next_id))
else:
    class FUSEError(Exception):  # type: ignore[no-redef]
        def __init__(self, errno_: int) -> None:
            super().__init__(errno_)
            self.errno = errno_

    class EntryAttributes:  # type: ignore[no-redef]
        def __init__(self) -> None:
            self.st_ino = self.generation = 0
            self.entry_timeout = self.attr_timeout = 0.0
            self.st_mode = self.st_nlink = self.st_uid = self.st_gid = self.st_rdev = 0
            self.st_size = self.st_blksize = self.st_blocks = 0
            self.st_atime_ns = self.st_mtime_ns = self.st_ctime_ns = 0

    class FileInfo:  # type: ignore[no-redef]
        def __init__(self, fh: int = 0, direct_io: bool = False, keep_cache: bool = True,
                     nonseekable: bool = False) -> None:
            self.fh, self.direct_io, self.keep_cache, self.nonseekable = fh, direct_io, keep_cache, nonseekable

    class StatvfsData:  # type: ignore[no-redef]
        def __init__(self) -> None:
            self.f_bsize = self.f_frsize = self.f_blocks = self.f_bfree = self.f_bavail = 0
            self.f_files = self.f_ffree = self.f_favail = self.f_namemax = 0

    class Operations:  # type: ignore[no-redef]
        pass

    def readdir_reply(token: Any, name: bytes, attr: Any, next_id: int) -> bool:
        assert isinstance(token, DirReply)
        return token.add(name, attr, next_id)
