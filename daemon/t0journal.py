"""The T0 journal: what a crashed daemon still owed to T1.

In fast mode a T0 put is acknowledged once its bytes are in the arena,
before the write-back to T1. The arena and this journal live in /dev/shm,
which outlives the daemon process (not the OS), so a daemon killed with a
write-back backlog loses nothing acknowledged: on the next start, every put
in the journal without a matching "done" is re-read from the old arena,
verified against the checksums its client committed, and written to T1
like any put; then both files are removed. (An OS crash loses /dev/shm and
with it the backlog: that is what fast mode allows.)

Records: u32 length | 8-byte xxh3-64 of the body | msgpack body, appended
one per batch into a shared mapping of the file (a torn or garbled tail,
or the zeros after the last record, end the reading). Bodies:
``["PX", ns, rows]`` when a batch of T0 puts is published, rows the bytes
of one row per put (``kvfs._native_py.journal_row``: <QQq seq, size,
arena offset | object sum | <I n | n chunk sums | <I key length | key |
<i meta length, -1: none | meta), made in C by the publication itself;
``["DX", seqs]`` when their write-backs ended (written, deleted or
dropped), seqs <Q each: a put's seq is unique in a daemon's life, and a
journal lives one life (read and removed at the next start). One record a
batch, so a batch is in the journal whole or not at all. A rewrite (below)
writes ``["PB", [[ns, key, seq, size, arena_off, object_sum,
[chunk_sum...], meta], ...]]``. (Older daemons wrote "PB" rows for every
batch, ``["DB", [[ns, key, seq], ...]]`` and, older still, one ``["P",
...]`` or ``["D", ...]`` record per put; they are all still read.) The
file is truncated whenever the backlog is empty, so it stays small.
(Packing rows with msgpack cost 0.35 us a put, 0.13 its "done": more than
the rest of the journal's work.)

"Done" records are buffered and written by ``flush`` (once per write-back
batch): one lost with a crash only makes the next start write that put to
T1 again, where it is found already stored and skipped. "P" records are
written before their put is acknowledged: those are what must not be lost.
A delete of a put still owed writes its "done" before the delete is
acknowledged (kvfsd.space), so a crash does not bring the key back.

Under a put load that never lets the backlog empty, the file would grow
for ever (in /dev/shm: memory). Once appended records outgrow what is
still pending (``too_long``), the engine ``rewrite``s it with one "PB"
record of what it still owes, into a new file renamed over the old one: a
crash at any point leaves one whole journal, the old or the new.
"""
from __future__ import annotations

import errno
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import msgpack
import xxhash


_HEAD = struct.Struct("<I8s")
_U64 = struct.Struct("<Q")
_ROW = struct.Struct("<QQq16sI")  # a "PX" row's head: seq, size, arena offset, object sum, chunks
_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
# a journal is rewritten once it is this long and 4 x what it held after the last rewrite
REWRITE_MIN = int(os.environ.get("KVFS_JOURNAL_REWRITE_MIN", 32 << 20))
REWRITE_ROWS = 4096  # rows per record of a rewrite (a record is read whole)
GROW = 1 << 20  # the journal file is allocated and mapped in steps of this many bytes


@dataclass
class Pending:
    ns: str
    key: str
    seq: int
    size: int
    off: int
    checksum: bytes
    chunk_sums: list[bytes]
    meta: bytes | None

    def row(self) -> list[Any]:
        """What ``Journal.published`` takes for it."""
        return [self.ns, self.key, self.seq, self.size, self.off, self.checksum, self.chunk_sums, self.meta]


