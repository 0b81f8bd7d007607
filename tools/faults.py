"""The fault campaign (`kvfs faults`): real daemons, real files, real kills.

Each scenario returns its figures and the invariants it checked
(``ok``: every one held; ``failures``: what did not). Scenarios:

  crash      kill -9 at random moments under 4 clients (sync puts, fast
             puts, puts+deletes, reads), compaction running; after every
             restart: each acknowledged sync put reads back identical, no
             read ever returned wrong bytes; recovery time per cycle and
             the fast puts lost are counted
  diskfull   a stripe on a small tmpfs (root only): puts fail with a clear
             CapacityError, the daemon stays up, what is stored stays
             readable, deletes give the space back
  corrupt    bit flips in payloads, record headers and the index file:
             never served, found by verify, repaired by verify --repair
             or rebuild-index
  fuzz       random frames and argument combinations at the socket (and
             bad names and operations at the mount, where FUSE works):
             the daemon survives and keeps its data; inputs counted
  deadclient a client killed -9 while holding leases and views: leases
             come back, compaction frees the segment
  load       8 client processes of mixed operations: throughput, p99,
             zero errors, zero wrong bytes
  powercut   power cuts (not kills) under the crash loop's load, per
             durability mode, on the test kit's power-cut simulator
             (kvfstools.faults_powercut)
"""
from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import msgpack

from .bench_util import env_set as _env
from .fault_worker import NS, value_of

MiB = 1 << 20


class _Workers:
    """Client processes (kvfstools.fault_worker) and what they reported."""

    def __init__(self, sock: Path, roles: list[str], seed: int, seconds: float | None = None) -> None:
        self.lines: list[str] = []
        self.procs = []
        self.readers = []
        for i, role in enumerate(roles):
            argv = [sys.executable, "-m", "kvfstools.fault_worker", str(sock), role, str(i), str(seed)]
            if seconds is not None:
                argv.append(str(seconds))
            p = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
            t = threading.Thread(target=self._read, args=(p,), daemon=True)
            t.start()
            self.procs.append(p)
            self.readers.append(t)

    def _read(self, p: subprocess.Popen[str]) -> None:
        assert p.stdout is not None
        for line in p.stdout:
            self.lines.append(line.strip())

    def wait(self, timeout: float = 120) -> list[int]:
        codes = [p.wait(timeout) for p in self.procs]
        for t in self.readers:
            t.join(timeout)
        return codes

    def keys(self, tag: str) -> list[str]:
        return [line.split(" ")[1] for line in self.lines if line.startswith(tag + " ")]

    def acks(self, tag: str) -> list[tuple[str, float]]:
        """(key, when) of each ``ack-sync``/``ack-fast`` line."""
        return [(f[1], float(f[2])) for f in (line.split(" ") for line in self.lines if line.startswith(tag + " "))]


def _check(failures: list[str], cond: bool, what: str) -> None:
    if not cond:
        failures.append(what)


def _read_back(s: Any, keys: list[str]) -> tuple[int, int]:
    """(wrong, missing) among ``keys`` read back through ``s``."""
    import kvfs
    wrong = missing = 0
    for k in keys:
        try:
            wrong += s.get(k, ns=NS) != value_of(k)
        except kvfs.NotFound:
            missing += 1
    return wrong, missing


def _compact_quietly(sock: Path, done: list[int]) -> None:
    """A compaction started under load; ``done`` gets its freed segments
    if it finished before the kill."""
    import kvfs
    time.sleep(0.3)
    try:
        with kvfs.connect(sock) as s:
            done.append(s.compact(threshold=0.05)["segments"])
    except (kvfs.KvfsError, OSError):
        pass  # killed under it


