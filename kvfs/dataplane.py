"""The client data plane: reading chunks from segment files into caller
buffers and verifying them, and writing payloads into extents the daemon
reserved (alloc/commit puts), and copying out of the shared-memory arena.
The loops themselves live in kvfs.native's backend (C, or pure Python).
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

from . import native


@dataclass
class ReadTask:
    path: str
    offset: int
    dest: memoryview  # exactly the chunk's length
    checksum: bytes | None  # None: do not verify
    fid: int | None = None  # the file's key in FdCache.by_id (kvfs.directory.fd_id), where known


@dataclass
class WriteTask:
    path: str
    offset: int
    src: memoryview


class FdCache:
    """Read-only fds of segment files, shared by threads, bounded.

    Segment ids are never reused and records are immutable, so a cached fd
    always reads the bytes the index described (or a short file, after a
    truncating recovery). An fd is closed only when no reader holds it, so a
    thread can never read through an fd number that was reused for another
    file.

    ``by_id`` maps the files opened with a known id (kvfs.directory.fd_id)
    to their fds, for the native reads of kvfs.directory's ``dir_read``,
    which dup an fd while they hold the GIL: an fd leaves the map before it
    is closed, so what they dup is always the file the id names.
    """

    def __init__(self, limit: int = 512, flags: int = os.O_RDONLY):
        self.limit = limit
        self.flags = flags
        self._lock = threading.Lock()
        self._fds: OrderedDict[str, list[int]] = OrderedDict()  # path -> [fd, refs]
        self.by_id: dict[int, int] = {}
        self._ids: dict[str, int] = {}  # path -> its id in by_id

    def acquire(self, path: str, fid: int | None = None) -> int:
        with self._lock:
            ent = self._fds.get(path)
            if ent is not None:
                ent[1] += 1
                self._fds.move_to_end(path)
                if fid is not None and path not in self._ids:
                    self._ids[path], self.by_id[fid] = fid, ent[0]
                return ent[0]
        fd = os.open(path, self.flags | os.O_CLOEXEC)
        with self._lock:
            ent = self._fds.get(path)
            if ent is not None:  # another thread opened it meanwhile
                os.close(fd)
                ent[1] += 1
                return ent[0]
            self._fds[path] = [fd, 1]
            if fid is not None:
                self._ids[path], self.by_id[fid] = fid, fd
            self._trim()
            return fd

    def _close(self, path: str) -> None:
        """Close a path's fd (lock held): out of by_id first."""
        fid = self._ids.pop(path, None)
        if fid is not None:
            self.by_id.pop(fid, None)
        try:
            os.close(self._fds.pop(path)[0])
        except OSError:
            pass  # released all the same (Linux frees the fd first); e.g. a dead FUSE mount's flush

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
            if self._fds[p][1] <= 0:
                self._close(p)

    def drop_idle(self) -> None:
        """Close every fd no reader holds now (their files may be unlinked)."""
        with self._lock:
            for p in [p for p, (_fd, refs) in self._fds.items() if refs <= 0]:
                self._close(p)

    def close(self) -> None:
        with self._lock:
            for p in list(self._fds):
                self._close(p)


class DataPlane:
    """Runs batches of read/write/copy tasks through the selected backend
    (kvfs.native: the C extension or its pure-Python twin), which releases
    the GIL and spreads a batch over ``threads`` threads."""

    def __init__(self, threads: int = 8):
        self.threads = max(1, threads)
        self.fds = FdCache()
        self.wfds = FdCache(limit=64, flags=os.O_WRONLY)

    def run(self, tasks: Sequence[ReadTask]) -> list[bool]:
        """Read and verify each task. False: missing, short or mismatched."""
        ok = [False] * len(tasks)
        held: list[str] = []
        idx: list[int] = []
        fds: list[int] = []
        try:
            for i, t in enumerate(tasks):
                try:
                    fds.append(self.fds.acquire(t.path, t.fid))
                except FileNotFoundError:
                    continue
                held.append(t.path)
                idx.append(i)
            if idx:
                st = native.backend.read_many(fds, [tasks[i].offset for i in idx], [tasks[i].dest for i in idx],
                                              [tasks[i].checksum for i in idx], self.threads)
                for i, s in zip(idx, st):
                    ok[i] = s == 0
        finally:
            for p in held:
                self.fds.release(p)
        return ok

    def copy(self, dests: Sequence[memoryview], srcs: Sequence[memoryview],
             sums: Sequence[bytes | None]) -> list[bool]:
        """Copy (from the shared-memory arena) and verify the copies."""
        return [s == 0 for s in native.backend.copy_many(dests, srcs, sums, self.threads)]

    def write(self, tasks: Sequence[WriteTask]) -> list[bytes]:
        """Write each task fully; returns their checksums."""
        held: list[str] = []
        try:
            fds = []
            for t in tasks:
                fds.append(self.wfds.acquire(t.path))
                held.append(t.path)
            return list(native.backend.write_many(fds, [t.offset for t in tasks], [t.src for t in tasks],
                                                  self.threads))
        finally:
            for p in held:
                self.wfds.release(p)

    def hash_many(self, views: Sequence[memoryview]) -> list[bytes]:
        return list(native.backend.hash_many(views, self.threads))

    def hash_chunked(self, views: Sequence[Any], chunk: int, threads: int | None = None
                     ) -> list[tuple[bytes, list[bytes]]]:
        """Per value: (whole sum, [chunk sums]), one pass over its bytes."""
        return list(native.backend.hash_chunked(views, chunk, self.threads if threads is None else threads))

    def copy_hash_chunked(self, dests: Sequence[memoryview], views: Sequence[Any],
                          chunk: int) -> list[tuple[bytes, list[bytes]]]:
        """Copy each value to its destination and take its sums as
        ``hash_chunked`` does, in one pass over its bytes."""
        return list(native.backend.copy_hash_chunked(dests, views, chunk, self.threads))

    def close(self) -> None:
        self.fds.close()
        self.wfds.close()
