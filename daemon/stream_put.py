"""A put written like a file: bytes arrive at offsets and the size is known
only at the end (the FUSE write path).

Bytes go straight to their final place in T1 (``Engine.begin_stream``), so
a file is written once; the commit adds record headers and the index entry.
Checksums are taken as in-order writes arrive (`cp`, `dd`, `shutil`), so
the commit reads nothing back; after an out-of-order write or a truncate
they are taken at commit by reading the bytes back from the segments.

Every method but ``__init__`` blocks (disk): call them from a worker
thread. The kernel serialises writes to one file, and a file being written
has one writer (a second open is refused), so calls do not overlap; the
lock only guards the running hashes against a truncate.
"""
from __future__ import annotations

import os
import threading
from typing import Any

import xxhash

from .engine import Engine
from .segments import ChunkPlan

ZEROS = bytes(1 << 20)


class StreamPut:
    def __init__(self, eng: Engine, ns: str, key: str) -> None:
        self.eng = eng
        self.plan, self.first = eng.begin_stream(ns, key)
        self.chunks: dict[int, ChunkPlan] = {}
        self.size = 0  # the file's size: the end of the furthest write, or a truncate
        self.lock = threading.Lock()
        # bytes [0, hashed) are in the running hashes; sums is None once that
        # order was broken (the commit hashes from the segments instead)
        self.hashed = 0
        self.whole: Any = xxhash.xxh3_128()
        self.chunk: Any = xxhash.xxh3_128()
        self.sums: list[bytes] | None = []

    def reserve(self, i: int) -> ChunkPlan:
        """Chunk ``i``'s place in T1, reserved the first time it is asked for
        (blocking: it may evict). The C mount asks for it too (it writes the
        bytes itself: kvfsd.cfuse_bridge)."""
        ch = self.chunks.get(i)
        if ch is None:
            ch = self.chunks[i] = self.eng.reserve_stream_chunk(self.plan, self.first, i)
        return ch

    def write(self, buf: bytes, off: int) -> int:
        su = self.eng.stripe_unit
        view = memoryview(buf)
        done = 0
        while done < len(view):
            pos = off + done
            i = pos // su
            ch = self.reserve(i)
            n = min(len(view) - done, su - pos % su)
            self.eng.write_payload(ch, view[done:done + n], pos % su)
            done += n
        with self.lock:
            self._hash(view, off)
            self.size = max(self.size, off + len(view))
        return len(view)

    def _hash(self, view: memoryview, off: int) -> None:
        if self.sums is None:
            return
        if off != self.hashed:
            self.sums = None
            return
        su = self.eng.stripe_unit
        self.whole.update(view)
        while len(view):
            room = su - self.hashed % su
            self.chunk.update(view[:room])
            self.hashed += min(room, len(view))
            if self.hashed % su == 0:
                self.sums.append(self.chunk.digest())
                self.chunk = xxhash.xxh3_128()
            view = view[room:]

    def truncate(self, size: int) -> None:
        """Set the file's size. Bytes past a shrink are zeroed where they were
        written, so a later write past them leaves zeros in between, as a
        file would."""
        su = self.eng.stripe_unit
        with self.lock:
            pos = size
            while pos < self.size:
                n = min(self.size - pos, su - pos % su, len(ZEROS))
                ch = self.chunks.get(pos // su)
                if ch is not None:
                    self.eng.write_payload(ch, memoryview(ZEROS)[:n], pos % su)
                pos += n
            self.size = size
            if size != self.hashed:
                self.sums = None

    def commit(self) -> bool:
        """Store the file as one object. False: the key was stored meanwhile
        by someone else (theirs is kept)."""
        return self._commit(None, True)

    def commit_hashed(self, hashes: tuple[list[bytes], bytes] | None) -> bool:
        """``commit``, with the digests of each chunk and of the whole that
        the writer took as the bytes arrived (the C mount, which writes
        them itself); None: it could not (the commit reads them back)."""
        return self._commit(hashes, False)

    def _commit(self, hashes: tuple[list[bytes], bytes] | None, own: bool) -> bool:
        size = self.size
        self.eng.end_stream(self.plan, self.first, size)
        op = self.plan.items[0]
        assert op is not None
        if own and self.sums is not None and self.hashed == size:
            sums = list(self.sums)
            if len(sums) < len(op.chunks):
                sums.append(self.chunk.digest())  # the partial last chunk (or the empty value's one)
            hashes = (sums, self.whole.digest())
        if hashes is not None and len(hashes[0]) == len(op.chunks):
            sums, whole = hashes
        else:
            sums, whole = self._hash_back()
        for ch, s in zip(op.chunks, sums, strict=True):
            ch.checksum = s
        op.checksum = whole
        self.eng.write_headers(self.plan)
        return self.eng.commit_put(self.plan, False)[0]

    def _hash_back(self) -> tuple[list[bytes], bytes]:
        op = self.plan.items[0]
        assert op is not None
        whole = xxhash.xxh3_128()
        sums = []
        for ch in op.chunks:
            fd = self.eng.segment_fd(ch.seg)
            h = xxhash.xxh3_128()
            pos = 0
            while pos < ch.length:
                data = os.pread(fd, min(ch.length - pos, 4 << 20), ch.payload_off + pos)
                if not data:
                    raise OSError(f"segment {ch.seg} is shorter than a value being stored")
                h.update(data)
                whole.update(data)
                pos += len(data)
            sums.append(h.digest())
        return sums, whole.digest()

    def abort(self) -> None:
        self.eng.abort_put(self.plan)
