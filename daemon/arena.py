"""The shared-memory arena file (T0): one file in /dev/shm (``--shm-dir``:
any tmpfs) that the daemon creates and maps, and that clients map by path
(the path travels in the hello reply). Mode 0600; the daemon grants the
users it admits with an ACL (kvfsd.fileperms: read for readers, read-write
for writers).

The whole file is allocated at start: tmpfs then holds its pages for the
arena's lifetime, so a /dev/shm that others fill later cannot make a write
to the arena fail with SIGBUS (what a sparse file's first touch of a page
does when tmpfs is full), and a client's first write to a page only maps it
instead of allocating and zeroing it (a third of a first 64 KiB put's time
here; 1 GiB allocates in about 0.1 s).

Huge pages: the mapping asks for them (MADV_HUGEPAGE) and is populated
through itself (MADV_POPULATE_WRITE), so a tmpfs mounted ``huge=advise``
(or ``within_size``, ``always``) backs the arena with 2 MiB pages; clients
ask the same of their mappings. Copies out of 4 KiB-page shared memory pay
a TLB miss per page (costly under a hypervisor's nested paging): measured
here, a 1 MiB memcpy from the arena runs at 0.60-0.74 x one from private
memory on 4 KiB pages and 0.98 x on 2 MiB pages. Where the kernel cannot
populate that way (before Linux 5.14), posix_fallocate allocates the file
as before; where the tmpfs gives no huge pages, nothing changes.

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
MADV_POPULATE_WRITE = 23  # Linux 5.14+


def arena_path(root: Path, shm_dir: Path = SHM_DIR) -> Path:
    tag = hashlib.blake2b(str(root).encode(), digest_size=6).hexdigest()
    return shm_dir / f"kvfs-{os.getuid()}-{tag}.arena"


def ask_huge_pages(mm: mmap.mmap) -> None:
    """Ask for 2 MiB pages for a mapping of the arena (a no-op where the
    tmpfs or the kernel gives none)."""
    try:
        mm.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError):
        pass


def huge_bytes(path: Path | str) -> int:
    """Bytes of this process's mappings of ``path`` that are mapped with huge
    pages (/proc/self/smaps), 0 where unknown."""
    total, inside = 0, False
    want = str(path)
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                if line[0] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:
                    inside = line.rstrip("\n").endswith(want)
                elif inside and (line.startswith("ShmemPmdMapped:") or line.startswith("FilePmdMapped:")):
                    total += int(line.split()[1]) * 1024
    except OSError:
        return 0
    return total


class Arena:
    def __init__(self, root: Path, size: int, mode: int = 0o600, shm_dir: Path = SHM_DIR):
        self.path = arena_path(root, shm_dir)
        self.size = size
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)
        try:
            os.fchmod(fd, mode)  # not narrowed by the umask
            os.ftruncate(fd, size)
            self.mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            ask_huge_pages(self.mm)
            try:
                self._allocate(fd)
            except BaseException:
                self.mm.close()
                os.unlink(self.path)
                raise
        finally:
            os.close(fd)
        self.view = memoryview(self.mm)

    def _allocate(self, fd: int) -> None:
        """Every page allocated now (through the mapping, so the huge-page
        advice applies; else with posix_fallocate)."""
        try:
            self.mm.madvise(MADV_POPULATE_WRITE)
            return
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):  # EFAULT/ENOMEM: the tmpfs is full
                raise InvalidArgument(f"--shm-size {self.size}: {self.path.parent} cannot hold an arena that "
                                      f"large (give it less, or grow that tmpfs)") from None
        try:
            os.posix_fallocate(fd, 0, self.size)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EFBIG):
                raise
            raise InvalidArgument(f"--shm-size {self.size}: {self.path.parent} cannot hold an arena that large "
                                  f"(give it less, or grow that tmpfs)") from None

    def huge_bytes(self) -> int:
        return huge_bytes(self.path)

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
