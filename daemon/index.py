"""The LMDB index: schema and (de)serialisation.

Invariant: only the writer thread (kvfsd.writer) opens write transactions;
any thread may open read transactions.

Environment ``<root>/index`` with these named databases:

``objects``   ``ns \\0 key`` (utf-8) -> msgpack ``[size, checksum(16), seq,
              created, atime, meta_json | nil, [[stripe, seg, payload_off,
              length, chunk_checksum(16)], ...]]``. The object checksum is
              xxh3-128 of the whole value (``xxh128sum`` of the file agrees);
              each extent carries the checksum of its own chunk.
``segobj``    ``seg_id u64be | header_off u64be`` -> ``ns \\0 key``: which
              object owns the record at that offset (recovery, compaction).
``segdead``   same keys -> ``ns \0 key``: records once published and since
              unpublished (deleted, evicted, dropped), and compaction's
              copies of objects that changed while they were copied, until
              their segment goes. A record in neither ``segobj`` nor ``segdead`` was never
              published, or the index lost it (what ``kvfs verify`` calls
              an orphan).
``segments``  ``seg_id u64be`` -> msgpack ``[stripe, state]``, state
              0 = open, 1 = sealed. A segment file with no row here holds no
              published record.
``namespaces`` ``ns`` -> msgpack ``created``.
``meta``      ``next_seg``, ``next_seq`` (u64be): counters, never reused.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import lmdb
import msgpack

from kvfs import native

from .durable import fsync_dir, mkdir_durable

SEG_OPEN = 0
SEG_SEALED = 1

_U64 = struct.Struct(">Q")
_SEGOFF = struct.Struct(">QQ")


@dataclass
class Extent:
    stripe: int
    seg: int
    offset: int  # payload offset within the segment file
    length: int
    checksum: bytes

    def wire(self) -> tuple[Any, ...]:
        return (self.stripe, self.seg, self.offset, self.length, self.checksum)


@dataclass
class ObjEntry:
    size: int
    checksum: bytes
    seq: int
    created: float
    atime: float
    meta: bytes | None
    extents: list[Extent]
    header_offsets: list[int]  # where each chunk's record header starts
    spans: list[int]  # bytes of each record from its header to its (aligned) end

    def encode(self) -> bytes:
        return encode_entry(self.size, self.checksum, self.seq, self.created, self.atime, self.meta,
                            [[e.stripe, e.seg, e.offset, e.length, e.checksum, h, s]
                             for e, h, s in zip(self.extents, self.header_offsets, self.spans)])

    @classmethod
    def decode(cls, raw: bytes) -> "ObjEntry":
        size, csum, seq, created, atime, meta, exts = msgpack.unpackb(raw, raw=False)
        return cls(size, csum, seq, created, atime, meta,
                   [Extent(x[0], x[1], x[2], x[3], x[4]) for x in exts],
                   [x[5] for x in exts], [x[6] for x in exts])

    @property
    def footprint(self) -> int:
        return sum(self.spans)


def encode_entry(size: int, checksum: bytes, seq: int, created: float, atime: float, meta: bytes | None,
                 rows: list[list[Any]]) -> bytes:
    """An ``objects`` value; ``rows``: per chunk [stripe, seg, payload_off,
    length, chunk_sum, header_off, span]. msgpack of the list of the
    arguments (in C when built: once per put, on the write-back's path)."""
    return native.backend.pack_entry(size, checksum, seq, created, atime, meta, rows)


def obj_key(ns: str, key: str) -> bytes:
    return ns.encode() + b"\x00" + key.encode()


def split_obj_key(k: bytes) -> tuple[str, str]:
    ns, _, key = bytes(k).partition(b"\x00")
    return ns.decode(), key.decode()


def seg_key(seg: int) -> bytes:
    return _U64.pack(seg)


def segobj_key(seg: int, off: int) -> bytes:
    return _SEGOFF.pack(seg, off)


def parse_segobj_key(k: bytes) -> tuple[int, int]:
    return _SEGOFF.unpack(bytes(k))


class Index:
    def __init__(self, root: Path, map_size: int, name: str = "index"):
        path = root / name
        mkdir_durable(path, 0o700)
        # LMDB's MDB_NOMETASYNC: every commit fdatasyncs its pages before it
        # writes the meta page that points at them, so no power cut (nor
        # the kernel writing a meta page back early, which it does in page
        # order: meta pages first) can leave a meta page on disk ahead of
        # its tree. The meta page itself is made durable by the next
        # commit's sync or the writer's env.sync (after every sync commit,
        # and periodically in fast mode). MDB_NOSYNC, with one fdatasync for
        # pages and meta together, lost every acknowledged sync put of a
        # store to one torn sync in the power-cut campaign: the meta page
        # landed, its pages did not, and the older tree it then named read
        # as a valid, empty index. The index is the daemon's alone (mode
        # 0600: kvfsd.fileperms, PRIVATE).
        # KVFS_UNSAFE_INDEX_NOSYNC=1 restores MDB_NOSYNC: only for
        # `kvfs bench --durability`, which measures what this rule costs
        unsafe = os.environ.get("KVFS_UNSAFE_INDEX_NOSYNC") == "1"
        self.env = lmdb.open(str(path), map_size=map_size, max_dbs=12, max_readers=4096,
                             sync=not unsafe, metasync=False, writemap=False, readahead=False,
                             lock=True, mode=0o600)
        self.objects = self.env.open_db(b"objects")
        self.segobj = self.env.open_db(b"segobj")
        self.segdead = self.env.open_db(b"segdead")
        self.segments = self.env.open_db(b"segments")
        self.namespaces = self.env.open_db(b"namespaces")
        self.meta = self.env.open_db(b"meta")
        # LMDB creates its files (and the tables above) without syncing them
        # or their names: a store's first sync put must not lose its index
        self.env.sync(True)
        fsync_dir(path)

    def used_bytes(self) -> int:
        """Bytes of the map in use (through its last page; freed pages inside count)."""
        info = self.env.info()
        return (info["last_pgno"] + 1) * self.env.stat()["psize"]

    def close(self) -> None:
        self.env.sync(True)
        self.env.close()

    # -- counters -------------------------------------------------------------
    def get_counter(self, txn: lmdb.Transaction, name: bytes) -> int:
        v = txn.get(name, db=self.meta)
        return _U64.unpack(v)[0] if v else 0

    def set_counter(self, txn: lmdb.Transaction, name: bytes, value: int) -> None:
        txn.put(name, _U64.pack(value), db=self.meta)

    # -- objects --------------------------------------------------------------
    def get(self, txn: lmdb.Transaction, ns: str, key: str) -> ObjEntry | None:
        raw = txn.get(obj_key(ns, key), db=self.objects)
        return ObjEntry.decode(bytes(raw)) if raw is not None else None

    def put_object(self, txn: lmdb.Transaction, ns: str, key: str, e: ObjEntry) -> None:
        ok = obj_key(ns, key)
        txn.put(ok, e.encode(), db=self.objects)
        for ext, h in zip(e.extents, e.header_offsets):
            txn.put(segobj_key(ext.seg, h), ok, db=self.segobj)

    def add_objects(self, txn: lmdb.Transaction, pairs: list[tuple[bytes, bytes]], segs: list[tuple[bytes, bytes]],
                    owner: list[int]) -> list[bool]:
        """Store new objects, a batch (``kvfs._native.index_rows``' rows:
        entries as ``encode_entry`` writes them) with one cursor call for the
        objects and one for their segobj rows, unless a key is stored
        already: then that one keeps its entry. Per object, whether it was
        stored."""
        if not pairs:
            return []
        _consumed, added = txn.cursor(db=self.objects).putmulti(pairs, overwrite=False)
        if added == len(pairs):
            stored = [True] * len(pairs)
        else:  # some key was stored already (a concurrent put won): ours only where our entry is
            stored = [txn.get(k, db=self.objects) == v for k, v in pairs]
            segs = [row for row, i in zip(segs, owner) if stored[i]]
        if segs:
            txn.cursor(db=self.segobj).putmulti(segs)
        return stored

    def delete_object(self, txn: lmdb.Transaction, ns: str, key: str) -> ObjEntry | None:
        ok = obj_key(ns, key)
        raw = txn.pop(ok, db=self.objects)
        if raw is None:
            return None
        e = ObjEntry.decode(bytes(raw))
        for ext, h in zip(e.extents, e.header_offsets):
            txn.delete(segobj_key(ext.seg, h), db=self.segobj)
            txn.put(segobj_key(ext.seg, h), ok, db=self.segdead)
        return e

    def was_published(self, txn: lmdb.Transaction, seg: int, header_off: int) -> bool:
        """Whether the record at ``header_off`` of ``seg`` is, or was, published."""
        k = segobj_key(seg, header_off)
        return txn.get(k, db=self.segobj) is not None or txn.get(k, db=self.segdead) is not None

    def iter_objects(self, txn: lmdb.Transaction) -> Iterator[tuple[str, str, ObjEntry]]:
        with txn.cursor(db=self.objects) as cur:
            for k, v in cur:
                ns, key = split_obj_key(bytes(k))
                yield ns, key, ObjEntry.decode(bytes(v))

    def iter_keys(self, txn: lmdb.Transaction, ns: str, after: str | None, limit: int) -> tuple[list[str], bool]:
        keys, more = self.iter_entries(txn, ns, after, limit, values=False)
        return [k for k, _e in keys], more

    def iter_entries(self, txn: lmdb.Transaction, ns: str, after: str | None, limit: int, *, values: bool = True
                     ) -> tuple[list[tuple[str, ObjEntry | None]], bool]:
        """Up to ``limit`` (key, entry) of ``ns`` after ``after``, in key
        order (entry None without ``values``); and whether more follow."""
        prefix = ns.encode() + b"\x00"
        start = prefix + (after.encode() + b"\x00" if after is not None else b"")
        out: list[tuple[str, ObjEntry | None]] = []
        with txn.cursor(db=self.objects) as cur:
            if not cur.set_range(start):
                return out, False
            for k, v in cur.iternext(keys=True, values=True):
                k = bytes(k)
                if not k.startswith(prefix):
                    return out, False
                if len(out) >= limit:
                    return out, True
                out.append((bytes(k[len(prefix):]).decode(), ObjEntry.decode(bytes(v)) if values else None))
        return out, False

    def iter_segment_records(self, txn: lmdb.Transaction, seg: int) -> Iterator[tuple[int, bytes]]:
        """(header offset, object key) of every published record in ``seg``."""
        lo = segobj_key(seg, 0)
        with txn.cursor(db=self.segobj) as cur:
            if not cur.set_range(lo):
                return
            for k, v in cur:
                s, off = parse_segobj_key(bytes(k))
                if s != seg:
                    return
                yield off, bytes(v)

    # -- segments -------------------------------------------------------------
    def put_segment(self, txn: lmdb.Transaction, seg: int, stripe: int, state: int) -> None:
        txn.put(seg_key(seg), msgpack.packb([stripe, state]), db=self.segments)

    def delete_segment(self, txn: lmdb.Transaction, seg: int) -> None:
        txn.delete(seg_key(seg), db=self.segments)
        with txn.cursor(db=self.segdead) as cur:  # its dead records go with it
            if cur.set_range(segobj_key(seg, 0)):
                while True:
                    k = bytes(cur.key())
                    if not k or parse_segobj_key(k)[0] != seg or not cur.delete():
                        break

    def iter_segments(self, txn: lmdb.Transaction) -> Iterator[tuple[int, int, int]]:
        with txn.cursor(db=self.segments) as cur:
            for k, v in cur:
                stripe, state = msgpack.unpackb(v)
                yield _U64.unpack(bytes(k))[0], stripe, state

    # -- namespaces -----------------------------------------------------------
    def add_namespace(self, txn: lmdb.Transaction, ns: str, created: float) -> None:
        txn.put(ns.encode(), msgpack.packb(created), db=self.namespaces, overwrite=False)

    def delete_namespace(self, txn: lmdb.Transaction, ns: str) -> bool:
        return bool(txn.delete(ns.encode(), db=self.namespaces))

    def list_namespaces(self, txn: lmdb.Transaction) -> list[str]:
        with txn.cursor(db=self.namespaces) as cur:
            return [bytes(k).decode() for k in cur.iternext(keys=True, values=False)]