# ------------------------------------------------------------------ crash loop
def crash_loop(work: Path, cycles: int = 20, seed: int = 1) -> dict[str, Any]:
    from kvfsd.testing import DaemonProcess

    rng = random.Random(seed)
    failures: list[str] = []
    sync_acked: list[str] = []
    fast_acked: list[str] = []
    last_fast: list[str] = []  # acknowledged in the cycle the last kill ended
    maybe_deleted: set[str] = set()
    compacted: list[int] = []  # segments freed by the compactions that finished before their kill
    recovery: list[float] = []
    startup: list[float] = []
    wrong = lost_sync = lost_fast = checked = 0
    with _env(KVFS_COMPACT_CHECK_S="0.5"):
        # room for everything the clients write (an eviction would be a loss
        # by design, not by crash); values are cut in 128 KiB chunks over 2 stripes
        d = DaemonProcess(work / "crash", stripes=2, capacity="64G", shm_size="128M",
                          extra=["--stripe-unit", "128K", "--segment-size", "16M", "--compact-at", "0.0002",
                                 "--compact-threshold", "0.3"])
        try:
            for cycle in range(cycles + 1):
                t = time.monotonic()
                d.start(timeout=120)
                startup.append(time.monotonic() - t)
                with d.connect() as s:
                    recovery.append(s.stats()["recovery"]["seconds"])
                    # every sync put acknowledged so far, and the fast ones of the last cycle
                    fast = [k for k in last_fast if k not in maybe_deleted]
                    for keys, lost in ((sync_acked, "sync"), (fast, "fast")):
                        bad, missing = _read_back(s, keys)
                        wrong += bad
                        checked += len(keys)
                        if lost == "sync":
                            lost_sync += missing
                        else:
                            lost_fast += missing
                if cycle == cycles:
                    break
                w = _Workers(d.socket, ["sync", "fast", "churn", "fast"], seed + cycle)
                compactor = threading.Thread(target=_compact_quietly, args=(d.socket, compacted), daemon=True)
                compactor.start()  # an explicit compaction too, often cut by the kill
                time.sleep(rng.uniform(0.5, 2.0))
                d.kill()
                w.wait()
                compactor.join(30)
                wrong += len(w.keys("bad"))
                sync_acked += w.keys("ack-sync")
                last_fast = w.keys("ack-fast")
                fast_acked += last_fast
                maybe_deleted.update(w.keys("del?"))
            with d.connect() as s:
                counters = s.stats()["counters"]
                ver = s.verify_store(deep=True)
            d.stop()
        finally:
            if d.proc is not None and d.proc.poll() is None:
                d.kill()
    _check(failures, counters["evictions"] == 0, "objects were evicted: give the campaign more capacity")
    _check(failures, lost_sync == 0, f"{lost_sync} acknowledged sync puts lost")
    _check(failures, wrong == 0, f"{wrong} reads returned wrong bytes")
    _check(failures, ver["broken_count"] == 0, f"verify found {ver['broken_count']} broken objects")
    return {"ok": not failures, "failures": failures, "cycles": cycles, "sync_acked": len(sync_acked),
            "fast_acked": len(fast_acked), "reads_checked": checked, "sync_lost": lost_sync, "fast_lost": lost_fast,
            "wrong_bytes": wrong, "compactions_finished": len(compacted),
            "segments_compacted": sum(compacted), "orphans_after": ver["orphan_count"],
            "recovery_s": {"min": min(recovery), "median": statistics.median(recovery), "max": max(recovery)},
            "restart_s": {"min": min(startup), "median": statistics.median(startup), "max": max(startup)}}


# ------------------------------------------------------------------ disk full
def disk_full(work: Path) -> dict[str, Any]:
    """A stripe on a 48 MiB tmpfs, and a capacity far beyond it: the disk,
    not the capacity, runs out."""
    from kvfsd.testing import DaemonProcess

    import kvfs
    if os.geteuid() != 0:
        return {"ok": None, "skipped": "needs root to mount a small tmpfs"}
    failures: list[str] = []
    mnt = work / "tiny"
    mnt.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mnt)], check=True)
    d = DaemonProcess(work / "df", stripes=[str(mnt / "stripe0")], capacity="1G", shm_size=0,
                      extra=["--segment-size", "8M"])
    try:
        d.start()
        stored: list[str] = []
        error = ""
        with d.connect() as s:
            for i in range(200):
                k = f"fill{i}"
                try:
                    s.put(k, value_of(k) + bytes(MiB), ns=NS)  # ~1-3 MiB each
                    stored.append(k)
                except kvfs.CapacityError as e:
                    error = str(e)
                    break
            _check(failures, bool(error), "the tmpfs never filled")
            _check(failures, "disk full" in error or "No space" in error, f"unclear error: {error!r}")
            st = s.stats()  # still serving
            wrong = sum(s.get(k, ns=NS) != value_of(k) + bytes(MiB) for k in stored)
            _check(failures, wrong == 0, f"{wrong} stored objects read back wrong after the disk filled")
            s.delete(stored, ns=NS)
            again = s.put("after", value_of("after"), ns=NS)
            _check(failures, again and s.get("after", ns=NS) == value_of("after"), "no room after deletes")
        d.stop()
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.kill()
        subprocess.run(["umount", "-l", str(mnt)], check=False)
    return {"ok": not failures, "failures": failures, "stored_before_full": len(stored), "error": error,
            "segments_then": st["segments"]}


