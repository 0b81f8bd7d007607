"""`kvfs verify`: the index checked against the segments and back, online
(through a real daemon, while clients write) and offline (--root), with
real corruption on disk and a real LMDB that lost entries."""
import json
import os
import subprocess
import sys

import lmdb

from helpers import churning, put_and_corrupt
from kvfs import format as fmt
from kvfsd.index import obj_key, segobj_key
from kvfsd.testing import DaemonProcess

MiB = 1 << 20


def kvfs_cmd(*args, check=True):
    return subprocess.run([sys.executable, "-m", "kvfstools.cli", *args], capture_output=True, check=check)


def _store(tmp_path, name="s"):
    return DaemonProcess(tmp_path / name, stripes=2, capacity="1G", extra=["--stripe-unit", "1M"])


def _fill(s, n=30):
    vals = {f"k{i}": os.urandom(1000 * i + (3 * MiB if i % 7 == 0 else 0)) for i in range(n)}
    s.put_many(list(vals), list(vals.values()), ns="v")
    s.flush()
    return vals


def _forget_in_index(root, ns, key):
    """Take an object out of LMDB as a lost index update would: no trace of
    it having been published (unlike a delete)."""
    env = lmdb.open(str(root / "index"), max_dbs=12, subdir=True)
    objects, segobj = env.open_db(b"objects"), env.open_db(b"segobj")
    with env.begin(write=True) as txn:
        raw = txn.pop(obj_key(ns, key), db=objects)
        assert raw is not None
        import msgpack
        for x in msgpack.unpackb(raw, raw=False)[6]:
            txn.delete(segobj_key(x[1], x[5]), db=segobj)
    env.close()


def test_clean_store_deletes_and_evictions_are_not_problems(tmp_path):
    d = _store(tmp_path)
    with d, d.connect() as s:
        vals = _fill(s)
        assert s.delete([f"k{i}" for i in range(10)], ns="v") == 10  # their records stay as dead bytes
        seen = []
        r = s.verify_store(deep=True, progress=lambda *a: seen.append(a))
        assert r["objects"] == 20 and r["broken_count"] == 0 and r["orphan_count"] == 0
        assert r["records"] >= 20 and r["records_bad"] == 0 and r["segments"] >= 1
        assert {p[0] for p in seen} <= {"objects", "segments"}
        for k in list(vals)[10:]:
            assert s.get(k, ns="v") == vals[k]


def test_online_finds_and_repairs_corruption(tmp_path):
    """A flipped payload byte is found by --deep only; a header that no
    longer names its record is found by the cheap pass too; --repair drops
    both; nothing else is touched."""
    d = _store(tmp_path)
    with d, d.connect() as s:
        vals = _fill(s)
        put_and_corrupt(s, "rot", "v", 2 * MiB, 777)
        path, off, _n = s.stat("k5", ns="v").extents[0]
        hdr_off = (off - (fmt.HEADER_SIZE + len("v") + len("k5"))) // 8 * 8
        fd = os.open(path, os.O_RDWR)
        os.pwrite(fd, b"X", hdr_off + fmt.HEADER_SIZE + 1)  # the key's first byte in the header
        os.close(fd)
        cheap = s.verify_store()
        assert cheap["broken_count"] == 1 and cheap["broken"][0][:2] == ["v", "k5"]
        deep = s.verify_store(deep=True)
        assert sorted(b[1] for b in deep["broken"]) == ["k5", "rot"]
        assert any("payload checksum mismatch" in b[2] for b in deep["broken"])
        fixed = s.verify_store(deep=True, repair=True)
        assert fixed["repaired_dropped"] == 2
        assert s.contains(["k5", "rot"], ns="v") == [False, False]
        again = s.verify_store(deep=True)
        assert again["broken_count"] == 0 and again["orphan_count"] == 0
        for k, v in vals.items():
            if k != "k5":
                assert s.get(k, ns="v") == v
    r = kvfs_cmd("verify", "--root", str(d.root), "--deep", "--json")  # offline agrees once stopped
    rep = json.loads(r.stdout)
    assert rep["mode"] == "offline" and rep["broken_count"] == 0 and rep["objects"] == len(vals) - 1


def test_orphans_offline_and_online(tmp_path):
    """An intact value the index lost is an orphan: offline --repair
    indexes it in place, online --repair stores it again; both read back
    byte for byte."""
    d = _store(tmp_path)
    with d, d.connect() as s:
        vals = _fill(s)
    _forget_in_index(d.root, "v", "k7")  # 3 MiB + 7000: several chunks on two stripes
    _forget_in_index(d.root, "v", "k3")
    r = kvfs_cmd("verify", "--root", str(d.root), "--json", check=False)
    rep = json.loads(r.stdout)
    assert r.returncode == 1 and rep["orphan_count"] == 2 and sorted(o[1] for o in rep["orphans"]) == ["k3", "k7"]
    rep = json.loads(kvfs_cmd("verify", "--root", str(d.root), "--repair", "--json").stdout)
    assert rep["repaired_indexed"] == 2
    with d, d.connect() as s:
        assert s.get("k7", ns="v") == vals["k7"] and s.get("k3", ns="v") == vals["k3"]
        assert s.stat("k7", ns="v").size == len(vals["k7"])
    _forget_in_index(d.root, "v", "k14")
    with d, d.connect() as s:
        assert s.contains(["k14"], ns="v") == [False]
        r = s.verify_store(repair=True)
        assert r["orphan_count"] == 1 and r["repaired_indexed"] == 1
        assert s.get("k14", ns="v") == vals["k14"]
        assert s.verify_store()["orphan_count"] == 0  # its old records are dead now, not orphans


