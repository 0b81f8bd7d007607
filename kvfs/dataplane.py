"""The client data plane: reading chunks from segment files into caller
buffers and verifying them, and writing payloads into extents the daemon
reserved (alloc/commit puts). Pure Python on ``os.preadv`` (which releases the
GIL), run on a thread pool for batches. Kept apart from the control plane so
a native implementation can take its place behind the same functions.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import xxhash


@dataclass
class ReadTask:
    path: str
    offset: int
    dest: memoryview  # exactly the chunk's length
    checksum: bytes | None  # None: do not verify


@dataclass
class WriteTask:
    path: str
    offset: int
    src: memoryview


def write_full(fd: int, src: memoryview, offset: int) -> None:
    pos = 0
    while pos < len(src):
        n = os.pwritev(fd, [src[pos:]], offset + pos)
        if n <= 0:
            raise OSError(28, "short write (disk full?)")
        pos += n


def read_full(fd: int, dest: memoryview, offset: int) -> bool:
    """Fill ``dest`` from ``fd`` at ``offset``; False on a short file."""
    pos = 0
    n = len(dest)
    while pos < n:
        got = os.preadv(fd, [dest[pos:]], offset + pos)
        if got <= 0:
            return False
        pos += got
    return True


class FdCache:
    """Read-only fds of segment files, shared by threads, bounded.

    Segment ids are never reused and records are immutable, so a cached fd
    always reads the bytes the index described (or a short file, after a
    truncating recovery). An fd is closed only when no reader holds it, so a
    thread can never read through an fd number that was reused for another
    file.
    """

    def __init__(self, limit: int = 512, flags: int = os.O_RDONLY):
        self.limit = limit
        self.flags = flags
        self._lock = threading.Lock()
        self._fds: OrderedDict[str, list[int]] = OrderedDict()  # path -> [fd, refs]

    def acquire(self, path: str) -> int:
        with self._lock:
            ent = self._fds.get(path)
            if ent is not None:
                ent[1] += 1
                self._fds.move_to_end(path)
                return ent[0]
        fd = os.open(path, self.flags | os.O_CLOEXEC)
        with self._lock:
            ent = self._fds.get(path)
            if ent is not None:  # another thread opened it meanwhile
                os.close(fd)
                ent[1] += 1
                return ent[0]
            self._fds[path] = [fd, 1]
            self._trim()
            return fd

    def release(self, path: str) -> None:
        with self._lock:
            ent = self._fds.get(path)
            if ent is not None:
                ent[1] -= 1
            self._trim()

    def _trim(self) -> None:
        if len(self._fds) <= self.limit:
            return
        for p in list(self._fds):
            if len(self._fds) <= self.limit:
                break
            fd, refs = self._fds[p]
            if refs <= 0:
                del self._fds[p]
                os.close(fd)

    def drop_idle(self) -> None:
        """Close every fd no reader holds now (their files may be unlinked)."""
        with self._lock:
            for p in [p for p, (_fd, refs) in self._fds.items() if refs <= 0]:
                os.close(self._fds.pop(p)[0])

    def close(self) -> None:
        with self._lock:
            for fd, _r in self._fds.values():
                os.close(fd)
            self._fds.clear()


def run_task(fds: FdCache, t: ReadTask) -> bool:
    """Read one chunk and verify it. False: missing, short or mismatched."""
    try:
        fd = fds.acquire(t.path)
    except FileNotFoundError:
        return False
    try:
        if not read_full(fd, t.dest, t.offset):
            return False
    finally:
        fds.release(t.path)
    return t.checksum is None or xxhash.xxh3_128_digest(t.dest) == t.checksum


def write_task(fds: FdCache, t: WriteTask) -> bytes:
    """Write one chunk; return its checksum (hashed while the bytes are hot)."""
    fd = fds.acquire(t.path)
    try:
        write_full(fd, t.src, t.offset)
    finally:
        fds.release(t.path)
    return xxhash.xxh3_128_digest(t.src)


class DataPlane:
    """Runs read/write tasks inline (small batches) or on a thread pool."""

    def __init__(self, threads: int = 8, inline_below: int = 1 << 20):
        self.threads = max(1, threads)
        self.inline_below = inline_below
        self.fds = FdCache()
        self.wfds = FdCache(limit=64, flags=os.O_WRONLY)
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def _get_pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="kvfs-read")
        return self._pool

    def _map(self, fn: Callable[[Any], Any], tasks: Sequence[Any], total: int) -> list[Any]:
        if len(tasks) <= 1 or total < self.inline_below or self.threads == 1:
            return [fn(t) for t in tasks]
        return list(self._get_pool().map(fn, tasks))

    def run(self, tasks: Sequence[ReadTask]) -> list[bool]:
        return self._map(lambda t: run_task(self.fds, t), tasks, sum(len(t.dest) for t in tasks))

    def write(self, tasks: Sequence[WriteTask]) -> list[bytes]:
        return self._map(lambda t: write_task(self.wfds, t), tasks, sum(len(t.src) for t in tasks))

    def hash_many(self, views: Sequence[memoryview]) -> list[bytes]:
        return self._map(xxhash.xxh3_128_digest, views, sum(len(v) for v in views))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self.fds.close()
        self.wfds.close()
