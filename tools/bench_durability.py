"""`kvfs bench --durability`: what the index's power-cut rule costs a put.

Every index commit syncs its pages before LMDB writes the meta page that
names them (MDB_NOMETASYNC, kvfsd.index; README "Durability rules"). A put
that waits for its commit pays that sync: in sync mode, and in fast mode
where the put goes straight to T1 (no T0, or T0 full). This runs the same
puts against a daemon with the rule and one with MDB_NOSYNC
(``KVFS_UNSAFE_INDEX_NOSYNC=1``, the index as it was before the rule, which
a torn sync could lose whole), in interleaved rounds, and reports each
case's GB/s and per-call p50 as ratios (rule / no rule, same run).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from .bench_util import commit, env_set
from .table import render

KiB, MiB = 1 << 10, 1 << 20
# (name, durability, T0 arena, value size, values per call, bytes per case)
CASES = [("fast, T0, put_many(64) 64 KiB", "fast", "512M", 64 * KiB, 64, 256 * MiB),
         ("fast, no T0, put 64 KiB", "fast", 0, 64 * KiB, 1, 128 * MiB),
         ("fast, no T0, put_many(64) 64 KiB", "fast", 0, 64 * KiB, 64, 256 * MiB),
         ("fast, no T0, put 8 MiB", "fast", 0, 8 * MiB, 1, 1024 * MiB),
         ("sync, put 64 KiB", "sync", 0, 64 * KiB, 1, 64 * MiB),
         ("sync, put_many(64) 64 KiB", "sync", 0, 64 * KiB, 64, 256 * MiB)]


def _one(work: Path, durability: str, shm: Any, size: int, per_call: int, total: int,
         unsafe: bool) -> tuple[float, float]:
    from kvfsd.testing import DaemonProcess
    with env_set(KVFS_UNSAFE_INDEX_NOSYNC="1" if unsafe else "0"):
        shutil.rmtree(work, ignore_errors=True)
        d = DaemonProcess(work, stripes=2, capacity="16G", shm_size=shm, durability=durability)
        vals = [os.urandom(size) for _ in range(min(64, max(1, total // size)))]
        n = max(per_call, total // size // per_call * per_call)
        lat: list[float] = []
        with d, d.connect() as s:
            os.sync()  # the other daemon's writeback is not this one's cost
            t = time.perf_counter()
            for i in range(0, n, per_call):
                t1 = time.perf_counter()
                if per_call == 1:
                    s.put(f"k{i}", vals[i % len(vals)])
                else:
                    s.put_many([f"k{j}" for j in range(i, i + per_call)],
                               [vals[j % len(vals)] for j in range(i, i + per_call)])
                lat.append(time.perf_counter() - t1)
            s.flush(120)  # T0's write-back counts too
            el = time.perf_counter() - t
        shutil.rmtree(work, ignore_errors=True)
        return n * size / el / 1e9, statistics.median(lat)


def run_durability_bench(args: argparse.Namespace) -> dict[str, Any]:
    rounds = 1 if args.quick else args.repeat
    cases = CASES[1:2] if args.quick else CASES
    work = Path(tempfile.mkdtemp(prefix="kvfs-bench-dur-"))
    out = []
    try:
        for name, durability, shm, size, per_call, total in cases:
            if args.quick:
                total = 8 * MiB
            got: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
            for _r in range(rounds):
                for unsafe in (False, True):  # interleaved: the VM's drift hits both
                    got[unsafe].append(_one(work / "d", durability, shm, size, per_call, total, unsafe))
            med = {u: (statistics.median(g[0] for g in v), statistics.median(g[1] for g in v)) for u, v in got.items()}
            out.append({"case": name, "gbs": med[False][0], "p50_s": med[False][1],
                        "nosync_gbs": med[True][0], "nosync_p50_s": med[True][1]})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"commit": commit(), "rounds": rounds, "cases": out}


def format_durability(res: dict[str, Any]) -> str:
    rows = [[c["case"], f"{c['gbs']:.2f}", f"{c['nosync_gbs']:.2f}", f"{c['gbs'] / c['nosync_gbs']:.2f}x",
             f"{c['p50_s'] * 1e6:.0f}", f"{c['nosync_p50_s'] * 1e6:.0f}", f"{c['p50_s'] / c['nosync_p50_s']:.2f}x"]
            for c in res["cases"]]
    head = ["case", "GB/s", "NOSYNC GB/s", "ratio", "call p50 us", "NOSYNC p50 us", "ratio"]
    return (render(head, rows) + f"\n(medians of {res['rounds']} interleaved rounds; NOSYNC: the index without "
            "its power-cut rule, KVFS_UNSAFE_INDEX_NOSYNC=1)")