def test_online_verify_under_writes_and_deletes_reports_nothing_false(tmp_path):
    """Puts straight to T1 (no T0: records are written, then published)
    and deletes run all along; a record being written is not an orphan, an
    object deleted meanwhile is not broken."""
    d = DaemonProcess(tmp_path / "s", stripes=2, capacity="1G", shm_size=0, extra=["--stripe-unit", "1M"])
    with d, d.connect() as s:
        _fill(s, 10)

        def step(w, i):
            w.put_many([f"c{i}-{j}" for j in range(5)], [os.urandom(100_000 + 150_000 * j) for j in range(5)],
                       ns="churn")
            if i >= 2:
                w.delete([f"c{i - 2}-{j}" for j in range(5)], ns="churn")
        with churning(d, step):
            for _ in range(15):
                r = s.verify_store(deep=True)
                assert r["broken_count"] == 0 and r["orphan_count"] == 0, r


def test_cli_verify(tmp_path):
    d = _store(tmp_path)
    with d, d.connect() as s:
        _fill(s, 5)
        sock = str(d.socket)
        r = kvfs_cmd("verify", "--socket", sock, "--deep")
        assert r.returncode == 0 and b"broken objects" in r.stdout and b"online, deep" in r.stdout
        put_and_corrupt(s, "bad", "v", MiB, 5)
        r = kvfs_cmd("verify", "--socket", sock, "--deep", check=False)
        assert r.returncode == 1 and b"broken  v/bad: chunk 0: payload checksum mismatch" in r.stdout
        r = kvfs_cmd("verify", "--root", str(d.root), check=False)
        assert r.returncode == 2 and b"in use by a kvfs daemon" in r.stderr


def test_a_put_being_written_is_not_an_orphan(tmp_path):
    """The daemon's engine, in process, with a real LMDB and segment files:
    a record on disk whose put has not committed yet is no orphan (the
    reservation says it is being written); once committed it is an
    object; the same bytes left by an aborted put are an orphan."""
    from kvfsd.config import Config
    from kvfsd.engine import Engine
    eng = Engine(Config(root=tmp_path / "e", capacity=1 << 30, shm_size=0, dir_slots=0).resolve())
    try:
        val = memoryview(os.urandom(300_000))
        plan = eng.prepare_put("n", [("k", len(val), None)])
        eng.write_chunks(plan, [(0, 0, val)])  # on disk, not published
        r = eng.verify_store(deep=True)
        assert r["records"] == 1 and r["orphan_count"] == 0
        assert eng.commit_put(plan, False) == [True]
        r = eng.verify_store(deep=True)
        assert r["objects"] == 1 and r["orphan_count"] == 0 and r["broken_count"] == 0
        plan = eng.prepare_put("n", [("gone", len(val), None)])
        eng.write_chunks(plan, [(0, 0, val)])
        eng.abort_put(plan)
        r = eng.verify_store(deep=True)
        assert r["orphan_count"] == 1 and r["orphans"][0][:2] == ["n", "gone"]
    finally:
        eng.close()


def test_each_commit_writes_the_rows_of_changed_segments_only(tmp_path):
    """The engine, in process: a segment opened or sealed is owed a row in
    LMDB's segments table until a commit writes it; a commit writes those
    only (not a scan of every segment), so after it the index holds every
    segment in its state and nothing is owed. In fast mode a sealed segment
    keeps its OPEN row (recovery verifies it) until the index sync's
    durable round has synced it whole."""
    from kvfsd.config import Config
    from kvfsd.engine import Engine
    from kvfsd.index import SEG_OPEN, SEG_SEALED
    eng = Engine(Config(root=tmp_path / "e", capacity=64 << 20, shm_size=0, dir_slots=0).resolve())
    try:
        seg_size = eng.cfg.segment_size  # capacity / 16 at most: a few MiB here
        val = memoryview(os.urandom(256 * 1024))
        for i in range(3 * seg_size // len(val)):  # fills segments: they are sealed and new ones opened
            plan = eng.prepare_put("n", [(f"k{i}", len(val), None)])
            eng.write_chunks(plan, [(0, 0, val)])
            assert eng.commit_put(plan, False) == [True]
            with eng._lock:
                owed = set(eng.unpersisted)
            assert owed == {sid for sid, s in eng.segs.items() if not s.persisted}
            assert len(owed) <= len(eng.cfg.stripes)  # at most what the last put opened or sealed
        with eng.index.env.begin() as txn:
            rows = {sid: state for sid, _stripe, state in eng.index.iter_segments(txn)}
        states = {sid: s.state for sid, s in eng.segs.items()}
        assert len(states) > 2 * len(eng.cfg.stripes) and SEG_SEALED in states.values() and SEG_OPEN in states.values()
        owed = eng.unpersisted
        pending = set(eng.seal_pending)
        assert pending and all(rows[sid] == SEG_OPEN and states[sid] == SEG_SEALED for sid in pending)
        assert {sid: st for sid, st in rows.items() if sid not in owed | pending} == {
            sid: st for sid, st in states.items() if sid not in owed | pending}
        eng.durable_round()  # synced whole: their SEALED rows go out with the next commit
        assert not eng.seal_pending and pending <= eng.unpersisted
        eng.writer.call(eng._persist_segments)
        with eng.index.env.begin() as txn:
            rows = {sid: state for sid, _stripe, state in eng.index.iter_segments(txn)}
        assert all(rows[sid] == SEG_SEALED for sid in pending)
    finally:
        eng.close()
