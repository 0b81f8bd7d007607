"""Power cuts: the simulator's rules (kvfsd.volatile_disk), then one test
per ordering rule the daemon keeps, each a power cut at the moment that
rule matters (each failed before its fix; README "Durability rules").
The campaign (`kvfs faults --only powercut`) is in test_faults."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

import kvfs
from kvfsd.testing import DaemonProcess
from kvfsd.testing_powercut import PowerCutDisk, usable
from kvfsd.volatile_disk import ROOT, Intervals, VolatileDisk

MiB = 1 << 20


# ---------------------------------------------------------------- the model
def test_intervals_merge_clip_and_cut_ranges():
    iv = Intervals()
    iv.add(10, 20)
    iv.add(30, 40)
    iv.add(20, 30)  # touching ranges merge
    assert iv.spans() == [(10, 40)]
    iv.add(50, 60)
    iv.add(5, 12)
    assert iv.spans() == [(5, 40), (50, 60)]
    assert iv.pieces(0, 70) == [(0, 5, False), (5, 40, True), (40, 50, False), (50, 60, True), (60, 70, False)]
    assert iv.pieces(45, 55) == [(45, 50, False), (50, 55, True)]
    iv.clip(52)
    assert iv.spans() == [(5, 40), (50, 52)]
    iv.clip(50)
    assert iv.spans() == [(5, 40)]
    iv.clip(0)
    assert not iv


def _file(disk: VolatileDisk, parent: int, name: bytes) -> int:
    return disk.make(parent, name, 0o100600).ino


def test_unsynced_data_and_names_are_lost(tmp_path):
    d = VolatileDisk(tmp_path)
    dirino = d.make(ROOT, b"dir", 0o40700).ino
    a = _file(d, dirino, b"a")
    d.write(a, 0, b"x" * 10000)
    d.fsync(a)  # R3: data durable ...
    d.fsyncdir(ROOT)  # ... "dir" named in the root, but "a" not in "dir" (R4, R5)
    b = _file(d, ROOT, b"b")
    d.write(b, 0, b"y" * 100)
    d.fsyncdir(ROOT)  # "b" named, its data never synced (R1)
    assert d.read(a, 0, 5) == b"xxxxx" and d.read(b, 0, 200) == b"y" * 100
    d.close()
    d = VolatileDisk(tmp_path)  # the cut
    assert d.lookup(ROOT, b"dir").entries == {}
    assert d.lookup(ROOT, b"b").size == 0
    d.close()


def test_synced_file_in_a_synced_directory_survives_but_later_writes_do_not(tmp_path):
    d = VolatileDisk(tmp_path)
    a = _file(d, ROOT, b"a")
    d.write(a, 0, b"1" * 8192)
    d.fsync(a)
    d.fsyncdir(ROOT)
    d.write(a, 4096, b"2" * 8192)  # overwrite and grow, not synced
    d.truncate(a, 100)  # and shrink, not synced
    assert d.read(a, 0, 9000) == b"1" * 100
    d.truncate(a, 200)  # grown again: zeros, not the old bytes
    assert d.read(a, 0, 300) == b"1" * 100 + bytes(100)
    d.close()
    d = VolatileDisk(tmp_path)
    n = d.lookup(ROOT, b"a")
    assert n.size == 8192 and d.read(n.ino, 0, 9000) == b"1" * 8192
    d.close()


def test_rename_and_unlink_wait_for_the_directory_fsync(tmp_path):
    d = VolatileDisk(tmp_path)
    a = _file(d, ROOT, b"a")
    d.write(a, 0, b"old")
    d.fsync(a)
    d.fsyncdir(ROOT)
    t = _file(d, ROOT, b"a.tmp")
    d.write(t, 0, b"new")
    d.fsync(t)
    d.rename(ROOT, b"a.tmp", ROOT, b"a")
    gone = _file(d, ROOT, b"gone")
    d.fsyncdir(ROOT)
    d.remove(ROOT, b"gone", False)  # not synced: comes back
    d.close()
    d = VolatileDisk(tmp_path)
    assert d.read(d.lookup(ROOT, b"a").ino, 0, 10) == b"new"
    assert d.lookup(ROOT, b"gone").ino == gone
    d.commit_names()  # a cut "with names": the unlink reaches the disk, data does not
    d.remove(ROOT, b"gone", False)
    x = _file(d, ROOT, b"x")
    d.write(x, 0, b"data")
    d.commit_names()
    d.close()
    d = VolatileDisk(tmp_path)
    assert b"gone" not in d.node(ROOT).entries and d.lookup(ROOT, b"x").size == 0
    d.close()


# ---------------------------------------------------------------- the daemon on the simulator
needs_fuse = pytest.mark.skipif(usable() is not None, reason=f"power-cut simulator: {usable()}")


class Rig:
    """A daemon whose store root lives on the simulator."""

    def __init__(self, work: Path, durability: str, extra: list[str], shm_size: str | int = 0) -> None:
        self.disk = PowerCutDisk(work / "backing", work / "disk")
        self.d = DaemonProcess(work / "disk" / "store", stripes=2, capacity="4G", shm_size=shm_size,
                               durability=durability, socket=work / "kvfs.sock", log=work / "daemon.log",
                               extra=["--stripe-unit", "128K", "--segment-size", "2M"] + extra)

    def start(self) -> "Rig":
        self.disk.mount()
        self.d.start(timeout=60)
        return self

    def cut(self, names: bool = False) -> None:
        self.disk.cut(names)
        self.d.kill()
        self.d.remove_shm()

    def close(self) -> None:
        if self.d.proc is not None and self.d.proc.poll() is None:
            self.d.kill()
        self.d.remove_shm()
        self.disk.cut()


@pytest.fixture
def rigs(tmp_path):
    made: list[Rig] = []

    def make(durability: str, extra: list[str] | None = None, **kw: object) -> Rig:
        r = Rig(tmp_path / f"r{len(made)}", durability, extra or [], **kw)  # type: ignore[arg-type]
        made.append(r)
        return r
    yield make
    for r in made:
        r.close()


def _vals(n: int, tag: str) -> dict[str, bytes]:
    return {f"{tag}{i}": (f"{tag}{i}:".encode() * 40000)[:300_000 + i] for i in range(n)}


def _one_survivor(s, tag: str) -> tuple[dict[str, bytes], str]:
    """Sync puts over more than a segment (the first is sealed), all but the
    first deleted: its segment is mostly dead, a compaction candidate."""
    filler = _vals(8, tag)
    for k, v in filler.items():
        s.put(k, v, sync=True)
    keep = f"{tag}0"
    s.delete([k for k in filler if k != keep])
    return filler, keep


def _cut_then_all_read_back(r: Rig, vals: dict[str, bytes]) -> None:
    r.cut()
    r.start()
    with r.d.connect() as s:
        assert {k: s.get(k) for k in vals} == vals
        assert s.verify_store(deep=True)["broken_count"] == 0


@needs_fuse
def test_sync_puts_in_a_fresh_store_survive_a_power_cut(rigs):
    """Names: the root, kvfs.json, the index's files and every new segment
    are synced in their directories before a sync put is acknowledged."""
    r = rigs("sync").start()
    vals = _vals(20, "s")  # 6 MB over 2 MiB segments: new segments while putting
    with r.d.connect() as s:
        for k, v in vals.items():
            s.put(k, v)
    r.cut()
    r.start()
    with r.d.connect() as s:
        assert {k: s.get(k) for k in vals} == vals


@needs_fuse
def test_fast_puts_older_than_the_sync_interval_survive_a_power_cut(rigs):
    """Fast mode: the periodic index sync fdatasyncs the segments its
    entries point into first, and a SEALED row waits for that."""
    r = rigs("fast", ["--sync-interval", "0.3"]).start()
    vals = _vals(20, "f")
    with r.d.connect() as s:
        s.put_many(list(vals), list(vals.values()))
    time.sleep(1.5)
    _cut_then_all_read_back(r, vals)


@needs_fuse
def test_a_reclaimed_segment_is_unlinked_only_after_the_index_left_it(rigs):
    """Compaction moves a survivor, the old segment is unlinked; a cut in
    which the unlink reached the disk (ext4's journal commits names on its
    own) must still find the survivor: the index that names its new place,
    and its bytes there, were synced before the unlink."""
    r = rigs("fast", ["--sync-interval", "3600", "--compact-at", "0"]).start()
    with r.d.connect() as s:
        filler, keep = _one_survivor(s, "x")
        rep = s.compact(threshold=0.3)
        assert rep["objects_moved"] >= 1
    r.cut(names=True)
    r.start()
    with r.d.connect() as s:
        assert s.get(keep) == filler[keep]


@needs_fuse
def test_what_recovery_accepted_survives_a_power_cut_after_it(rigs):
    """A killed daemon's fast writes sit in the page cache, where recovery
    checks them; it syncs them before it seals their segments (a SEALED
    segment is never checked again)."""
    r = rigs("fast", ["--sync-interval", "3600"]).start()
    vals = _vals(12, "k")
    with r.d.connect() as s:
        s.put_many(list(vals), list(vals.values()))
    r.d.kill()  # a crash, not a power cut: the simulator keeps what is unsynced
    r.d.start(timeout=60)
    with r.d.connect() as s:
        assert all(s.contains(list(vals)))
    _cut_then_all_read_back(r, vals)


@needs_fuse
def test_rebuild_index_survives_a_power_cut(rigs):
    """kvfs rebuild-index renames its new index into place: the rename is
    synced, or a cut brings back a store with no index (whose segments
    recovery would then remove as orphans)."""
    from kvfsd.rebuild import rebuild_index
    r = rigs("sync").start()
    vals = _vals(6, "r")
    with r.d.connect() as s:
        for k, v in vals.items():
            s.put(k, v)
    r.d.stop()
    shutil.rmtree(r.d.root / "index")
    r.disk.fsync_path(r.d.root)  # the index is gone for good
    rebuild_index(r.d.root)
    r.cut()
    r.start()
    with r.d.connect() as s:
        assert {k: s.get(k) for k in vals} == vals


@needs_fuse
def test_rebuild_index_syncs_what_a_killed_daemon_left_unsynced(rigs):
    """A killed daemon's fast writes sit in the page cache, where
    rebuild-index reads them; it seals every segment, so it syncs them
    first (a SEALED segment is never checked again: a power cut would
    otherwise leave the rebuilt index naming zeros)."""
    from kvfsd.rebuild import rebuild_index
    r = rigs("fast", ["--sync-interval", "3600"]).start()
    vals = _vals(12, "b")
    with r.d.connect() as s:
        s.put_many(list(vals), list(vals.values()))
    r.d.kill()  # a crash: the simulator keeps what is unsynced
    assert rebuild_index(r.d.root).objects == len(vals)
    _cut_then_all_read_back(r, vals)


@needs_fuse
def test_fast_mode_compaction_copies_survive_a_power_cut_while_a_lease_holds_the_old_segment(rigs):
    """Compaction in fast mode moves sync puts; a reader's lease keeps the
    old segment (so no reclaim syncs anything after the move), and later
    commits put the move's commit on disk (MDB_NOMETASYNC). The copies
    must have been synced before that commit: a cut must find the sync put."""
    r = rigs("fast", ["--sync-interval", "3600", "--compact-at", "0"]).start()
    with r.d.connect() as s:
        filler, keep = _one_survivor(s, "y")
        with s.get_views([keep]) as views:  # a lease on the old place
            assert views[0] is not None
            rep = s.compact(threshold=0.3)
            assert rep["objects_moved"] >= 1 and rep["segments_pending_lease"] >= 1, rep
            for i in range(3):  # commits after the move's: its meta page reaches the disk
                s.put(f"later{i}", b"z" * 1000)
            r.cut()
    r.start()
    with r.d.connect() as s:
        assert s.get(keep) == filler[keep]


def test_fast_sync_interval_is_checked():
    from kvfs.errors import InvalidArgument
    from kvfsd.config import Config
    with pytest.raises(InvalidArgument, match="sync interval"):
        Config(root=Path("/nonexistent-kvfs-root"), sync_interval=0).resolve()
    assert os.path.exists("/nonexistent-kvfs-root") is False


@needs_fuse
def test_a_power_cut_inside_an_index_sync_leaves_a_whole_index(rigs):
    """Sync mode: LMDB writes a commit's meta page only after its pages are
    synced (MDB_NOMETASYNC). Here the disk writes the index's lowest dirty
    page first and the power goes mid-sync: with meta and pages synced
    together (MDB_NOSYNC and one fdatasync) that page is the new meta page,
    pointing at pages that never arrived."""
    r = rigs("sync").start()
    first = _vals(4, "a")
    with r.d.connect() as s:
        for k, v in first.items():
            s.put(k, v)
        r.disk.tear_next_fsync("data.mdb")
        with pytest.raises((kvfs.KvfsError, OSError)):
            s.put("b", b"b" * 100_000)  # the power goes under it: never acknowledged
    r.cut()
    r.start()
    with r.d.connect() as s:
        assert {k: s.get(k) for k in first} == first
        assert s.verify_store(deep=True)["broken_count"] == 0


def test_the_index_syncs_pages_before_meta_unless_a_benchmark_turns_it_off(tmp_path, monkeypatch):
    """MDB_NOMETASYNC in every mode; KVFS_UNSAFE_INDEX_NOSYNC=1 (only `kvfs
    bench --durability` sets it, to price the rule) gives MDB_NOSYNC."""
    from kvfsd.index import Index
    monkeypatch.delenv("KVFS_UNSAFE_INDEX_NOSYNC", raising=False)
    idx = Index(tmp_path, 1 << 24)
    assert idx.env.flags()["sync"] is True and idx.env.flags()["metasync"] is False
    idx.close()
    monkeypatch.setenv("KVFS_UNSAFE_INDEX_NOSYNC", "1")
    idx = Index(tmp_path, 1 << 24, name="other")
    assert idx.env.flags()["sync"] is False
    idx.close()
