"""A disk that forgets what was not synced: the power-cut simulator's model
(the test kit's FUSE pass-through, kvfsd.testing_powercut, serves it).

It is the approach of LazyFS (Jepsen) and of ALICE/CrashMonkey: keep every
change the kernel would still hold in its page cache and inode cache apart
from what a sync has put on the disk, and at a power cut drop the former.
The rules modelled are what POSIX and ext4 *promise*, and no more:

  R1 data   ``write``/``pwrite`` (and the write-back of a shared writable
            ``mmap``, which reaches a FUSE file system as writes) are
            volatile until ``fsync`` or ``fdatasync`` of that file, through
            any descriptor. Growing the file is part of its data.
  R2 size   ``truncate``/``ftruncate`` are volatile until the file's next
            ``fsync``/``fdatasync``.
  R3 sync   ``fsync`` and ``fdatasync`` make the file's data and size
            durable (fdatasync must persist the size to let the data be
            read back, so the model does not tell them apart).
  R4 names  ``create``, ``mkdir``, ``unlink``, ``rmdir`` and ``rename``
            change a directory's entries; the change is volatile until that
            directory is ``fsync``'d. A directory's fsync makes its whole
            entry table durable as it is then (the entries name inodes; an
            inode's data is only as durable as R1-R3 made it).
  R5 reach  after a cut a file's data is reachable only through durable
            entries: a file that was fsync'd but whose name never became
            durable is gone. (ext4 in fact often commits the new entry with
            the file's fsync, in the same journal transaction; that is an
            implementation detail, not a promise, and the model denies it.)
  R6 cut    every volatile change is lost at once; or, in a cut "with
            names" (``commit_names``), every directory's entry table
            reaches the disk first and no data does: ext4's journal
            commits entry changes every few seconds on its own, unlinks
            included, with no fsync asked for. Not modelled: other subsets
            of unsynced writes reaching the disk early or out of order (a
            torn sector or page). One such subset can be asked for: a
            "torn" fsync (``tear``) of a named file writes only its lowest
            unsynced range, then the power goes: a disk that wrote one
            dirty page of the file before the others.
  R7 other  no ``O_DIRECT`` semantics (the daemon writes with it only files
            written through the C mount, which the campaign does not do);
            hard links, symlinks, special files and xattrs are refused.

Durable state lives in a backing directory: ``tree.json`` (directories'
durable entry tables and inode modes) and ``data/<ino>`` (each file's
durable bytes). Volatile state is this object's memory plus ``vol/<ino>``
(a sparse scratch file holding the unsynced byte ranges at their offsets),
so a power cut is simply the end of the process that holds it: the next
``VolatileDisk`` on the same backing directory sees only what was synced.
"""
from __future__ import annotations

import bisect
import errno
import json
import os
import signal
import stat
from dataclasses import dataclass, field
from pathlib import Path

ROOT = 1
COPY = 1 << 20