class Journal:
    """Appends are stores into a shared mapping of the file, not write()
    calls: a record is in the file (the same tmpfs pages) once copied, so
    a killed daemon leaves it behind as a write would have, and a lone put
    saves the system call (5 us of its 40 in the daemon on the 2-core VM).
    The mapping covers only bytes allocated beforehand (``_room``: a full
    /dev/shm is then an ENOSPC there, never a SIGBUS on a store); past
    ``size`` the file is zeros, which reads as the end (``_records``)."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        os.fchmod(self.fd, 0o600)  # the daemon's alone (kvfsd.fileperms), even if an old file was wider
        self._done: list[bytes] = []  # seqs, <Q each
        self.size = 0  # bytes of records in the file (the rest of it is zeros)
        self.base = 0  # bytes after the last rewrite
        self.rewrites = 0
        self.mm: mmap.mmap | None = None
        self.cap = 0  # bytes allocated and mapped
        try:
            self._room(GROW)
        except BaseException:
            os.close(self.fd)
            raise

    def _room(self, end: int) -> None:
        """Allocate and map the file up to at least ``end`` bytes."""
        cap = -(-max(end, 2 * self.cap, GROW) // GROW) * GROW
        try:
            os.posix_fallocate(self.fd, 0, cap)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise  # ENOSPC: /dev/shm is full
            # a file system without fallocate: zeros written past what the
            # file holds (a rewrite's records, say) allocate as well
            pos = os.fstat(self.fd).st_size
            while pos < cap:
                k = os.pwrite(self.fd, bytes(min(GROW, cap - pos)), pos)
                if k <= 0:
                    raise OSError(errno.ENOSPC, f"the T0 journal {self.path} could not grow")
                pos += k
        mm = mmap.mmap(self.fd, cap)
        if self.mm is not None:
            self.mm.close()
        self.mm, self.cap = mm, cap

    def _append(self, body: list[Any]) -> None:
        rec = _record(body)
        end = self.size + len(rec)
        if end > self.cap:
            self._room(end)
        assert self.mm is not None
        self.mm[self.size:end] = rec
        self.size = end

    def published(self, rows: list[list[Any]]) -> None:
        """A batch of T0 puts was published: per put ``Pending.row()``."""
        if rows:
            self._append(["PB", rows])

    def published_rows(self, ns: str, rows: bytes) -> None:
        """A batch of T0 puts in ``ns`` was published: their rows' bytes
        (``kvfs._native_py.journal_row`` each, as t0_publish makes them)."""
        if rows:
            self._append(["PX", ns, rows])

    def done(self, *seqs: int) -> None:
        """The puts of these seqs were written back, deleted or dropped
        (written by ``flush``)."""
        if seqs:
            self._done.append(struct.pack(f"<{len(seqs)}Q", *seqs))

    def done_seqs(self, seqs: bytes) -> None:
        """``done`` of the puts of these seqs (<Q each, as t0_written_back makes them)."""
        if seqs:
            self._done.append(seqs)

    def flush(self) -> None:
        if self._done:
            done, self._done = self._done, []
            self._append(["DX", b"".join(done)])

    def empty(self) -> None:
        """No write-back is pending: start over (keeps the file small).
        A file that grew past GROW is given back; a smaller one is zeroed
        where records were (this runs after every write-back batch that
        clears the backlog: no remapping then)."""
        self._done.clear()
        if self.cap > GROW or self.mm is None:
            if self.mm is not None:
                self.mm.close()
            self.mm, self.cap = None, 0
            os.ftruncate(self.fd, 0)
            try:
                self._room(GROW)
            except OSError:
                pass  # /dev/shm full: the next append tries again, and its put fails, not this write-back
        else:
            self.mm[:self.size] = bytes(self.size)
        self.size = self.base = 0

    def too_long(self) -> bool:
        """Records have piled up past what can still be pending: ``rewrite``."""
        return self.size > max(REWRITE_MIN, 4 * self.base)

    def rewrite(self, rows: list[list[Any]]) -> None:
        """Replace the journal by one of ``rows`` (``Pending.row()`` of
        every put still owed, and nothing else: buffered "done" rows go).
        The new file is complete before it is renamed over the old one; if
        it cannot be written (/dev/shm full) the old one stays."""
        tmp = rewrite_path(self.path)
        data = b"".join(_record(["PB", rows[i:i + REWRITE_ROWS]]) for i in range(0, len(rows), REWRITE_ROWS))
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        old = (self.fd, self.mm, self.cap)
        try:
            os.fchmod(fd, 0o600)
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, f"the T0 journal {tmp} took a short write")
            self.fd, self.mm, self.cap = fd, None, 0
            self._room(len(data) + GROW)
            os.rename(tmp, self.path)
        except OSError:
            if self.mm is not None:
                self.mm.close()
            self.fd, self.mm, self.cap = old
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        assert old[1] is not None
        old[1].close()
        os.close(old[0])
        self._done.clear()
        self.size = self.base = len(data)
        self.rewrites += 1

    def close(self, remove: bool = True) -> None:
        if not remove:
            self.flush()
        if self.mm is not None:
            self.mm.close()
            self.mm = None
        if not remove:
            os.ftruncate(self.fd, self.size)  # what is left to read is the records alone
        os.close(self.fd)
        if remove:
            self.path.unlink(missing_ok=True)


def _record(body: list[Any]) -> bytes:
    raw = msgpack.packb(body, use_bin_type=True)
    return _HEAD.pack(len(raw), xxhash.xxh3_64_digest(raw)) + raw


def rewrite_path(path: Path) -> Path:
    """Where ``Journal.rewrite`` builds the new journal before its rename
    (left behind only by a crash in between: removed at start)."""
    return path.with_name(path.name + ".new")


def read_pending(path: Path) -> list[Pending]:
    """Puts a crashed daemon published to T0 and had not written back."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    pending: dict[int, Pending] = {}  # by seq: unique in the life the journal was written in
    for body in _records(data):
        try:
            kind = body[0]
            if kind == "PX":
                for p in _px_rows(body[1], body[2]):
                    pending[p.seq] = p
            elif kind == "DX":
                for (seq,) in _U64.iter_unpack(body[1]):
                    pending.pop(seq, None)
            else:
                for row in body[1] if kind in ("PB", "DB") else [body[1:]]:
                    if kind in ("P", "PB"):
                        p = Pending(*row[:8])
                        pending[p.seq] = p
                    elif kind in ("D", "DB"):
                        pending.pop(row[2], None)
        except (TypeError, IndexError, ValueError, struct.error):
            continue
    return list(pending.values())


