"""`kvfs bench --fuse`: the mount against a plain file on the same disk, in
the same run, on the same bytes.

  write  `cp` of a file into the mount vs `cp` into a plain directory
         (page cache, no fsync, for both: the mount commits on close)
  read   sequential reads with 1 MiB and 4 MiB application reads (like
         `dd bs=...`), cold (caches dropped: needs root) and page-cache hot
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from .table import render

MiB = 1 << 20


def _read_all(path: Path, bs: int) -> float:
    """Seconds to read ``path`` sequentially with ``bs``-byte reads."""
    buf = bytearray(bs)
    view = memoryview(buf)
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(view):
            pass
    return time.perf_counter() - t


def _cp(src: Path, dst: Path) -> float:
    t = time.perf_counter()
    subprocess.run(["cp", str(src), str(dst)], check=True)
    return time.perf_counter() - t


def run_fuse_bench(args: argparse.Namespace) -> dict[str, Any]:
    from kvfsd.testing import DaemonProcess

    from .bench_compare import drop_caches

    size = int(args.total * args.scale)
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="kvfs-fuse-"))
    work = base / f"fuse-{os.getpid()}"
    (work / "plain").mkdir(parents=True, exist_ok=True)
    src = work / "src.bin"
    with open(src, "wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))
    size = src.stat().st_size
    d = DaemonProcess(work / "store", capacity=str(4 * size + (1 << 30)), shm_size=0, mount=work / "mnt",
                      log=work / "daemon.log")
    cold = os.geteuid() == 0 and not args.no_cold
    rounds: list[dict[str, float]] = []
    try:
        d.start()
        mnt = work / "mnt"
        (mnt / "bench").mkdir()
        for r in range(args.repeat):
            row: dict[str, float] = {}
            os.sync()
            row["cp_plain"] = size / _cp(src, work / "plain" / f"f{r}") / 1e9
            os.sync()
            row["cp_mount"] = size / _cp(src, mnt / "bench" / f"f{r}") / 1e9
            os.sync()
            for bs in (1 * MiB, 4 * MiB):
                tag = f"{bs // MiB}m"
                for name, path in (("plain", work / "plain" / f"f{r}"), ("mount", mnt / "bench" / f"f{r}")):
                    if cold and drop_caches():
                        row[f"cold_{tag}_{name}"] = size / _read_all(path, bs) / 1e9
                    _read_all(path, bs)  # warm
                    row[f"hot_{tag}_{name}"] = size / _read_all(path, bs) / 1e9
            # same bytes: checked once per round
            if subprocess.run(["cmp", str(src), str(mnt / "bench" / f"f{r}")]).returncode != 0:
                raise AssertionError("the mount returned other bytes")
            os.unlink(mnt / "bench" / f"f{r}")
            os.unlink(work / "plain" / f"f{r}")
            rounds.append(row)
    finally:
        if d.alive():
            d.stop()
        shutil.rmtree(work, ignore_errors=True)
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    return {"bytes": size, "rounds": len(rounds), "median": med, "cold": cold}


def format_fuse(res: dict[str, Any]) -> str:
    m = res["median"]
    rows = [["write: cp into", f"{m['cp_plain']:.2f}", f"{m['cp_mount']:.2f}", f"{m['cp_mount'] / m['cp_plain']:.2f}"]]
    for kind in ("cold", "hot"):
        for tag in ("1m", "4m"):
            k = f"{kind}_{tag}"
            if f"{k}_plain" in m:
                rows.append([f"read {kind}, {tag[0]} MiB reads", f"{m[k + '_plain']:.2f}", f"{m[k + '_mount']:.2f}",
                             f"{m[k + '_mount'] / m[k + '_plain']:.2f}"])
    return render(["", "plain file GB/s", "mount GB/s", "mount / plain"], rows) + (
        f"\n\n{res['bytes'] / MiB:.0f} MiB, median of {res['rounds']} rounds")