class Intervals:
    """Sorted, disjoint, merged half-open byte ranges: the unsynced parts of
    a file. Pure (unit-tested on its own)."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def __bool__(self) -> bool:
        return bool(self.starts)

    def add(self, s: int, e: int) -> None:
        if e <= s:
            return
        i = bisect.bisect_left(self.ends, s)  # first range that ends at or after s
        j = bisect.bisect_right(self.starts, e)  # ranges from i to j-1 touch [s, e)
        if i < j:
            s = min(s, self.starts[i])
            e = max(e, self.ends[j - 1])
        self.starts[i:j] = [s]
        self.ends[i:j] = [e]

    def clip(self, n: int) -> None:
        """Forget everything at or past ``n``."""
        i = bisect.bisect_left(self.ends, n + 1)
        del self.starts[i + 1:], self.ends[i + 1:]
        if i < len(self.starts):
            if self.starts[i] >= n:
                del self.starts[i], self.ends[i]
            else:
                self.ends[i] = n

    def pieces(self, s: int, e: int) -> list[tuple[int, int, bool]]:
        """[s, e) cut into (start, end, dirty) pieces, in order."""
        out: list[tuple[int, int, bool]] = []
        i = bisect.bisect_right(self.ends, s)
        pos = s
        while pos < e and i < len(self.starts) and self.starts[i] < e:
            a, b = max(self.starts[i], pos), min(self.ends[i], e)
            if a > pos:
                out.append((pos, a, False))
            out.append((a, b, True))
            pos = b
            i += 1
        if pos < e:
            out.append((pos, e, False))
        return out

    def spans(self) -> list[tuple[int, int]]:
        return list(zip(self.starts, self.ends))


@dataclass
class Node:
    ino: int
    mode: int
    size: int = 0  # the live size (files)
    dirty: Intervals = field(default_factory=Intervals)
    mtime_ns: int = 0
    entries: dict[bytes, int] | None = None  # live entry table (directories)


class FsError(OSError):
    def __init__(self, code: int) -> None:
        super().__init__(code, os.strerror(code))


class VolatileDisk:
    """The live file system over a backing directory's durable state."""

    def __init__(self, backing: Path) -> None:
        self.backing = Path(backing)
        (self.backing / "data").mkdir(parents=True, exist_ok=True)
        vol = self.backing / "vol"
        if vol.exists():  # what a cut left unsynced: gone
            for p in vol.iterdir():
                p.unlink()
        vol.mkdir(exist_ok=True)
        tree = self.backing / "tree.json"
        if tree.exists():
            saved = json.loads(tree.read_text())
            self.durable_dirs = {int(d): {bytes.fromhex(n): i for n, i in ents.items()}
                                 for d, ents in saved["dirs"].items()}
            self.durable_modes = {int(i): m for i, m in saved["modes"].items()}
        else:
            self.durable_dirs = {ROOT: {}}
            self.durable_modes = {ROOT: stat.S_IFDIR | 0o755}
        self._drop_unreachable()
        self.nodes: dict[int, Node] = {}
        for ino, mode in self.durable_modes.items():
            n = Node(ino, mode)
            if stat.S_ISDIR(mode):
                n.entries = dict(self.durable_dirs.get(ino, {}))
            else:
                p = self._data(ino)
                n.size = p.stat().st_size if p.exists() else 0
            self.nodes[ino] = n
        self.next_ino = max(self.nodes) + 1
        self._fds: dict[tuple[str, int], int] = {}
        self.tear: bytes | None = None  # the next fsync of a file of this name is torn (R6)
        self.syncs = {"fsync": 0, "fsyncdir": 0}

    # -- durable state -------------------------------------------------------
    def _data(self, ino: int) -> Path:
        return self.backing / "data" / str(ino)

    def _vol(self, ino: int) -> Path:
        return self.backing / "vol" / str(ino)

    def _drop_unreachable(self) -> None:
        seen = {ROOT}
        todo = [ROOT]
        while todo:
            for child in self.durable_dirs.get(todo.pop(), {}).values():
                if child not in seen:
                    seen.add(child)
                    if stat.S_ISDIR(self.durable_modes.get(child, 0)):
                        todo.append(child)
        self.durable_modes = {i: m for i, m in self.durable_modes.items() if i in seen}
        self.durable_dirs = {d: e for d, e in self.durable_dirs.items() if d in seen}
        for p in (self.backing / "data").iterdir():
            if int(p.name) not in seen:
                p.unlink()

    def _save_tree(self) -> None:
        tmp = self.backing / "tree.json.tmp"
        tmp.write_text(json.dumps({"dirs": {str(d): {n.hex(): i for n, i in e.items()}
                                            for d, e in self.durable_dirs.items()},
                                   "modes": {str(i): m for i, m in self.durable_modes.items()}}))
        os.replace(tmp, self.backing / "tree.json")

    def _fd(self, kind: str, ino: int) -> int:
        fd = self._fds.get((kind, ino))
        if fd is None:
            path = self._data(ino) if kind == "data" else self._vol(ino)
            fd = self._fds[(kind, ino)] = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    # -- names ----------------------------------------------------------------
    def node(self, ino: int) -> Node:
        n = self.nodes.get(ino)
        if n is None:
            raise FsError(errno.ENOENT)
        return n

    def _dir(self, ino: int) -> dict[bytes, int]:
        n = self.node(ino)
        if n.entries is None:
            raise FsError(errno.ENOTDIR)
        return n.entries

    def lookup(self, parent: int, name: bytes) -> Node:
        ino = self._dir(parent).get(name)
        if ino is None:
            raise FsError(errno.ENOENT)
        return self.nodes[ino]

    def make(self, parent: int, name: bytes, mode: int) -> Node:
        ents = self._dir(parent)
        if name in ents:
            raise FsError(errno.EEXIST)
        if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
            raise FsError(errno.EPERM)
        n = Node(self.next_ino, mode)
        self.next_ino += 1
        if stat.S_ISDIR(mode):
            n.entries = {}
        self.nodes[n.ino] = n
        ents[name] = n.ino
        return n

    def remove(self, parent: int, name: bytes, want_dir: bool) -> None:
        ents = self._dir(parent)
        ino = ents.get(name)
        if ino is None:
            raise FsError(errno.ENOENT)
        n = self.nodes[ino]
        if want_dir != (n.entries is not None):
            raise FsError(errno.ENOTDIR if want_dir else errno.EISDIR)
        if n.entries:
            raise FsError(errno.ENOTEMPTY)
        del ents[name]  # the node lives on for open descriptors (and in durable tables)

    def rename(self, p_old: int, old: bytes, p_new: int, new: bytes) -> None:
        src, dst = self._dir(p_old), self._dir(p_new)
        ino = src.get(old)
        if ino is None:
            raise FsError(errno.ENOENT)
        target = dst.get(new)
        if target is not None and target != ino:
            t = self.nodes[target]
            if t.entries is not None and t.entries:
                raise FsError(errno.ENOTEMPTY)
        del src[old]
        dst[new] = ino

    def fsyncdir(self, ino: int) -> None:
        """R4: the directory's entry table as it is now becomes durable."""
        ents = dict(self._dir(ino))
        self.durable_dirs[ino] = ents
        for child in ents.values():
            self.durable_modes[child] = self.nodes[child].mode
            if self.nodes[child].entries is None:
                self._fd("data", child)  # an empty durable file, at least
        self._save_tree()
        self.syncs["fsyncdir"] += 1

    def commit_names(self) -> None:
        """R6: every directory's entries as they are now reach the disk (and
        nothing else does): the journal commit of a cut "with names"."""
        todo = [ROOT]  # from the root, so that new subdirectories come too
        while todo:
            ino = todo.pop()
            self.fsyncdir(ino)
            todo += [c for c in self._dir(ino).values() if self.nodes[c].entries is not None]

    # -- data -----------------------------------------------------------------
    def read(self, ino: int, off: int, size: int) -> bytes:
        n = self.node(ino)
        end = min(off + size, n.size)
        out = []
        for a, b, dirty in n.dirty.pieces(off, end) if end > off else []:
            got = os.pread(self._fd("vol" if dirty else "data", ino), b - a, a)
            out.append(got + bytes(b - a - len(got)))  # past a backing file's end: zeros
        return b"".join(out)

    def write(self, ino: int, off: int, buf: bytes) -> int:
        n = self.node(ino)
        done = os.pwrite(self._fd("vol", ino), buf, off)
        n.dirty.add(off, off + done)
        n.size = max(n.size, off + done)
        return done

    def truncate(self, ino: int, size: int) -> None:
        n = self.node(ino)
        if size < n.size:
            n.dirty.clip(size)
            os.ftruncate(self._fd("vol", ino), size)
        # what lies between the two sizes now reads as zeros (vol holds none there)
        n.dirty.add(min(size, n.size), max(size, n.size))
        n.size = size

    def fsync(self, ino: int) -> None:
        """R3: the file's data and size become durable."""
        n = self.node(ino)
        if n.entries is not None:
            return self.fsyncdir(ino)
        n.dirty.clip(n.size)
        vol, data = self._fd("vol", ino), self._fd("data", ino)
        spans = n.dirty.spans()
        torn = self.tear is not None and any(d.get(self.tear) == ino for d in
                                             (x.entries for x in self.nodes.values()) if d is not None)
        for a, b in spans[:1] if torn else spans:
            pos = a
            while pos < b:
                chunk = os.pread(vol, min(COPY, b - pos), pos)
                want = min(COPY, b - pos)
                chunk += bytes(want - len(chunk))
                os.pwrite(data, chunk, pos)
                pos += want
        if torn:
            os.kill(os.getpid(), signal.SIGKILL)  # the power goes mid-sync
        os.ftruncate(data, n.size)
        n.dirty = Intervals()
        os.ftruncate(vol, 0)
        self.syncs["fsync"] += 1
        return None

    def statfs(self) -> os.statvfs_result:
        return os.statvfs(self.backing)