def _px_rows(ns: str, raw: bytes) -> list[Pending]:
    """The rows of a "PX" record (all of them, or an error: a record is whole)."""
    out: list[Pending] = []
    pos = 0
    while pos < len(raw):
        seq, size, off, checksum, n = _ROW.unpack_from(raw, pos)
        pos += _ROW.size
        sums = [raw[pos + 16 * i:pos + 16 * i + 16] for i in range(n)]
        pos += 16 * n
        (kl,) = _U32.unpack_from(raw, pos)
        key = raw[pos + 4:pos + 4 + kl].decode()
        pos += 4 + kl
        (ml,) = _I32.unpack_from(raw, pos)
        pos += 4
        meta = None if ml < 0 else raw[pos:pos + ml]
        pos += max(ml, 0)
        if pos > len(raw) or any(len(c) != 16 for c in sums):
            raise ValueError("a truncated journal row")
        out.append(Pending(ns, key, seq, size, off, checksum, sums, meta))
    return out


def _records(data: bytes) -> Iterator[list[Any]]:
    pos = 0
    while pos + _HEAD.size <= len(data):
        n, digest = _HEAD.unpack_from(data, pos)
        raw = data[pos + _HEAD.size:pos + _HEAD.size + n]
        if len(raw) < n or xxhash.xxh3_64_digest(raw) != digest:
            return  # a torn tail
        try:
            body = msgpack.unpackb(raw, raw=False)
        except Exception:  # noqa: BLE001 - garbage is a torn tail too
            return
        if isinstance(body, list) and body:
            yield body
        pos += _HEAD.size + n
