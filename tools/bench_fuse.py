"""`kvfs bench --fuse`: the mount against a plain file on the same disk, in
the same run, on the same bytes.

  write  `cp` of a file into the mount vs `cp` into a plain directory
         (page cache, no fsync, for both: the mount commits on close), and
         into a pyfuse3 filesystem that discards what it gets
         (tools/null_fuse.py): the ceiling of any pyfuse3 write path here.
         Each cp starts from the same state: dirty pages synced, caches
         dropped (as root) and the source read back in.
  read   sequential reads with 1 MiB and 4 MiB application reads (like
         `dd bs=...`), cold (caches dropped: needs root) and page-cache hot
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kvfs.optional import need

from .bench_util import clean_up
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


def _fresh(src: Path, can_drop: bool) -> None:
    """The same starting point for every `cp`: no dirty pages, the page
    cache dropped (so no run pays for the previous one's pages) and the
    source hot."""
    from .bench_util import drop_caches

    os.sync()
    if can_drop:
        drop_caches()
    _read_all(src, 4 * MiB)


def _null_mount(where: Path) -> subprocess.Popen[bytes] | None:
    """Start tools/null_fuse.py at ``where``; None if it does not come up."""
    where.mkdir(parents=True, exist_ok=True)
    p = subprocess.Popen([sys.executable, "-m", "kvfstools.null_fuse", str(where)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        if os.path.ismount(where):
            return p
        if p.poll() is not None:
            return None
        time.sleep(0.05)
    p.terminate()
    return None


def _null_umount(p: subprocess.Popen[bytes], where: Path) -> None:
    subprocess.run(["fusermount3", "-u", str(where)], stderr=subprocess.DEVNULL)
    try:
        p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        p.kill()
        subprocess.run(["umount", "-l", str(where)], stderr=subprocess.DEVNULL)


def run_fuse_bench(args: argparse.Namespace) -> dict[str, Any]:
    need("pyfuse3")
    from kvfsd.testing import DaemonProcess

    from .bench_util import drop_caches

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
    root = os.geteuid() == 0
    cold = root and not args.no_cold
    rounds: list[dict[str, float]] = []
    null = _null_mount(work / "null")
    try:
        d.start()
        mnt = work / "mnt"
        (mnt / "bench").mkdir()
        for r in range(args.repeat):
            row: dict[str, float] = {}
            _fresh(src, root)
            row["cp_plain"] = size / _cp(src, work / "plain" / f"f{r}") / 1e9
            _fresh(src, root)
            row["cp_mount"] = size / _cp(src, mnt / "bench" / f"f{r}") / 1e9
            if null is not None:
                _fresh(src, root)
                row["cp_null"] = size / _cp(src, work / "null" / "f") / 1e9
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
        if null is not None:
            _null_umount(null, work / "null")
        clean_up(work, base, bool(args.dir), [d])
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    return {"bytes": size, "rounds": len(rounds), "median": med, "cold": cold}


def format_fuse(res: dict[str, Any]) -> str:
    m = res["median"]
    rows = [["write: cp into", f"{m['cp_plain']:.2f}", f"{m['cp_mount']:.2f}", f"{m['cp_mount'] / m['cp_plain']:.2f}"]]
    if "cp_null" in m:
        rows.append(["write: cp into a null pyfuse3 fs", f"{m['cp_plain']:.2f}", f"{m['cp_null']:.2f}",
                     f"{m['cp_null'] / m['cp_plain']:.2f}"])
    for kind in ("cold", "hot"):
        for tag in ("1m", "4m"):
            k = f"{kind}_{tag}"
            if f"{k}_plain" in m:
                rows.append([f"read {kind}, {tag[0]} MiB reads", f"{m[k + '_plain']:.2f}", f"{m[k + '_mount']:.2f}",
                             f"{m[k + '_mount'] / m[k + '_plain']:.2f}"])
    return render(["", "plain file GB/s", "mount GB/s", "mount / plain"], rows) + (
        f"\n\n{res['bytes'] / MiB:.0f} MiB, median of {res['rounds']} rounds")
