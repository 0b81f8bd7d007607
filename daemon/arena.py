"""The shared-memory arena file (T0): one file in /dev/shm that the daemon
creates and maps, and that clients map by path (the path travels in the
hello reply). Mode 0600; the daemon grants the users it admits with an ACL
(kvfsd.fileperms: read for readers, read-write for writers).

The whole file is allocated at start (posix_fallocate): tmpfs then holds
its pages for the arena's lifetime, so a /dev/shm that others fill later
cannot make a write to the arena fail with SIGBUS (what a sparse file's
first touch of a page does when tmpfs is full), and a client's first write
to a page only maps it instead of allocating and zeroing it (a third of a
first 64 KiB put's time here; 1 GiB allocates in about 0.1 s).

A restarted daemon never trusts an old arena: it unlinks any file left at
its name and makes a new one (clients that still map the old file keep a
valid mapping of an orphaned file until they reconnect and re-map).
"""
from __future__ import annotations

import errno
import hashlib
import mmap
import os
from pathlib import Path

from kvfs.errors import InvalidArgument

SHM_DIR = Path("/dev/shm")


def arena_path(root: Path) -> Path:
    tag = hashlib.blake2b(str(root).encode(), digest_size=6).hexdigest()
    return SHM_DIR / f"kvfs-{os.getuid()}-{tag}.arena"


class Arena:
    def __init__(self, root: Path, size: int, mode: int = 0o600):
        self.path = arena_path(root)
        self.size = size
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)
        try:
            os.fchmod(fd, mode)  # not narrowed by the umask
            os.ftruncate(fd, size)
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EFBIG):
                    raise
                os.unlink(self.path)
                raise InvalidArgument(f"--shm-size {size}: /dev/shm cannot hold an arena that large "
                                      f"(give it less, or grow /dev/shm)") from None
            self.mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.view = memoryview(self.mm)

    def close(self) -> None:
        try:
            self.view.release()
            self.mm.close()
        except BufferError:
            pass  # a write-back still holds a slice: the process is exiting anyway
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
