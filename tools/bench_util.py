"""What every benchmark does the same way: timing a step, and leaving no
daemon or files behind."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator


def median_seconds(fn: Callable[[], Any], repeat: int) -> float:
    """Median seconds of ``repeat`` runs of ``fn`` after one warm-up."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def clean_up(work: Path, base: Path, keep_base: bool, daemons: Iterable[Any] = ()) -> None:
    """Stop the benchmark's daemons, remove what they left in /dev/shm
    (arena, directory, journal) and the benchmark's files (``base`` too,
    unless the user named it with --dir)."""
    for d in daemons:
        if d.alive():
            d.stop()
        d.remove_shm()
    shutil.rmtree(work, ignore_errors=True)
    if not keep_base:
        shutil.rmtree(base, ignore_errors=True)


def commit() -> str:
    """The checkout's commit (and whether it had changes), for the figures' record.
    KVFS_COMMIT overrides it: a copy of the tree without its history (the GPU
    machine's) is told which commit it is."""
    if os.environ.get("KVFS_COMMIT"):
        return os.environ["KVFS_COMMIT"]
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        # the pages the figures are written into are not what made them: a
        # bench-readme run that rewrote them must not mark the next one dirty
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)",
                                ":(top,exclude)README.md", ":(top,exclude)docs"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except OSError:
        return "unknown"
    return (rev or "unknown") + ("+changes" if dirty else "")


def work_dirs(where: str | None, prefix: str) -> tuple[Path, Path]:
    """(base, work): ``where`` (--dir) or a new temporary directory, and a
    fresh folder of this run's inside it (``clean_up`` removes them)."""
    base = Path(where) if where else Path(tempfile.mkdtemp(prefix=prefix))
    base.mkdir(parents=True, exist_ok=True)
    work = base / f"run-{os.getpid()}"
    work.mkdir()
    return base, work


def latencies(fn: Callable[[], Any], n: int) -> list[float]:
    """Seconds of each of ``n`` calls of ``fn``."""
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


def drop_caches() -> bool:
    """Evict the page cache (root only). False if this process may not."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


@contextlib.contextmanager
def env_set(**kv: str) -> Iterator[None]:
    """Environment variables set for the block (the daemons it starts
    inherit them), restored after."""
    old = {k: os.environ.get(k) for k in kv}
    os.environ.update(kv)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
