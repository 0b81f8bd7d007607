"""Rebuild the LMDB index from the segment files alone (daemon stopped).

Records are self-describing (kvfs.format), so the index can always be
rebuilt: every segment file of every stripe is scanned (``scan_records``,
which steps over holes and garbage), every record's payload is verified
against its checksum, and records are grouped by (namespace, key, sequence
number). An object comes back if one of its puts left every chunk intact
and consistent (chunk count, object size, offsets); of several such puts of
one key, the newest (highest sequence number) wins.

What the segments do not hold is lost: an object's ``meta`` (kept only in
the index) and its access times (set to the rebuild's time). Objects
deleted or evicted whose segments were not yet reclaimed come back: the
segments hold no tombstones. For a cache of content-addressed blocks both
are harmless: a key always names the same bytes.

The new index is written beside the old one (``index.rebuild``), then
swapped in; the old one is kept as ``index.old-<time>`` until the operator
removes it.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from kvfs.errors import KvfsError

from .durable import fsync_dir
from .index import SEG_SEALED, Index
from .access import Policy
from .fileperms import FilePerms, apply_private_tree
from .rootlock import RootLock, not_yours
from .storecheck import Piece, entry_of, newest_intact, scan_segments, segment_files

COMMIT_EVERY = 20000  # objects per write transaction


@dataclass
class RebuildReport:
    segments: int = 0
    bytes_scanned: int = 0
    records: int = 0
    records_bad: int = 0  # payload checksum mismatch
    objects: int = 0
    objects_incomplete: int = 0  # keys none of whose puts left every chunk intact
    namespaces: int = 0
    seconds: float = 0.0
    old_index: str | None = None
    details: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def store_stripes(root: Path, what: str) -> list[Path]:
    """The stripes a store's settings (``kvfs.json``) name."""
    try:
        text = (root / "kvfs.json").read_text()
    except FileNotFoundError:
        raise KvfsError(f"{root} is not a kvfs store (no kvfs.json)") from None
    except PermissionError:
        raise not_yours(root, what) from None
    return [Path(s) for s in json.loads(text)["stripes"]]


def rebuild_index(root: Path, progress: Callable[[int, int], None] | None = None,
                  map_size: int = 1 << 40) -> RebuildReport:
    """Scan, rebuild, swap. ``progress(bytes_done, bytes_total)`` is called
    as segments are scanned. Refuses while a daemon holds the store."""
    root = Path(root).expanduser().absolute()
    stripes = store_stripes(root, "kvfs rebuild-index")
    lock = RootLock(root, "kvfs rebuild-index")
    t0 = time.monotonic()
    rep = RebuildReport()
    fds: dict[int, int] = {}
    try:
        files = segment_files(stripes)
        for _si, sid, path in files:
            fds[sid] = os.open(path, os.O_RDONLY)

        def bad(p: Piece) -> None:
            h = p.rec.header
            rep.details.append(f"segment {p.seg} offset {p.rec.header_offset}: {h.ns}/{h.key} chunk {h.chunk_idx}: "
                               "payload checksum mismatch")
        found, counts = scan_segments([(si, sid, fds[sid], os.fstat(fds[sid]).st_size) for si, sid, _p in files],
                                      True, progress, bad)
        # the new index seals every segment (a SEALED row spares it
        # recovery's checks): what the scan read must be on disk first, not
        # only in the page cache a killed daemon left it in
        for fd in fds.values():
            os.fdatasync(fd)
        for sdir in stripes:
            fsync_dir(sdir)
        rep.segments, rep.bytes_scanned = counts.segments, counts.bytes_scanned
        rep.records, rep.records_bad = counts.records, counts.records_bad
        new_dir = root / "index.rebuild"
        shutil.rmtree(new_dir, ignore_errors=True)
        new_dir.mkdir(mode=0o700)
        idx = Index(root, map_size, name="index.rebuild")
        try:
            now = time.time()
            namespaces: set[str] = set()
            txn = idx.env.begin(write=True)
            pending = 0
            for (ns, key), puts in found.items():
                winner = newest_intact(puts)
                if winner is None:
                    rep.objects_incomplete += 1
                    continue
                idx.put_object(txn, ns, key, entry_of(winner, fds, now))
                namespaces.add(ns)
                rep.objects += 1
                pending += 1
                if pending >= COMMIT_EVERY:
                    txn.commit()
                    txn = idx.env.begin(write=True)
                    pending = 0
            for ns in namespaces:
                idx.add_namespace(txn, ns, now)
            for si, sid, _path in files:
                idx.put_segment(txn, sid, si, SEG_SEALED)
            idx.set_counter(txn, b"next_seg", max([sid + 1 for _si, sid, _p in files], default=0))
            idx.set_counter(txn, b"next_seq", max([s for puts in found.values() for s in puts], default=-1) + 1)
            txn.commit()
            rep.namespaces = len(namespaces)
        finally:
            idx.close()
        old = root / "index"
        if old.exists():
            backup = root / f"index.old-{time.strftime('%Y%m%d-%H%M%S')}"
            os.rename(old, backup)
            apply_private_tree(FilePerms(Policy(os.getuid())), backup)  # an older kvfs may have made it wider
            rep.old_index = str(backup)
        os.rename(new_dir, old)
        # the renames are directory entries: without this a power cut may
        # bring back the store with no index (and recovery would then
        # remove every segment as an orphan)
        fsync_dir(root)
    finally:
        for fd in fds.values():
            os.close(fd)
        lock.release()
    rep.seconds = time.monotonic() - t0
    return rep
