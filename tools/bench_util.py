"""What every benchmark does the same way: timing a step, and leaving no
daemon or files behind."""
from __future__ import annotations

import shutil
import subprocess
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterable


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
    """Stop the benchmark's daemons and remove its files (``base`` too,
    unless the user named it with --dir)."""
    for d in daemons:
        if d.alive():
            d.stop()
    shutil.rmtree(work, ignore_errors=True)
    if not keep_base:
        shutil.rmtree(base, ignore_errors=True)


def commit() -> str:
    """The checkout's commit (and whether it had changes), for the figures' record."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except OSError:
        return "unknown"
    return (rev or "unknown") + ("+changes" if dirty else "")