# ------------------------------------------------------------------ corruption
def _flip(path: str, off: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, bytes([os.pread(fd, 1, off)[0] ^ 0x5A]), off)
    finally:
        os.close(fd)


def corruption(work: Path, seed: int = 3) -> dict[str, Any]:
    from kvfs import format as fmt
    from kvfsd.rebuild import rebuild_index
    from kvfsd.testing import DaemonProcess

    import kvfs
    rng = random.Random(seed)
    failures: list[str] = []
    d = DaemonProcess(work / "corrupt", stripes=2, capacity="1G", shm_size=0,
                      extra=["--stripe-unit", "128K", "--segment-size", "2M", "--compact-at", "0"])
    keys = [f"obj{i}" for i in range(60)]
    with d, d.connect() as s:
        s.put_many(keys, [value_of(k) for k in keys], ns=NS)
        where = {k: s.stat(k, ns=NS).extents for k in keys}
    # payload flips, then header flips (different objects)
    victims = rng.sample(keys, 15)
    for k in victims[:10]:
        path, off, n = rng.choice(where[k])
        _flip(path, off + rng.randrange(n))
    for k in victims[10:]:
        path, off, _n = where[k][0]
        hdr_off = (off - fmt.HEADER_SIZE - len(NS) - len(k)) // 8 * 8
        _flip(path, hdr_off + rng.randrange(fmt.HEADER_SIZE))
    with d, d.connect() as s:
        # recovery re-verifies the records of segments that were open, and
        # drops what fails; verify finds the rest before any read trips on it
        dropped_at_start = {k for k, there in zip(keys, s.contains(keys, ns=NS)) if not there}
        ver = s.verify_store(deep=True)
        detected = dropped_at_start | {b[1] for b in ver["broken"]}
        _check(failures, detected == set(victims),
               f"recovery and verify found {len(detected & set(victims))} of {len(victims)} corrupted objects"
               + (f" and {len(detected - set(victims))} healthy ones" if detected - set(victims) else ""))
        served_wrong = not_served = 0
        refused: set[str] = set()
        for k in keys:
            try:
                if s.get(k, ns=NS) != value_of(k):
                    served_wrong += 1
            except kvfs.NotFound:
                refused.add(k)
        not_served = len(refused)
        _check(failures, served_wrong == 0, f"{served_wrong} corrupted objects served")
        # a flipped payload is never served; a flipped header over an intact
        # payload may be (the bytes are right), verify reports it either way
        _check(failures, set(victims[:10]) <= refused, "an object with a flipped payload was not refused")
        s.verify_store(deep=True, repair=True)  # what the reads did not already drop
        after = s.verify_store(deep=True)
        _check(failures, after["broken_count"] == 0, "verify --repair left broken objects")
    # the index file itself
    data = d.root / "index" / "data.mdb"
    size = data.stat().st_size
    # every page but LMDB's two meta pages: whatever the live tree is, it is hit
    pages = list(range(2, size // 4096))
    fd = os.open(data, os.O_RDWR)
    try:
        for pg in pages:  # whole pages of garbage past the two meta pages
            os.pwrite(fd, os.urandom(4096), pg * 4096)
    finally:
        os.close(fd)
    index_path = "started on the damaged index"
    try:
        d.start(timeout=30)
        with d.connect() as s:
            bad = s.verify_store(deep=True, repair=True)
            index_path += f"; verify --repair dropped {bad['repaired_dropped']}, indexed {bad['repaired_indexed']}"
            wrong = 0
            for k in keys:
                with contextlib.suppress(kvfs.NotFound):
                    wrong += s.get(k, ns=NS) != value_of(k)
            _check(failures, wrong == 0, f"{wrong} objects served wrong from the damaged index")
        d.stop()
    except RuntimeError as e:  # the daemon would not start
        log = str(e)
        _check(failures, "kvfs rebuild-index --root" in log, "the daemon did not say how to repair its index")
        index_path = "the daemon refused the damaged index and named kvfs rebuild-index"
        if d.proc is not None and d.proc.poll() is None:
            d.kill()
    except (kvfs.KvfsError, OSError) as e:
        index_path += f"; then the daemon failed ({type(e).__name__}: {str(e).splitlines()[0][:60]})"
        if d.proc is not None and d.proc.poll() is None:
            d.kill()
    rep = rebuild_index(d.root)
    index_path += f"; rebuild-index: {rep.objects} objects"
    healthy = [k for k in keys if k not in victims]
    with d, d.connect() as s:
        got = 0
        for k in keys:
            try:
                v = s.get(k, ns=NS)
            except kvfs.NotFound:
                continue
            _check(failures, v == value_of(k), f"{k} served wrong after the index repair")
            got += 1
        missing = [k for k in healthy if not s.contains([k], ns=NS)[0]]
        _check(failures, not missing, f"{len(missing)} healthy objects lost by the index repair")
    return {"ok": not failures, "failures": failures, "objects": len(keys), "payload_flips": 10, "header_flips": 5,
            "dropped_by_recovery": len(dropped_at_start), "verify_found": ver["broken_count"], "served_wrong": served_wrong, "refused": not_served,
            "left_after_repair": after["broken_count"], "index_pages_garbled": len(pages), "index": index_path,
            "readable_after": got}


# ------------------------------------------------------------------ fuzz
def _frame(op: str, args: Any, rid: int) -> bytes:
    from kvfs import protocol as P
    body = msgpack.packb([rid, op, args], use_bin_type=True)
    return struct.pack("<4sIQ", P.MAGIC, len(body), 0) + body


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    r = rng.random()
    if depth < 2 and r < 0.15:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if depth < 2 and r < 0.25:
        return {rng.choice(["ns", "keys", "key", "x"]): _random_value(rng, depth + 1) for _ in range(rng.randrange(3))}
    return rng.choice([None, True, False, rng.randrange(-2**63, 2**63), rng.random() * 1e6, "",
                       "k" * rng.randrange(300), "bad/ns", "\x00", b"\xff" * rng.randrange(40), -1, 2**64 - 1])


def fuzz(work: Path, seconds: float = 60.0, seed: int = 5) -> dict[str, Any]:
    from kvfs import protocol as P
    from kvfsd.testing import DaemonProcess
    rng = random.Random(seed)
    failures: list[str] = []
    names = ["ns", "keys", "key", "items", "lease", "leases", "put", "sums", "sync", "limit", "after", "seq",
             "long", "deep", "repair", "threshold", "stripe", "id", "timeout"]
    ops = sorted(P.OPS - {P.PUT, P.EVICT}) + ["bogus"]  # evict is an admin op that empties by design
    tried = 0
    d = DaemonProcess(work / "fuzz", capacity="512M")
    with d, d.connect() as s:
        s.put("canary", value_of("canary"), ns="keep")
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
                c.connect(str(d.socket))
                c.settimeout(10)
                try:
                    for _ in range(rng.randrange(1, 20)):
                        tried += 1
                        if rng.random() < 0.1:
                            c.sendall(os.urandom(rng.randrange(1, 64)))  # garbage: answered or closed
                            break
                        args = {rng.choice(names): _random_value(rng) for _ in range(rng.randrange(5))}
                        c.sendall(_frame(rng.choice(ops), args, rng.randrange(1, 2**31)))
                        head = c.recv(16)
                        if not head:
                            break
                        (_m, mlen, tlen) = struct.unpack("<4sIQ", head)
                        while mlen > 0:
                            chunk = c.recv(min(mlen, 1 << 16))
                            if not chunk:
                                break
                            mlen -= len(chunk)
                except (socket.timeout, OSError):
                    pass
        mount_tried = _fuzz_mount(work, d) if _fuse_ok() else 0
        _check(failures, s.get("canary", ns="keep") == value_of("canary"), "the canary changed")
        st = s.stats()
        _check(failures, st["objects"] >= 1, "the daemon lost its objects")
    return {"ok": not failures, "failures": failures, "frames_tried": tried, "seconds": seconds,
            "mount_operations_tried": mount_tried}


def _fuse_ok() -> bool:
    try:
        import pyfuse3  # noqa: F401
    except ImportError:
        return False
    return os.path.exists("/dev/fuse") and os.geteuid() == 0


def _fuzz_mount(work: Path, _d: Any) -> int:
    """Bad names and operations against a mount of its own daemon."""
    from kvfsd.testing import DaemonProcess
    mnt = work / "mnt"
    mnt.mkdir(exist_ok=True)
    tried = 0
    m = DaemonProcess(work / "fuzzmount", capacity="256M", mount=mnt)
    with m:
        (mnt / "ns1").mkdir()
        (mnt / "ns1" / "ok").write_bytes(b"x" * 1000)
        attempts: list[Callable[[], Any]] = [
            lambda: (mnt / ("n" * 300)).mkdir(),
            lambda: (mnt / "ns1" / ("k" * 300)).write_bytes(b"x"),
            lambda: (mnt / "ns1" / "ok").write_bytes(b"overwrite"),
            lambda: os.rename(mnt / "ns1" / "ok", mnt / "ns1" / "moved"),
            lambda: (mnt / "toplevel-file").write_bytes(b"x"),
            lambda: os.rmdir(mnt / "ns1"),
            lambda: os.truncate(mnt / "ns1" / "ok", 10),
            lambda: os.symlink("ok", mnt / "ns1" / "link"),
            lambda: os.link(mnt / "ns1" / "ok", mnt / "ns1" / "hard"),
            lambda: os.mknod(mnt / "ns1" / "fifo", 0o600 | 0o010000),
            lambda: open(mnt / ".kvfs" / "stats", "w").write("x"),
        ]
        for fn in attempts:
            tried += 1
            with contextlib.suppress(OSError):
                fn()
        assert (mnt / "ns1" / "ok").read_bytes() == b"x" * 1000
    return tried


# ------------------------------------------------------------------ dead clients
_HOLDER = """
import sys, time, kvfs
s = kvfs.connect(sys.argv[1])
with s.get_views([f"d{i}" for i in range(8)], ns="dead") as views:
    assert all(v is not None for v in views)
    print("holding", flush=True)
    time.sleep(600)
"""


def dead_client(work: Path) -> dict[str, Any]:
    from kvfsd.testing import DaemonProcess
    failures: list[str] = []
    d = DaemonProcess(work / "dead", stripes=1, capacity="1G", shm_size=0,
                      extra=["--segment-size", "8M", "--compact-at", "0", "--lease-timeout", "600"])
    with d, d.connect() as s:
        keys = [f"d{i}" for i in range(40)]
        s.put_many(keys, [value_of(k) for k in keys], ns="dead")
        p = subprocess.Popen([sys.executable, "-c", _HOLDER, str(d.socket)], stdout=subprocess.PIPE, text=True)
        assert p.stdout is not None
        _check(failures, p.stdout.readline().strip() == "holding", "the holder did not start")
        held = s.stats()["leases"]
        s.delete(keys[:8] + keys[16:], ns="dead")  # the held ones' segments are now mostly dead
        pending = s.compact(threshold=0.3)["segments_pending_lease"]
        p.send_signal(signal.SIGKILL)
        p.wait()
        t = time.monotonic()
        while s.stats()["leases"] and time.monotonic() - t < 10:
            time.sleep(0.05)
        reclaim_s = time.monotonic() - t
        _check(failures, s.stats()["leases"] == 0, "the dead client's leases were not released")
        t2 = time.monotonic()
        while s.stats()["dead_bytes"] > 8 * MiB and time.monotonic() - t2 < 10:
            time.sleep(0.05)
        after = s.stats()
        _check(failures, after["dead_bytes"] <= 8 * MiB, "the compacted segments stayed after the leases ended")
        _check(failures, all(s.get(k, ns="dead") == value_of(k) for k in keys[8:16]), "survivors read wrong")
    return {"ok": not failures, "failures": failures, "leases_held": held, "segments_waiting": pending,
            "leases_released_s": reclaim_s, "dead_bytes_after": after["dead_bytes"]}


# ------------------------------------------------------------------ load
def load(work: Path, seconds: float = 60.0, clients: int = 8, seed: int = 7) -> dict[str, Any]:
    from kvfsd.testing import DaemonProcess
    failures: list[str] = []
    d = DaemonProcess(work / "load", stripes=2, capacity="4G", shm_size="512M")
    with d:
        w = _Workers(d.socket, ["load"] * clients, seed, seconds)
        codes = w.wait(seconds + 120)
        with d.connect() as s:
            st = s.stats()
    lat: dict[str, list[float]] = {}
    for line in w.lines:
        if line.startswith("op "):
            _o, name, sec = line.split()
            lat.setdefault(name, []).append(float(sec))
    done = len(w.keys("done"))
    bad = len(w.keys("bad"))
    downs = len(w.keys("down"))
    _check(failures, bad == 0, f"{bad} wrong bytes")
    _check(failures, downs == 0 and done == clients and codes == [0] * clients, f"{clients - done} clients failed")
    total = sum(len(v) for v in lat.values())

    def pct(v: list[float], q: float) -> float:
        v = sorted(v)
        return v[min(len(v) - 1, int(q * len(v)))] if v else 0.0
    return {"ok": not failures, "failures": failures, "clients": clients, "seconds": seconds, "operations": total,
            "ops_per_s": total / seconds, "put_gb": st["counters"]["put_bytes"] / 1e9, "wrong_bytes": bad,
            "errors": clients - done,
            "latency": {op: {"count": len(v), "p50_ms": pct(v, 0.5) * 1e3, "p99_ms": pct(v, 0.99) * 1e3}
                        for op, v in sorted(lat.items())}}


def power_cut(work: Path, **kw: Any) -> dict[str, Any]:
    from .faults_powercut import power_cut as run_cuts  # it builds on this module
    return run_cuts(work, **kw)


SCENARIOS: dict[str, Callable[..., dict[str, Any]]] = {
    "crash": crash_loop, "diskfull": disk_full, "corrupt": corruption, "fuzz": fuzz,
    "deadclient": dead_client, "load": load, "powercut": power_cut}


def run(work: Path, only: list[str] | None = None, quick: bool = False,
        report: Callable[[str, dict[str, Any]], None] | None = None, keep_logs: bool = False) -> dict[str, Any]:
    """Run the scenarios (all, or ``only``); ``quick``: short versions.
    ``keep_logs``: each scenario's daemon logs stay in ``work/logs/NAME``
    (its stores and disks are removed either way: they can be GBs)."""
    kw: dict[str, dict[str, Any]] = {"crash": {"cycles": 3 if quick else 20}, "fuzz": {"seconds": 5 if quick else 60},
                                     "load": {"seconds": 5 if quick else 60}, "powercut": {"cuts": 3 if quick else 20}}
    out = {}
    for name in only or list(SCENARIOS):
        sub = work / name
        sub.mkdir(parents=True, exist_ok=True)
        t = time.monotonic()
        try:
            res = SCENARIOS[name](sub, **kw.get(name, {}))
        finally:
            if keep_logs:
                _keep_logs(sub, work / "logs" / name)
            shutil.rmtree(sub, ignore_errors=True)
        res["wall_s"] = time.monotonic() - t
        out[name] = res
        if report is not None:
            report(name, res)
    return out


def _keep_logs(sub: Path, dest: Path) -> None:
    for log in sub.rglob("*.log"):
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(log, dest / "-".join(log.relative_to(sub).parts))
