"""The removal generation: a counter in a small shared file that clients map.
(The daemon owns ``Generation``; clients use ``GenerationReader``.)

Invariant: the counter is incremented after every commit that unpublishes
objects (delete, eviction, dropping a corrupt object), before any segment is
unlinked. A client may cache object locations (objects are immutable and
segment ids are never reused, so a location never names other bytes) and
use them without asking the daemon for as long as the counter it read when
it filled its cache has not moved: so a removal committed before a read
starts is always seen by that read.

The file is reused across restarts (same inode, so existing mappings stay
live) and each start moves the counter to a new epoch, so a value can never
come back.
"""
from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

FILE_SIZE = 4096
FILE_NAME = "generation"  # under the store root
_U64 = struct.Struct("<Q")
EPOCH = 1 << 32


class Generation:
    def __init__(self, root: Path):
        self.path = root / FILE_NAME
        # the owner's alone; the daemon grants readers with ACLs (kvfsd.fileperms)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < FILE_SIZE:
                os.ftruncate(fd, FILE_SIZE)
            self._mm = mmap.mmap(fd, FILE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        start = (_U64.unpack_from(self._mm, 0)[0] // EPOCH + 1) * EPOCH
        self._set(start)

    def _set(self, value: int) -> None:
        # Even a torn read is harmless: readers only compare for equality with
        # the value they saw before, and any mix differs from that unless it
        # is the old value, which is what a read just before the store sees.
        self._mm[0:8] = _U64.pack(value)

    @property
    def value(self) -> int:
        return _U64.unpack_from(self._mm, 0)[0]

    def bump(self) -> None:
        self._set(self.value + 1)

    def close(self) -> None:
        self._mm.close()


class GenerationReader:
    """The client's read-only view of the counter."""

    def __init__(self, path: str):
        fd = os.open(path, os.O_RDONLY)
        try:
            self._mm = mmap.mmap(fd, FILE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)

    @property
    def value(self) -> int:
        return _U64.unpack_from(self._mm, 0)[0]

    @property
    def buffer(self) -> mmap.mmap:
        """The mapping itself (the counter is its first 8 bytes, little-endian),
        for native code that reads it after a copy."""
        return self._mm

    def close(self) -> None:
        self._mm.close()
