"""`kvfs bench --puts`: what a put costs, one by one and in batches, with
the physical baselines of the same bytes in the same run.

- one 64 KiB put after another (1000 of them): latency p50/p99 and the
  client's own CPU time per put, waiting for the daemon's answer
  (``wait=True``, the default) and not (``wait=False``: the bytes are in
  the arena and the batch sent);
- batches of 64 x 64 KiB through ``put_many`` until ``flush`` (written back
  to T1): objects/s and GB/s, both ways;
- the daemon's time in its ``put_t0`` handler per object (its request
  histogram), and the whole daemon's CPU time per object (its /proc stat),
  user and system apart: the system part is mostly the kernel copying the
  bytes into the page cache, which the raw ``pwrite`` row's system time
  per object (same bytes, same run) bounds from below;
- a request that does nothing (``contains`` of one key): its round trip is
  the floor of any put that waits for its answer;
- the waited puts and the round trip again against a daemon that does not
  poll for requests (``--poll-us 0``) from a client that does not poll for
  answers (``KVFS_POLL_US=0``): what polling saves, in the same run;
- the daemon's per-object work taken apart phase by phase, in-process
  (kvfstools.bench_phases);
- memcpy of the same bytes into a preallocated buffer and raw ``pwrite`` of
  them to a file on the same disk, for the ratios;
- processes: ``put_many`` of 64 x 64 KiB, each answered, from 1, 2 and
  (with 8 cores or more) 4 processes at once against one daemon: objects/s
  in all until the last answer (what the daemon commits to T0) and until
  ``flush`` (written back: the disk's rate bounds it, the raw ``pwrite``
  row), each against one process, with the daemon's CPU time per object;
- sustained: ``put_many`` of 1 MiB values, ``wait=False``, 4 x the arena
  of a second daemon (so the write-back, not the arena, must keep up),
  until ``flush``, against raw ``pwrite`` of the same bytes to files on the
  same stripes (one thread per stripe, no fsync: fast mode does not sync
  either; run before and after, the faster one counts); with the longest ``put_many`` call, which shows whether a put
  ever waited on the write-back; and what every byte through the arena
  costs on these cores: each batch copied and hashed into memory (the
  client's copy into the arena), then written from there (the
  write-back), on the same threads. (Not a bound on the kvfs row: while
  the arena is full a batch goes to T1 directly, with no copy.)
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .bench_util import clean_up, commit, work_dirs
from .table import render

VALUE = 64 * 1024
BATCH = 64


def _cpu_s(pid: int, tid: int | None = None) -> tuple[float, float]:
    """A process's user and system CPU seconds (all its threads), or one
    thread's (``tid``; the daemon's event loop is its main thread, tid == pid)."""
    stat = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    fields = Path(stat).read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def run_puts_bench(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    from kvfs import native
    from kvfsd.testing import DaemonProcess

    n_single = 200 if args.quick else 1000
    # /proc CPU times tick at 10 ms: a quick run still needs enough objects (~50 ms of
    # daemon CPU) for its per-object CPU figures to be more than one tick's noise
    n_batches = 20 if args.quick else 50
    base, work = work_dirs(args.dir, "kvfs-bench-puts-")
    d = DaemonProcess(work / "kvfs", stripes=args.stripes, capacity="16G", shm_size="1G", log=work / "kvfs.log")
    out: dict[str, Any] = {"machine": {"cpus": os.cpu_count()}, "commit": commit(), "value": VALUE,
                           "singles": n_single, "batches": n_batches, "batch": BATCH}
    try:
        d.start()
        assert d.proc is not None
        with d.connect() as s:
            vals = np.random.default_rng(1).integers(0, 256, (BATCH, VALUE), dtype=np.uint8)
            # the same without polling for answers, neither side (what every
            # round trip paid before), in turns with the polling pair so both
            # see the same moments of this machine
            d0 = DaemonProcess(work / "kvfs-nopoll", stripes=args.stripes, capacity="4G", shm_size="256M",
                               extra=["--poll-us", "0"], log=work / "kvfs-nopoll.log")
            with d0, d0.connect() as sn:
                sn._conn().poll_ns = 0
                (out["single"], out["request_rtt"]), (single0, rtt0) = _singles([s, sn], vals, n_single)
            out["no_polling"] = {"wait": single0["wait"], "request_rtt": rtt0}
            before = s.stats()["requests"].get("put_t0", {"count": 0, "sum_s": 0.0})
            batches: dict[str, Any] = {}
            for wait in (True, False):
                (u0, s0) = _cpu_s(d.proc.pid)
                t = time.perf_counter()
                for b in range(n_batches):
                    s.put_many([f"b{wait}-{b}-{j}" for j in range(BATCH)], list(vals), wait=wait)
                s.flush()
                dt = time.perf_counter() - t
                n = n_batches * BATCH
                (u1, s1) = _cpu_s(d.proc.pid)
                batches["wait" if wait else "no wait"] = {
                    "objects_s": n / dt, "gbs": n * VALUE / dt / 1e9, "daemon_cpu_us": (u1 - u0 + s1 - s0) / n * 1e6,
                    "daemon_user_us": (u1 - u0) / n * 1e6, "daemon_sys_us": (s1 - s0) / n * 1e6}
            after = s.stats()["requests"]["put_t0"]
            out["batches"] = batches
            out["handler_us_per_object"] = (after["sum_s"] - before["sum_s"]) / (2 * n_batches * BATCH) * 1e6
            # the physical baselines, same bytes
            dst = np.empty((BATCH, VALUE), dtype=np.uint8)
            t = time.perf_counter()
            for _ in range(n_batches):
                native.backend.copy_many(list(dst), list(vals), [None] * BATCH, 1)
            out["memcpy_gbs"] = n_batches * BATCH * VALUE / (time.perf_counter() - t) / 1e9
            raw = work / "raw"
            fd = os.open(raw, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                c0 = os.times()
                t = time.perf_counter()
                for b in range(n_batches):
                    native.backend.write_many([fd] * BATCH, [(b * BATCH + j) * VALUE for j in range(BATCH)],
                                              list(vals), 1)
                os.fsync(fd)
                out["pwrite_gbs"] = n_batches * BATCH * VALUE / (time.perf_counter() - t) / 1e9
                # the kernel's CPU time to write these bytes: what the
                # daemon's write-back of them cannot go below
                out["pwrite_sys_us"] = (os.times().system - c0.system) / (n_batches * BATCH) * 1e6
            finally:
                os.close(fd)
        out["processes"] = _processes(d, 256 if args.quick else 4096)
        out["sustained"] = _sustained(args, work)
        # in turns, twice each: the run with less daemon CPU per object counts
        # (on the VM one run in a few took twice the CPU, in the kernel's
        # page reclaim and flushing, whichever kind of key came first)
        runs = [_steady(args, work, kind) for _ in range(1 if args.quick else 2) for kind in ("hash", "sequential")]
        for name, kind in (("steady", "hash"), ("steady_sequential", "sequential")):
            out[name] = min((r for r in runs if r["keys"] == kind), key=lambda r: r["daemon_cpu_us"])
            out[name]["runs"] = sum(r["keys"] == kind for r in runs)
        from .bench_phases import run_phases
        out["phases"] = run_phases(bool(args.quick))
    finally:
        clean_up(work, base, bool(args.dir), [d])
    return out


SMALL_VALUE = 4096  # a lone small put (the KV block of a short prefix): one message through the arena too


def _singles(stores: list[Any], vals: Any, n: int, turns: int = 4) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Per store: one 64 KiB put after another (waiting for each answer,
    and not), one 4 KiB put after another (waiting), then a request that
    does nothing, answered (the floor of a waited put). The stores take
    turns, ``n / turns`` of each at a time."""
    from kvfs import protocol as P
    m = max(1, n // turns)
    modes = (("wait", True, VALUE), ("no wait", False, VALUE), (f"wait, {SMALL_VALUE >> 10} KiB values", True,
                                                                 SMALL_VALUE))
    lat: list[dict[str, list[float]]] = [{name: [] for name in [*(mo[0] for mo in modes), "rtt"]} for _ in stores]
    cpu: list[dict[str, float]] = [{name: 0.0 for name, _w, _v in modes} for _ in stores]
    for turn in range(turns):
        for k, s in enumerate(stores):
            for name, wait, size in modes:
                cpu0 = time.thread_time()
                for i in range(m):
                    t = time.perf_counter()
                    s.put(f"s{k}-{turn}-{name}-{i}", vals[i % BATCH][:size], wait=wait)
                    lat[k][name].append(time.perf_counter() - t)
                cpu[k][name] += time.thread_time() - cpu0
                s.flush()
            conn = s._conn()
            for i in range(m):
                t = time.perf_counter()
                conn.call(P.CONTAINS, {"ns": "default", "keys": ["absent"]})
                lat[k]["rtt"].append(time.perf_counter() - t)
    return [({name: {**_pcts(lat[k][name]), "client_cpu_us": cpu[k][name] / (m * turns) * 1e6}
              for name, _w, _v in modes}, _pcts(lat[k]["rtt"])) for k in range(len(stores))]


def _pcts(lat: list[float]) -> dict[str, float]:
    lat = sorted(lat)
    return {"p50_us": lat[len(lat) // 2] * 1e6, "p99_us": lat[int(len(lat) * .99)] * 1e6}


def _processes(d: Any, per_process: int) -> list[dict[str, Any]]:
    """Several processes put_many at once (kvfstools.bench_puts as a
    worker), each ``per_process`` 64 KiB values, until each one's flush;
    released together once all are connected and warm. In turns with each
    count, the bound of its answered rate: as many processes doing only the
    memory work a put asks of its client (``_memory_worker``: each value
    copied into shared memory and hashed, in the same batches, no daemon)."""
    counts = [1, 2, 4] if (os.cpu_count() or 1) >= 8 else [1, 2]
    rows = []
    for round_, n in enumerate(counts):
        (u0, s0) = _cpu_s(d.proc.pid)
        spans = _released_together([[str(d.socket), f"{round_}-{i}", str(per_process)] for i in range(n)])
        (u1, s1) = _cpu_s(d.proc.pid)
        objs = n * per_process
        start = min(sp[0] for sp in spans)
        acked = max(sp[1] for sp in spans) - start
        dt = max(sp[2] for sp in spans) - start
        mem = _released_together([["--memory", str(per_process)] for _ in range(n)])
        rows.append({"processes": n, "acked_objects_s": objs / acked, "objects_s": objs / dt,
                     "gbs": objs * VALUE / dt / 1e9,
                     "memory_objects_s": objs / (max(sp[1] for sp in mem) - min(sp[0] for sp in mem)),
                     "daemon_cpu_us": (u1 - u0 + s1 - s0) / objs * 1e6, "daemon_user_us": (u1 - u0) / objs * 1e6})
    return rows


def _released_together(argvs: list[list[str]]) -> list[tuple[float, ...]]:
    """Start a worker process (this module) per argv; once every one says
    ready, release them together; their printed times (start, answered,
    flushed)."""
    procs = [subprocess.Popen([sys.executable, "-m", "kvfstools.bench_puts", *argv], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for argv in argvs]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        return [tuple(map(float, p.communicate(timeout=600)[0].split())) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def _memory_worker(count: int) -> None:
    """The bound of a putting process: the same values and batches as
    ``_worker``, each copied into shared memory (an arena's kind: shmem
    pages) and hashed in one pass, on as many data-plane threads as a
    Store's (``copy_hash_chunked``, what a put into the arena runs). No
    daemon, no messages: what N clients can do at most on this host's
    cores and memory."""
    import mmap

    import numpy as np

    from kvfs.dataplane import DataPlane
    from kvfs.session import MADV_POPULATE_WRITE
    chunk = 4 << 20  # the daemon's default stripe unit: a put's chunk sums
    vals = list(np.random.default_rng(count).integers(0, 256, (BATCH, VALUE), dtype=np.uint8))
    shm = mmap.mmap(-1, count * VALUE)  # MAP_SHARED | MAP_ANONYMOUS: shmem, as /dev/shm is
    try:  # faulted in before the start, as a client populates its reservations (ArenaMapping.populate)
        shm.madvise(MADV_POPULATE_WRITE)
    except OSError:
        pass  # an older kernel: the client's puts take the faults too
    dp = DataPlane()
    view = memoryview(shm)
    dp.copy_hash_chunked([view[j * VALUE:(j + 1) * VALUE] for j in range(BATCH)], vals, chunk)  # warm
    print("ready", flush=True)
    sys.stdin.readline()
    t = time.time()
    for b in range(0, count, BATCH):
        dp.copy_hash_chunked([view[(b + j) * VALUE:(b + j + 1) * VALUE] for j in range(BATCH)], vals, chunk)
    done = time.time()
    print(t, done, done, flush=True)
    dp.close()


def _worker(sock: str, tag: str, count: int) -> None:
    """One putting process: connect, warm up, say ready, wait for go, put
    ``count`` values in batches of BATCH, each answered (published in T0:
    what the daemon commits), then flush (written back to T1); print the
    wall-clock start, last answer and end."""
    import numpy as np

    import kvfs
    vals = list(np.random.default_rng(abs(hash(tag)) % 2**32).integers(0, 256, (BATCH, VALUE), dtype=np.uint8))
    with kvfs.connect(sock) as s:
        s.put_many([f"w{tag}-warm-{j}" for j in range(BATCH)], vals, ns="procs")
        s.flush()
        print("ready", flush=True)
        sys.stdin.readline()
        t = time.time()
        for b in range(0, count, BATCH):
            s.put_many([f"w{tag}-{b + j}" for j in range(BATCH)], vals, ns="procs")
        acked = time.time()
        s.flush()
        print(t, acked, time.time(), flush=True)


def _fresh_memory() -> None:
    """Each sustained run starts alike: no dirty pages of another to wait
    for and, as root, no page cache to reclaim first. On the VM the first
    GiB written into a page cache full of clean pages ran at 0.4 GB/s and
    the next at 5-6 (the pages a deleted file had freed): without this the
    baseline's speed depended on what ran before it."""
    from .bench_util import drop_caches
    if not drop_caches():
        os.sync()


SUSTAINED_VALUE = 1 << 20
SUSTAINED_BATCH = 16


def _sustained(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import numpy as np

    from kvfs import native
    from kvfsd.testing import DaemonProcess

    arena = (64 if args.quick else 256) << 20
    total = 4 * arena
    d = DaemonProcess(work / "kvfs-sustained", stripes=args.stripes, capacity="16G", shm_size=arena,
                      log=work / "kvfs-sustained.log")
    vals = np.random.default_rng(2).integers(0, 256, (SUSTAINED_BATCH, SUSTAINED_VALUE), dtype=np.uint8)
    n_batches = total // (SUSTAINED_BATCH * SUSTAINED_VALUE)

    def raw(copy: bool = False) -> float:
        """Seconds to pwrite the same batches to fresh files on the stripes,
        a thread per stripe (stripes made by the daemon's start). ``copy``:
        each batch is first copied into memory and hashed (copy_hash_chunked,
        what a client's put does into the arena), then written from there:
        the least a put through the arena costs, on the same threads."""
        from concurrent.futures import ThreadPoolExecutor
        fds = [os.open(Path(st) / "raw", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600) for st in d.stripes]

        def fill(i: int) -> None:  # stripe i's share of the batches, as the daemon spreads them
            src = list(vals)
            if copy:
                staging = np.empty_like(vals)
                src = list(staging)
            for n, b in enumerate(range(i, n_batches, len(fds))):
                if copy:
                    native.backend.copy_hash_chunked(src, list(vals), 4 << 20, 1)
                native.backend.write_many([fds[i]] * SUSTAINED_BATCH,
                                          [(n * SUSTAINED_BATCH + j) * SUSTAINED_VALUE
                                           for j in range(SUSTAINED_BATCH)], src, 1)
        try:
            _fresh_memory()
            t = time.perf_counter()
            with ThreadPoolExecutor(len(fds)) as pool:
                list(pool.map(fill, range(len(fds))))
            return time.perf_counter() - t
        finally:
            for fd in fds:
                os.close(fd)
            for st in d.stripes:
                (Path(st) / "raw").unlink(missing_ok=True)
    try:
        d.start()
        raw_dt = raw()  # before and after: a VM's disk comes in bursts; the faster run is the baseline
        with d.connect() as s:
            calls = []
            _fresh_memory()
            t = time.perf_counter()
            for b in range(n_batches):
                c = time.perf_counter()
                s.put_many([f"z{b}-{j}" for j in range(SUSTAINED_BATCH)], list(vals), wait=False)
                calls.append(time.perf_counter() - c)
            s.flush()
            dt = time.perf_counter() - t
            full = s.stats()["tiers"]["T0"].get("full", 0)
        raw_dt = min(raw_dt, raw())
        copied_dt = min(raw(copy=True), raw(copy=True))
    finally:
        d.stop()
    return {"arena": arena, "bytes": n_batches * SUSTAINED_BATCH * SUSTAINED_VALUE, "gbs": total / dt / 1e9,
            "raw_gbs": total / raw_dt / 1e9, "copy_pwrite_gbs": total / copied_dt / 1e9, "max_call_ms": max(calls) * 1e3,
            "p99_call_ms": sorted(calls)[int(len(calls) * .99)] * 1e3, "arena_full": full}


STEADY_VALUE = 4096
STEADY_SLOTS = 65536


def _thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds of each of a process's threads, summed by OS thread name
    (the daemon names its threads: kvfsd.threadnames)."""
    out: dict[str, float] = {}
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            name = Path(f"/proc/{pid}/task/{t}/comm").read_text().strip()
            out[name] = out.get(name, 0.0) + sum(_cpu_s(pid, int(t)))
        except OSError:
            continue  # a thread that ended meanwhile
    return out


# which of the daemon's threads does what (kvfsd.threadnames); the rest is "other"
STEADY_THREADS = {"event loop": ("kvfsd",), "index writer": ("kvfs-writer", "kvfs-index-sync"),
                  "write-back": ("kvfs-wb",)}


def steady_keys(kind: str, prefix: str, b: int) -> list[str]:
    """A batch's keys: 32 hex digits of a hash, as engines name blocks (a
    vLLM block hash, an LMCache chunk hash: they land anywhere in the
    index), or sequential names (which land next to each other)."""
    import hashlib
    if kind == "hash":
        return [hashlib.blake2b(f"{prefix}{b}-{j}".encode(), digest_size=16).hexdigest() for j in range(BATCH)]
    return [f"{prefix}{b}-{j}" for j in range(BATCH)]


def _steady(args: argparse.Namespace, work: Path, kind: str) -> dict[str, Any]:
    """A busy node's steady state: small values put far past what the arena
    and the location directory hold, so every reservation evicts, every
    new key may displace an older one from a full directory, and the
    write-back runs behind. Daemon CPU per object, by thread, measured after
    a warm-up that fills both; then the bound its index sets: the same
    objects' LMDB rows inserted again into the same index by one thread
    (``_index_alone``)."""
    import numpy as np

    from kvfsd.testing import DaemonProcess

    arena = (16 if args.quick else 256) << 20
    root = work / f"kvfs-steady-{kind}"
    d = DaemonProcess(root, stripes=args.stripes, capacity="16G", shm_size=arena,
                      extra=["--dir-slots", str(STEADY_SLOTS)], log=work / f"kvfs-steady-{kind}.log")
    val = np.random.default_rng(3).integers(0, 256, STEADY_VALUE, dtype=np.uint8)
    warm = 2 * (arena // STEADY_VALUE) // BATCH + STEADY_SLOTS // BATCH
    n_batches = warm // (4 if args.quick else 1)
    measured: list[str] = []
    os.sync()  # what earlier runs left dirty is written now, not by the kernel's flushers during this one
    try:
        d.start()
        assert d.proc is not None
        with d.connect() as s:
            for b in range(warm):
                s.put_many(steady_keys(kind, "w", b), [val] * BATCH, wait=False)
            s.flush()
            commits0 = s.stats()["index"]["commits"]
            u0, s0 = _cpu_s(d.proc.pid)
            th0 = _thread_cpu_s(d.proc.pid)
            t = time.perf_counter()
            for b in range(n_batches):
                keys = steady_keys(kind, "s", b)
                s.put_many(keys, [val] * BATCH, wait=False)
                measured += keys
            s.flush()
            dt = time.perf_counter() - t
            u1, s1 = _cpu_s(d.proc.pid)
            th1 = _thread_cpu_s(d.proc.pid)
            st = s.stats()
    finally:
        d.stop()
    n = n_batches * BATCH
    per_thread = {k: 0.0 for k in (*STEADY_THREADS, "other")}
    for name, c in th1.items():
        role = next((r for r, prefixes in STEADY_THREADS.items() if name.startswith(prefixes)), "other")
        per_thread[role] += (c - th0.get(name, 0.0)) / n * 1e6
    commits = max(1, st["index"]["commits"] - commits0)
    try:
        alone = _index_alone(root, measured, commits)
    finally:
        # the gigabytes its segments hold are not left to the page cache and the
        # kernel's flushers while the next run measures (a second steady run in
        # a row took twice the CPU per object without it)
        shutil.rmtree(root, ignore_errors=True)
    return {"keys": kind, "arena": arena, "slots": STEADY_SLOTS, "value": STEADY_VALUE, "objects": n,
            "objects_s": n / dt, "daemon_cpu_us": (u1 + s1 - u0 - s0) / n * 1e6, "daemon_user_us": (u1 - u0) / n * 1e6,
            "loop_cpu_us": per_thread["event loop"], "threads_us": per_thread, "commits": commits,
            "index_alone_us": alone,
            "evictions": st["tiers"]["T0"]["evictions"], "displaced": (st.get("directory") or {}).get("displaced", 0),
            "arena_full": st["tiers"]["T0"].get("full", 0)}


def _index_alone(root: Path, keys: list[str], commits: int) -> float:
    """The bound the index sets on a put's daemon CPU: the LMDB rows the
    daemon wrote for ``keys`` (their object rows and segment-object rows),
    taken out of its index (stopped) and inserted again the way its writer
    thread does (a write transaction per commit, the rows in a nested one,
    ``putmulti``), in as many commits as the daemon made for them. CPU
    microseconds of this one thread per object, the kernel's share (the
    commit's page writes) included."""
    from kvfsd.index import Index, obj_key

    idx = Index(root, 1 << 40)
    try:
        env = idx.env
        oks = [obj_key("default", k) for k in keys]
        want = set(oks)
        with env.begin() as txn:
            rows = [(ok, bytes(v)) for ok in oks if (v := txn.get(ok, db=idx.objects)) is not None]
            segrows: dict[bytes, list[tuple[bytes, bytes]]] = {}
            for k, v in txn.cursor(db=idx.segobj):
                if bytes(v) in want:
                    segrows.setdefault(bytes(v), []).append((bytes(k), bytes(v)))
        if not rows:
            return 0.0
        with env.begin(write=True) as txn:  # the index as it was before these puts, near enough
            for ok, _v in rows:
                txn.delete(ok, db=idx.objects)
                for k, _ in segrows.get(ok, ()):
                    txn.delete(k, db=idx.segobj)
        per = -(-len(rows) // commits)
        c0 = time.thread_time()
        for i in range(0, len(rows), per):
            part = rows[i:i + per]
            with env.begin(write=True) as txn, env.begin(write=True, parent=txn) as sub:
                sub.cursor(db=idx.objects).putmulti(part, overwrite=False)
                sub.cursor(db=idx.segobj).putmulti([r for ok, _v in part for r in segrows.get(ok, ())])
        return (time.thread_time() - c0) / len(rows) * 1e6
    finally:
        idx.close()


def format_puts(res: dict[str, Any]) -> str:
    head = (f"puts of {res['value'] >> 10} KiB values, commit {res['commit']}, {res['machine']['cpus']} cores")
    rows = [[f"one put at a time, {k}", f"{v['p50_us']:.0f}", f"{v['p99_us']:.0f}", f"{v['client_cpu_us']:.0f}"]
            for k, v in res["single"].items()]
    if "request_rtt" in res:
        rows.append(["a request's round trip (contains of 1 key)", f"{res['request_rtt']['p50_us']:.0f}",
                     f"{res['request_rtt']['p99_us']:.0f}", ""])
    if "no_polling" in res:  # the same, neither side polling for answers (--poll-us 0, KVFS_POLL_US=0)
        npl = res["no_polling"]
        rows.append(["one put at a time, wait, no polling", f"{npl['wait']['p50_us']:.0f}",
                     f"{npl['wait']['p99_us']:.0f}", f"{npl['wait']['client_cpu_us']:.0f}"])
        rows.append(["a request's round trip, no polling", f"{npl['request_rtt']['p50_us']:.0f}",
                     f"{npl['request_rtt']['p99_us']:.0f}", ""])
    t1 = render(["", "p50 us", "p99 us", "client CPU us/put"], rows)
    rows2 = [[f"put_many of {res['batch']}, {k}", f"{v['objects_s']:.0f}", f"{v['gbs']:.2f}",
              f"{v['gbs'] / res['pwrite_gbs']:.2f}x", f"{v['daemon_cpu_us']:.0f}",
              f"{v.get('daemon_user_us', 0):.0f}", f"{v.get('daemon_sys_us', 0):.0f}"]
             for k, v in res["batches"].items()]
    rows2.append(["raw pwrite (same bytes, one thread, fsync)", "", f"{res['pwrite_gbs']:.2f}", "1.00x", "", "",
                  f"{res.get('pwrite_sys_us', 0):.0f}"])
    rows2.append(["memcpy (same bytes, one thread)", "", f"{res['memcpy_gbs']:.2f}", "", "", "", ""])
    t2 = render(["until flush (written back to T1)", "objects/s", "GB/s", "vs pwrite", "daemon CPU us/object",
                 "user", "system"], rows2)
    if "processes" in res:
        one = res["processes"][0]["objects_s"]
        one_acked = res["processes"][0].get("acked_objects_s", 0) or 1
        one_mem = res["processes"][0].get("memory_objects_s", 0) or 1
        tp = render(["put_many of 64 at once", "answered objects/s", "vs 1 process", "memory work alone",
                     "vs 1 process", "until flush objects/s",
                     "GB/s", "vs 1 process", "vs pwrite", "daemon CPU us/object", "user"],
                    [[f"{r['processes']} process{'es' if r['processes'] > 1 else ''}",
                      f"{r.get('acked_objects_s', 0):.0f}", f"{r.get('acked_objects_s', 0) / one_acked:.2f}x",
                      f"{r.get('memory_objects_s', 0):.0f}", f"{r.get('memory_objects_s', 0) / one_mem:.2f}x",
                      f"{r['objects_s']:.0f}", f"{r['gbs']:.2f}", f"{r['objects_s'] / one:.2f}x",
                      f"{r['gbs'] / res['pwrite_gbs']:.2f}x", f"{r['daemon_cpu_us']:.0f}", f"{r['daemon_user_us']:.0f}"]
                     for r in res["processes"]])
        t2 += "\n\n" + tp
    su = res["sustained"]
    t3 = render(["sustained: 4 x a {} MiB arena, 1 MiB values".format(su["arena"] >> 20), "GB/s", "vs pwrite",
                 "longest put_many", "p99 put_many"],
                [["put_many of 16, no wait, until flush", f"{su['gbs']:.2f}", f"{su['gbs'] / su['raw_gbs']:.2f}x",
                  f"{su['max_call_ms']:.1f} ms", f"{su['p99_call_ms']:.1f} ms"],
                 ["raw pwrite (same bytes, a thread per stripe)", f"{su['raw_gbs']:.2f}", "1.00x", "", ""]]
                + ([["every byte through memory: copy + xxh3, then pwrite", f"{su['copy_pwrite_gbs']:.2f}",
                     f"{su['copy_pwrite_gbs'] / su['raw_gbs']:.2f}x", "", ""]] if "copy_pwrite_gbs" in su else []))
    out = (f"{head}\n{t1}\n\n{t2}\n\ndaemon put_t0 handler: {res['handler_us_per_object']:.1f} us per object "
           f"(on its event loop)\n\n{t3}\narena full (reservations refused, puts went to T1 directly): "
           f"{su['arena_full']} times")
    if "steady" in res:
        out += "\n\n" + format_steady([res[k] for k in ("steady", "steady_sequential") if k in res])
    if "phases" in res:
        from .bench_phases import format_phases
        out += "\n\n" + format_phases(res["phases"])
    return out


def format_steady(runs: list[dict[str, Any]]) -> str:
    """The steady state's table: one row per kind of key, the daemon's CPU
    per object split by thread, and the index-alone bound beside it."""
    sd = runs[0]
    head = (f"steady state: {sd['value'] >> 10} KiB values, {sd['arena'] >> 20} MiB arena full, {sd['slots']}-slot "
            f"directory full, put_many of {BATCH}, no wait, until flush")
    rows = [[f"{r['keys']} keys ({r['objects']} objects)", f"{r['objects_s']:.0f}", f"{r['daemon_cpu_us']:.1f}",
             *(f"{r['threads_us'][t]:.1f}" for t in ("event loop", "index writer", "write-back", "other")),
             f"{r['index_alone_us']:.1f}"] for r in runs]
    out = render([head, "objects/s", "daemon CPU us/object", "event loop", "index writer", "write-back", "other",
                  "index alone"], rows)
    out += "".join(f"\n{r['keys']} keys: evictions {r['evictions']}, older keys displaced from the directory "
                   f"{r['displaced']}, reservations refused {r['arena_full']}, {r['commits']} index commits" for r in runs)
    # one trio loop answers every put_t0: what it spends per object caps the
    # objects/s the daemon can answer, whatever the other threads do
    out += "".join(f"\nthe event loop (one thread) spent {r['loop_cpu_us']:.1f} us per object with {r['keys']} keys: "
                   f"at most {1e6 / r['loop_cpu_us'] / 1e3:.0f}k objects/s answered" for r in runs if r["loop_cpu_us"])
    out += ("\nindex alone: the same objects' LMDB rows taken out of the stopped daemon's index and inserted again "
            "as its writer does, in as many commits, by one thread (CPU us/object)")
    if sd.get("runs", 1) > 1:
        out += f"\neach kind of key run {sd['runs']} times, in turns with the other: the run with the least daemon CPU shown"
    return out


if __name__ == "__main__":
    if sys.argv[1] == "--memory":
        _memory_worker(int(sys.argv[2]))
    else:
        _worker(sys.argv[1], sys.argv[2], int(sys.argv[3]))
