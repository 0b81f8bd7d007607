"""Online compaction with a real daemon: mostly-dead segments give their
space back, survivors move and read back byte for byte (from fresh clients
and from clients that cached the old locations), readers holding leases
keep the old segment until they are done, and it all survives a restart."""
import json
import os
import subprocess
import sys
import time

from helpers import churning
from kvfsd.testing import DaemonProcess

MiB = 1 << 20


def kvfs_cmd(*args, check=True):
    return subprocess.run([sys.executable, "-m", "kvfstools.cli", *args], capture_output=True, check=check)


def _store(tmp_path, *extra, shm=0):
    return DaemonProcess(tmp_path / "s", stripes=2, capacity="1G", shm_size=shm,
                         extra=["--stripe-unit", "1M", "--segment-size", "4M", *extra])


def _fill_and_thin(s, n=48):
    """n values of ~0.9 MiB (four to a segment), then 3 of every 4 deleted:
    every segment mostly dead, none dead whole."""
    vals = {f"k{i:03d}": os.urandom(900_000 + i) for i in range(n)}
    s.put_many(list(vals), list(vals.values()), ns="c")
    s.flush()
    gone = [k for i, k in enumerate(vals) if i % 4]
    assert s.delete(gone, ns="c") == len(gone)
    return {k: v for k, v in vals.items() if k not in gone}


def test_compaction_frees_mostly_dead_segments(tmp_path):
    d = _store(tmp_path, "--compact-at", "0")
    with d, d.connect() as s:
        left = _fill_and_thin(s)
        for k, v in left.items():
            assert s.get(k, ns="c") == v  # cache the old locations in this client
        before = s.stats()
        assert before["dead_bytes"] > before["live_bytes"]
        old = {k: s.stat(k, ns="c").extents for k in left}
        seen = []
        r = s.compact(threshold=0.5, progress=lambda *a: seen.append(a))
        assert r["segments"] >= 4 and r["objects_moved"] >= len(left) // 2 and r["bytes_reclaimed"] > 0
        assert r["chunks_skipped"] == 0 and r["corrupt_dropped"] == 0 and seen
        after = s.stats()
        assert after["disk_bytes"] < before["disk_bytes"] - 4 * 4 * MiB * 0.5
        assert sum(x["chunks"] for x in after["stripes"]) == len(left)  # moved, counted once
        assert after["counters"]["compactions"] == r["segments"]
        assert sum(s.stat(k, ns="c").extents != old[k] for k in left) == r["objects_moved"]
        for k, v in left.items():
            assert s.get(k, ns="c") == v  # cached locations: stale, never wrong
        with d.connect() as fresh:
            assert fresh.get_many_into(list(left), [bytearray(len(v)) for v in left.values()], ns="c") == \
                [len(v) for v in left.values()]
        clean = s.verify_store(deep=True)
        assert clean["broken_count"] == 0 and clean["orphan_count"] == 0
    with d, d.connect() as s:  # the moves were committed: a restart finds them
        for k, v in left.items():
            assert s.get(k, ns="c") == v


def test_a_reader_keeps_its_segment_until_done_and_writers_go_on(tmp_path):
    d = _store(tmp_path, "--compact-at", "0")
    with d, d.connect() as s:
        left = _fill_and_thin(s)
        key = next(iter(left))

        def step(w, i):
            w.put(f"w{i}", os.urandom(300_000), ns="w")
            if i > 3:
                w.delete([f"w{i - 3}"], ns="w")
            for k in list(left)[i % len(left):][:3]:
                assert w.get(k, ns="c") == left[k]
        with churning(d, step):
            old_path = s.stat(key, ns="c").extents[0][0]
            with s.get_view(key, ns="c") as view:  # a lease on the segment being compacted
                r = s.compact(threshold=0.5)
                assert r["segments_pending_lease"] >= 1
                time.sleep(0.2)
                assert os.path.exists(old_path) and bytes(view) == left[key]
            deadline = time.monotonic() + 10
            while os.path.exists(old_path) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not os.path.exists(old_path)  # gone once the lease ended
        for k, v in left.items():
            assert s.get(k, ns="c") == v


def test_background_compaction(tmp_path, monkeypatch):
    monkeypatch.setenv("KVFS_COMPACT_CHECK_S", "0.2")
    d = _store(tmp_path, "--compact-at", "0.01")
    with d, d.connect() as s:
        left = _fill_and_thin(s)
        deadline = time.monotonic() + 20
        while s.stats()["counters"]["compactions"] == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert s.stats()["counters"]["compactions"] > 0
        for k, v in left.items():
            assert s.get(k, ns="c") == v


