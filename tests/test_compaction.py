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
