"""`kvfs bench --fuse`: the mounts against a plain file on the same disk, in
the same run, on the same bytes: the C mount (kvfsd._cfuse) and pyfuse3's,
each served by a daemon of its own, where each was built.

  write    `cp` of a file into each mount vs `cp` into a plain directory
           (page cache, no fsync, for all: the mount commits on close), and
           into two filesystems that discard what they get: a C one
           (tools/null_fuse_c.py: the ceiling of any libfuse write path
           here, the C mount's included) and a pyfuse3 one
           (tools/null_fuse.py: the ceiling of any pyfuse3 write path).
           Each cp starts from the same state: dirty pages synced, caches
           dropped (as root) and the source read back in.
  read     sequential reads with 1 MiB and 4 MiB application reads (like
           `dd bs=...`): cold (caches dropped: needs root), page-cache hot,
           and "store hot" (only the mount's own page cache dropped, the
           segments left in memory: what the daemon itself serves, against
           a hot plain file)
           The null filesystems read as zeros: reading one with its page
           cache dropped (every byte from its daemon, nothing read or
           verified) is the read ceiling of a mount of its kind.
  readers  4 readers at once, each of its own file (a quarter of the bytes),
           cold and hot, against 4 plain readers of 4 plain files
"""
from __future__ import annotations

import argparse
import importlib
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from .bench_util import clean_up
from .table import render

MiB = 1 << 20
IMPLS = {"c": "kvfsd._cfuse", "pyfuse3": "pyfuse3"}  # --mount-impl, and the module it needs
NULLS = {"null_c": ("kvfsd._cfuse", "kvfstools.null_fuse_c"), "null_py": ("pyfuse3", "kvfstools.null_fuse")}
CEILING = {"c": "null_c", "pyfuse3": "null_py"}  # the write ceiling of each mount
READERS = 4