def test_cli_compact(tmp_path):
    d = _store(tmp_path, "--compact-at", "0")
    with d, d.connect() as s:
        left = _fill_and_thin(s)
        sock = str(d.socket)
        r = json.loads(kvfs_cmd("compact", "--socket", sock, "--stripe", d.stripes[0], "--json").stdout)
        assert r["segments"] >= 1
        table = kvfs_cmd("compact", "--socket", sock).stdout.decode()
        assert "segments freed" in table and "disk space reclaimed" in table
        r = kvfs_cmd("compact", "--socket", sock, "--stripe", str(tmp_path), check=False)
        assert r.returncode == 2 and b"InvalidArgument" in r.stderr and b"not a stripe" in r.stderr
        r = kvfs_cmd("compact", "--socket", sock, "--threshold", "2", check=False)
        assert r.returncode == 2 and b"InvalidArgument" in r.stderr and b"threshold" in r.stderr
        for k, v in left.items():
            assert s.get(k, ns="c") == v


def _young(s, n=120, keep=20):
    """The issue's store: n values of 1 MiB over 2 stripes, all in the open
    segments of a store far from full; then all but ``keep`` deleted."""
    vals = {f"y{i:03d}": os.urandom(MiB) for i in range(n)}
    s.put_many(list(vals), list(vals.values()), ns="y")
    s.flush()
    gone = list(vals)[keep:]
    assert s.delete(gone, ns="y") == len(gone)
    return {k: vals[k] for k in list(vals)[:keep]}, len(gone) * MiB


def _young_store(tmp_path, *extra):
    # default segment size (1 GiB, at most capacity/16 = 512 MiB): every put lands in an open segment
    return DaemonProcess(tmp_path / "s", stripes=2, capacity="8G", extra=list(extra))


def test_compaction_reaches_open_segments_of_a_young_store(tmp_path):
    d = _young_store(tmp_path, "--compact-at", "0")
    with d, d.connect() as s:
        left, deleted = _young(s)
        before = s.stats()
        assert before["dead_bytes"] >= deleted
        r = s.compact()
        assert r["open_segments_sealed"] == 2 and r["segments"] == 2
        assert r["bytes_reclaimed"] >= 0.8 * deleted, r
        assert s.stats()["disk_bytes"] <= before["disk_bytes"] - 0.8 * deleted
        # what is left is the alignment slack of the survivors' copies, in the new open segments
        assert all(x["open"] and "below the threshold" in x["reason"] for x in r["not_reclaimed"]), r
        assert r["dead_bytes_left"] < 0.01 * deleted
        for k, v in left.items():
            assert s.get(k, ns="y") == v
        s.put("after", b"z" * 100_000, ns="y")  # a fresh open segment took the sealed one's place
        assert s.get("after", ns="y") == b"z" * 100_000
    with d, d.connect() as s:  # the sealed state and the moves survive a restart
        for k, v in left.items():
            assert s.get(k, ns="y") == v


def test_cli_compact_reclaims_a_young_store_and_names_what_it_keeps(tmp_path):
    d = _young_store(tmp_path, "--compact-at", "0")
    with d, d.connect() as s:
        left, deleted = _young(s)
        r = json.loads(kvfs_cmd("compact", "--socket", str(d.socket), "--json").stdout)
        assert r["bytes_reclaimed"] >= 0.8 * deleted and r["open_segments_sealed"] == 2
        # what stays: an open segment below the threshold, and a dead one a reader holds
        s.put_many([f"t{i}" for i in range(10)], [os.urandom(MiB) for _ in range(10)], ns="t")
        s.flush()
        s.delete(["t0", "t1"], ns="t")  # 20% of the new open segments dead
        with s.get_views(["t5"], ns="t") as views:
            assert views[0] is not None
            s.delete([f"t{i}" for i in range(2, 10)], ns="t")
            s.delete(list(left), ns="y")
            # threshold 0.1: the open segments are now all dead; one is held by the view's lease
            r = json.loads(kvfs_cmd("compact", "--socket", str(d.socket), "--threshold", "0.1", "--json").stdout)
            held = [x for x in r["not_reclaimed"] if "lease" in x["reason"]]
            assert held and all(x["dead_share"] == 1.0 for x in held), r["not_reclaimed"]
            table = kvfs_cmd("compact", "--socket", str(d.socket), "--threshold", "0.1").stdout.decode()
            assert "not reclaimed" in table and "lease" in table and "dead bytes left" in table
        s.put_many([f"u{i}" for i in range(10)], [os.urandom(MiB) for _ in range(10)], ns="u")
        s.flush()
        s.delete(["u0", "u1"], ns="u")
        r = s.compact()  # 0.5: the open segments, ~20% dead, stay, and say why
        below = [x for x in r["not_reclaimed"] if x["open"]]
        assert below and all("below the threshold 50%" in x["reason"] for x in below), r["not_reclaimed"]
        assert r["dead_bytes_left"] == sum(x["dead_bytes"] for x in r["not_reclaimed"]) > 0


