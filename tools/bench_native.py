"""`kvfs bench --native`: where the C data plane (kvfs._native) helps and
where it does not, against its pure-Python twin (kvfs._native_py), on the
same bytes in the same run.

Three loops, each in batches of BATCH blocks as `get_many_into` issues them:
  read      verified pread of a page-cache-hot file into distinct buffers
  copy      verified copy out of a /dev/shm mapping (what a T0 get does)
  get_many  the whole client path: get_many_into from a T0 daemon
"""
from __future__ import annotations

import argparse
import mmap
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from .bench_util import clean_up, median_seconds
from .table import render

KiB, MiB = 1 << 10, 1 << 20
BATCH = 64


def run_native_bench(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import xxhash

    from kvfs import _native_py, native
    from kvfsd.testing import DaemonProcess

    from .bench_compare import _aligned

    try:
        from kvfs import _native  # type: ignore[attr-defined]
    except ImportError:
        raise SystemExit("kvfs._native is not built: nothing to compare") from None
    total = int(args.total * args.scale)
    threads = [int(t) for t in str(args.threads).split(",")]
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="kvfs-native-"))
    work = base / f"native-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    src = _aligned(total)
    src[:] = np.random.default_rng(1).integers(0, 256, total, dtype=np.uint8)
    dst = _aligned(total)
    dst[:] = 1
    fpath = work / "data.bin"
    fpath.write_bytes(src.tobytes())
    shm_path = Path("/dev/shm") / f"kvfs-bench-native-{os.getpid()}"
    fd = os.open(fpath, os.O_RDONLY)
    sfd = os.open(shm_path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(sfd, total)
    shm = mmap.mmap(sfd, total)
    shm[:] = src.tobytes()
    d = DaemonProcess(work / "store", capacity=str(2 * total + (1 << 30)), shm_size=str(total + total // 2),
                      log=work / "daemon.log")
    rows: list[dict[str, Any]] = []
    old = native.name
    try:
        d.start()
        for bs in [b for b in (64 * KiB, 1 * MiB, 8 * MiB) if b <= total]:
            count = total // bs
            n = count * bs
            dv = [dst[i * bs:(i + 1) * bs] for i in range(count)]
            sv = [memoryview(shm)[i * bs:(i + 1) * bs] for i in range(count)]
            sums = [xxhash.xxh3_128_digest(src[i * bs:(i + 1) * bs]) for i in range(count)]
            offs = [i * bs for i in range(count)]
            keys = [f"n{bs}-{i}" for i in range(count)]
            with d.connect() as w:
                for i in range(0, count, BATCH):
                    w.put_many(keys[i:i + BATCH], [memoryview(src[j * bs:(j + 1) * bs])
                                                   for j in range(i, min(count, i + BATCH))])
                w.flush()
            for t in threads:
                for name, mod in (("native", _native), ("python", _native_py)):
                    def batches(fn: Callable[[slice], Any]) -> None:
                        for i in range(0, count, BATCH):
                            fn(slice(i, i + BATCH))
                    read = median_seconds(lambda: batches(lambda sl: mod.read_many(
                        [fd] * len(offs[sl]), offs[sl], dv[sl], sums[sl], t)), args.repeat)
                    copy = median_seconds(lambda: batches(lambda sl: mod.copy_many(dv[sl], sv[sl], sums[sl], t)), args.repeat)
                    native.use(name)
                    with d.connect(threads=t) as r:
                        r.get_many_into(keys, dv)  # warm: arena mapped, locations known
                        get = median_seconds(lambda: batches(lambda sl: r.get_many_into(keys[sl], dv[sl])), args.repeat)
                    native.use(old)
                    if not np.array_equal(dst[:n], src[:n]):
                        raise AssertionError("native bench: bytes differ")
                    rows.append({"block": bs, "threads": t, "backend": name, "read_gbs": n / read / 1e9,
                                 "copy_gbs": n / copy / 1e9, "get_many_gbs": n / get / 1e9})
    finally:
        native.use(old)
        if d.alive():
            d.stop()
        try:
            shm.close()
        except BufferError:
            pass  # views of it are still alive (an error above): the process ends soon
        os.close(sfd)
        os.close(fd)
        shm_path.unlink(missing_ok=True)
        clean_up(work, base, bool(args.dir))
    return {"total_bytes": total, "batch": BATCH, "simd": getattr(_native, "SIMD", "?"), "rows": rows}


def format_native(res: dict[str, Any]) -> str:
    out = []
    by = {(r["block"], r["threads"], r["backend"]): r for r in res["rows"]}
    for (bs, t, b), r in by.items():
        if b != "native":
            continue
        p = by[(bs, t, "python")]
        out.append([f"{bs // KiB} KiB", t] + [f"{r[k]:.2f} / {p[k]:.2f} ({r[k] / p[k]:.2f}x)"
                                               for k in ("read_gbs", "copy_gbs", "get_many_gbs")])
    return render(["block", "thr", "verified read GB/s: C / Python", "verified copy from shm", "get_many_into (T0)"],
                  out) + f"\n\nbatches of {res['batch']} blocks; C hashing: {res['simd']}"