def _built(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _read_all(path: Path, bs: int) -> float:
    """Seconds to read ``path`` sequentially with ``bs``-byte reads."""
    buf = bytearray(bs)
    view = memoryview(buf)
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(view):
            pass
    return time.perf_counter() - t


def _readers(paths: list[Path], bs: int) -> float:
    """Seconds for one thread per path to read its file through (the GIL
    is released in each read: the threads read at once)."""
    start = threading.Barrier(len(paths) + 1)
    errors: list[BaseException] = []

    def one(p: Path) -> None:
        start.wait()
        try:
            _read_all(p, bs)
        except BaseException as e:  # noqa: BLE001 - reported by the caller
            errors.append(e)
    ts = [threading.Thread(target=one, args=(p,)) for p in paths]
    for t in ts:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in ts:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - t0


def _drop_file_cache(path: Path) -> None:
    """Only this file's page cache (the mount's): the segments stay in memory."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


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


def _null_mount(module: str, where: Path) -> subprocess.Popen[bytes] | None:
    """Start a discarding filesystem at ``where``; None if it does not come up."""
    where.mkdir(parents=True, exist_ok=True)
    p = subprocess.Popen([sys.executable, "-m", module, str(where)],
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
    from kvfs.errors import MissingDependency
    from kvfsd.testing import DaemonProcess

    from .bench_util import drop_caches

    impls = [i for i, mod in IMPLS.items() if _built(mod)]
    if not impls:
        raise MissingDependency("kvfs bench --fuse needs a mount: kvfsd._cfuse (libfuse3-dev and pkg-config "
                                "when kvfs is installed) or pyfuse3: pip install 'kvfs[fuse]'")
    size = int(args.total * args.scale)
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="kvfs-fuse-"))
    work = base / f"fuse-{os.getpid()}"
    (work / "plain").mkdir(parents=True, exist_ok=True)
    src = work / "src.bin"
    with open(src, "wb") as f:
        for _ in range(max(1, size // MiB)):
            f.write(os.urandom(MiB))
    size = src.stat().st_size
    quarter = size // READERS
    parts = []
    for i in range(READERS):  # the readers' files: a quarter of the bytes each
        parts.append(work / f"part{i}")
        with open(src, "rb") as f, open(parts[-1], "wb") as out:
            f.seek(i * quarter)
            out.write(f.read(quarter))
    daemons = {impl: DaemonProcess(work / f"store-{impl}", capacity=str(4 * size + (1 << 30)), shm_size=0,
                                   mount=work / f"mnt-{impl}", log=work / f"daemon-{impl}.log",
                                   extra=["--mount-impl", impl]) for impl in impls}
    root = os.geteuid() == 0
    cold = root and not args.no_cold
    rounds: list[dict[str, float]] = []
    nulls: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
    for name, (need_mod, module) in NULLS.items():
        proc = _null_mount(module, work / name) if _built(need_mod) else None
        if proc is not None:
            nulls[name] = (proc, work / name)
    try:
        for d in daemons.values():
            d.start()
        dirs = {"plain": work / "plain"}
        for impl, d in daemons.items():
            dirs[impl] = Path(d.mount) / "bench"
            dirs[impl].mkdir()
            for p in parts:
                subprocess.run(["cp", str(p), str(dirs[impl] / p.name)], check=True)
        for p in parts:
            subprocess.run(["cp", str(p), str(dirs["plain"] / p.name)], check=True)
        for r in range(args.repeat):
            row: dict[str, float] = {}
            for target, where in list(dirs.items()) + [(n, w) for n, (_p, w) in nulls.items()]:
                _fresh(src, root)
                row[f"cp_{target}"] = size / _cp(src, where / f"f{r}" if target not in nulls else where / "f") / 1e9
            os.sync()
            for bs in (1 * MiB, 4 * MiB):
                tag = f"{bs // MiB}m"
                for target, where in dirs.items():
                    path = where / f"f{r}"
                    if cold and drop_caches():
                        row[f"cold_{tag}_{target}"] = size / _read_all(path, bs) / 1e9
                    _read_all(path, bs)  # warm
                    row[f"hot_{tag}_{target}"] = size / _read_all(path, bs) / 1e9
                    if bs == MiB:
                        if target != "plain":
                            _drop_file_cache(path)  # the mount's pages only: the daemon serves every byte
                        row[f"storehot_{tag}_{target}"] = size / _read_all(path, bs) / 1e9
            for target, where in dirs.items():
                paths = [where / p.name for p in parts]
                if cold and drop_caches():
                    row[f"readers_cold_{target}"] = READERS * quarter / _readers(paths, MiB) / 1e9
                _readers(paths, MiB)  # warm
                row[f"readers_hot_{target}"] = READERS * quarter / _readers(paths, MiB) / 1e9
            # the same bytes: checked once per round, on every mount
            for impl in daemons:
                if subprocess.run(["cmp", str(src), str(dirs[impl] / f"f{r}")]).returncode != 0:
                    raise AssertionError(f"the {impl} mount returned other bytes")
                os.unlink(dirs[impl] / f"f{r}")
            os.unlink(dirs["plain"] / f"f{r}")
            for n, (_p, where) in nulls.items():  # the read ceiling: zeros from the null fs's daemon
                _drop_file_cache(where / "f")
                row[f"storehot_1m_{n}"] = size / _read_all(where / "f", MiB) / 1e9
                os.unlink(where / "f")
            rounds.append(row)
        stats = {}
        for impl, d in daemons.items():
            with d.connect() as s:
                stats[impl] = s.stats().get("mount", {})
    finally:
        for proc, where in nulls.values():
            _null_umount(proc, where)
        clean_up(work, base, bool(args.dir), list(daemons.values()))
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    return {"bytes": size, "rounds": len(rounds), "median": med, "cold": cold, "impls": impls,
            "nulls": sorted(nulls), "mount_stats": stats}


def format_fuse(res: dict[str, Any]) -> str:
    m: dict[str, float] = res["median"]
    impls: list[str] = res["impls"]
    names = {"c": "C mount", "pyfuse3": "pyfuse3 mount"}
    rows: list[list[str]] = []

    def row(label: str, plain: str, keys: dict[str, str]) -> None:
        """plain's figure, then each mount's (keys[impl]) and its ratio to plain."""
        if plain not in m:
            return
        out = [label, f"{m[plain]:.2f}"]
        for i in impls:
            v = m.get(keys[i])
            out += [f"{v:.2f}", f"{v / m[plain]:.2f}"] if v is not None else ["", ""]
        rows.append(out)
    row("write: cp into", "cp_plain", {i: f"cp_{i}" for i in impls})
    # each mount's ceiling in its column: a null fs of its kind
    row("write: cp into a null fs of that kind", "cp_plain", {i: f"cp_{CEILING[i]}" for i in impls})
    for kind, label in (("cold", "read cold"), ("hot", "read hot")):
        for tag in ("1m", "4m"):
            row(f"{label}, {tag[0]} MiB reads", f"{kind}_{tag}_plain", {i: f"{kind}_{tag}_{i}" for i in impls})
    row("read store hot, mount cold, 1 MiB", "storehot_1m_plain", {i: f"storehot_1m_{i}" for i in impls})
    row("read from a null fs's daemon, 1 MiB", "storehot_1m_plain", {i: f"storehot_1m_{CEILING[i]}" for i in impls})
    for kind in ("cold", "hot"):
        row(f"{READERS} readers {kind}, 1 MiB reads", f"readers_{kind}_plain",
            {i: f"readers_{kind}_{i}" for i in impls})
    head = ["", "plain GB/s"] + [x for i in impls for x in (f"{names[i]} GB/s", "/ plain")]
    return render(head, rows) + (f"\n\n{res['bytes'] / MiB:.0f} MiB ({READERS} files of a quarter for the "
                                 f"readers), median of {res['rounds']} rounds")