def test_background_compaction_reaches_open_segments(tmp_path, monkeypatch):
    monkeypatch.setenv("KVFS_COMPACT_CHECK_S", "0.2")
    d = _young_store(tmp_path, "--compact-at", "0.01")  # 1% of 8 GiB: the 100 MiB deleted cross it
    with d, d.connect() as s:
        left, deleted = _young(s)
        bound = 1.05 * len(left) * MiB + 0.2 * deleted  # the survivors, and at most 20% of what was deleted
        deadline = time.monotonic() + 30
        while s.stats()["disk_bytes"] > bound and time.monotonic() < deadline:
            time.sleep(0.2)
        assert s.stats()["disk_bytes"] <= bound
        assert s.stats()["counters"]["compactions"] >= 2
        for k, v in left.items():
            assert s.get(k, ns="y") == v


def test_stats_count_each_compacted_segment_before_its_space_is_freed(tmp_path):
    """The engine, in process: ``compactions`` and ``compacted_bytes`` move
    as each segment goes, never after the run ends, so stats never show a
    segment's space freed by compaction while the compaction is not counted
    (a reader polling disk_bytes then counters saw 0 compactions, in CI)."""
    from kvfsd.config import Config
    from kvfsd.engine import Engine
    eng = Engine(Config(root=tmp_path / "e", capacity=64 << 20, shm_size=0, dir_slots=0).resolve())
    try:
        seg_size = eng.cfg.segment_size
        val = memoryview(os.urandom(256 * 1024))
        keys = [f"k{i}" for i in range(3 * seg_size // len(val))]  # three segments' worth
        for k in keys:
            plan = eng.prepare_put("n", [(k, len(val), None)])
            eng.write_chunks(plan, [(0, 0, val)])
            assert eng.commit_put(plan, False) == [True]
        assert eng.delete("n", [k for i, k in enumerate(keys) if i % 4]) > 0  # 3 of 4 dead everywhere
        seen: list[tuple[int, int, int]] = []  # (usage before, usage after, compactions counted by then)
        reclaim = eng._reclaim

        def watched(segs: list[int]) -> None:
            before = eng.disk_usage()
            reclaim(segs)
            seen.append((before, eng.disk_usage(), eng.counters["compactions"]))
        eng._reclaim = watched  # type: ignore[method-assign]
        counted = eng.counters["compactions"]
        r = eng.compact(threshold=0.5)
        assert r["segments"] >= 3, r
        freed = [n - counted for before, after, n in seen if after < before]
        # every reclaim that freed space came after its segment was counted
        assert freed == list(range(1, len(freed) + 1)) and len(freed) == r["segments"], (seen, r)
        assert eng.counters["compactions"] - counted == r["segments"]
        assert eng.counters["compacted_bytes"] == r["bytes_copied"] > 0
        for k in keys[::4]:
            assert eng.stat("n", k)["size"] == len(val)
    finally:
        eng.close()


def _fast_engine(tmp_path):
    from kvfsd.config import Config
    from kvfsd.engine import Engine
    return Engine(Config(root=tmp_path / "e", capacity=64 << 20, shm_size=0, dir_slots=0, durability="fast").resolve())


def _put_t1(eng, key, val):
    plan = eng.prepare_put("n", [(key, len(val), None)])
    eng.write_chunks(plan, [(0, 0, val)])
    assert eng.commit_put(plan, False) == [True]


def _rows(eng):
    with eng.index.env.begin() as txn:
        return {sid: state for sid, _stripe, state in eng.index.iter_segments(txn)}


def test_a_segment_sealed_before_its_first_row_gets_an_open_row_until_synced(tmp_path):
    """Fast mode, in process: compaction may seal a young open segment before
    any commit wrote its row. That first row must say OPEN (recovery then
    verifies the segment's records) until durable_round has synced the
    segment whole; a SEALED row over unsynced records let a power cut's
    zeros through recovery (the campaign's fast puts read back corrupt)."""
    from kvfsd.compaction import seal_open
    from kvfsd.index import SEG_OPEN, SEG_SEALED
    eng = _fast_engine(tmp_path)
    try:
        val = memoryview(os.urandom(100_000))
        plan = eng.prepare_put("n", [("a", len(val), None)])  # opens the stripe's first segment
        sid = plan.items[0].chunks[0].seg
        assert sid not in _rows(eng)
        with eng._lock:  # sealed while its only record is being written
            eng.seal(eng.segs[sid])
            del eng.open_seg[eng.segs[sid].stripe]
        eng.write_chunks(plan, [(0, 0, val)])
        assert eng.commit_put(plan, False) == [True]
        assert eng.segs[sid].state == SEG_SEALED and _rows(eng)[sid] == SEG_OPEN
        _put_t1(eng, "b", val)  # another commit: still OPEN, nothing synced it
        assert _rows(eng)[sid] == SEG_OPEN
        eng.durable_round()  # synced whole: its SEALED row goes out with the next commit
        _put_t1(eng, "c", val)
        assert _rows(eng)[sid] == SEG_SEALED
        # compaction does not seal a segment whose bytes are only reserved (not dead)
        plan = eng.prepare_put("n", [("d", len(val), None)])
        young = plan.items[0].chunks[0].seg
        assert seal_open(eng, 0.3) == [] and eng.open_seg[eng.segs[young].stripe] == young
        eng.abort_put(plan)
    finally:
        eng.close()


def test_fast_mode_compaction_syncs_its_copies_before_the_index_points_at_them(tmp_path):
    """Fast mode, in process: compaction moves puts that were durable (sync
    puts among them), and with MDB_NOMETASYNC a commit is on disk once the
    next commit syncs LMDB, so the copies are fdatasync'd before the commit
    that points at them, as in sync mode."""
    eng = _fast_engine(tmp_path)
    try:
        seg_size = eng.cfg.segment_size
        val = memoryview(os.urandom(256 * 1024))
        keys = [f"k{i}" for i in range(3 * seg_size // len(val))]
        for k in keys:
            _put_t1(eng, k, val)
        eng.durable_round()
        eng.delete("n", [k for i, k in enumerate(keys) if i % 4])
        events: list[tuple[str, set[int]]] = []
        sync, put_object = eng.sync_segments, eng.index.put_object

        def watched_sync(sids, strict=True):
            done = sync(sids, strict)
            events.append(("synced", set(done)))
            return done

        def watched_put(txn, ns, key, e):
            events.append(("points", {x.seg for x in e.extents}))
            return put_object(txn, ns, key, e)
        eng.sync_segments = watched_sync  # type: ignore[method-assign]
        eng.index.put_object = watched_put  # type: ignore[method-assign]
        r = eng.compact(threshold=0.5)
        assert r["objects_moved"] > 0, r
        synced: set[int] = set()
        pointed = 0
        for what, sids in events:
            if what == "synced":
                synced |= sids
            else:
                assert sids <= synced, (sids, synced)  # every copy it points at was synced first
                pointed += 1
        assert pointed == r["objects_moved"]
        for k in keys[::4]:
            assert eng.stat("n", k)["size"] == len(val)
    finally:
        eng.close()


def test_a_clean_stop_in_fast_mode_leaves_sealed_segments_sealed(tmp_path):
    """Fast mode, in process: the segments sealed since the last durable
    round are synced at close and their SEALED rows go out in the last
    commit, so the next start does not re-check them."""
    from kvfsd.index import SEG_OPEN, SEG_SEALED, Index
    eng = _fast_engine(tmp_path)
    try:
        val = memoryview(os.urandom(256 * 1024))
        for i in range(3 * eng.cfg.segment_size // len(val)):  # seals segments, no durable round yet
            _put_t1(eng, f"k{i}", val)
        with eng._lock:
            sealed = {sid for sid, s in eng.segs.items() if s.state == SEG_SEALED}
            open_now = set(eng.open_seg.values())
        assert sealed and sealed <= eng.seal_pending and all(_rows(eng)[sid] == SEG_OPEN for sid in sealed)
    finally:
        eng.close()
    idx = Index(tmp_path / "e", 1 << 30)
    try:
        with idx.env.begin() as txn:
            rows = {sid: state for sid, _stripe, state in idx.iter_segments(txn)}
    finally:
        idx.close()
    assert {sid: rows[sid] for sid in sealed} == {sid: SEG_SEALED for sid in sealed}
    assert all(rows[sid] == SEG_OPEN for sid in open_now)
