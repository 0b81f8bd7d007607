"""`kvfs bench --gpu`: kvfs reads into and puts from device memory next to
the physical limits, measured in the same run on the same bytes:

  pinned H2D / D2H   cudaMemcpyAsync between pinned host memory and the
                     device (the PCIe limit for T0 -> GPU and GPU -> T0)
  raw kvikio         CuFile.pread of the same bytes from a plain file on the
                     same disk (page-cache hot, and cold after drop_caches)
  kvfs T0 -> GPU     get_many_into device slices, values in the arena
  kvfs T1 -> GPU     the same with T0 off: hot, and cold (caches dropped)
  kvfs put           put_many from device slices (into T0), checksums taken
                     on the GPU (default) and, for reference, on the host
  verify="full"      T0 and T1 (kvikio) reads hashed on the GPU where they
                     landed; T1 staged reads hashed in staging

Destinations are slices of one large device buffer. Blocks of 1, 2, 8 and
64 MiB; T1 and raw reads with several kvikio thread counts.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from kvfs.optional import need

from .bench_util import clean_up, median_seconds
from .table import render

MiB = 1 << 20


def run_gpu_bench(args: argparse.Namespace) -> dict[str, Any]:
    cp = need("cupy")  # one line and exit 2 if missing (kvfs.optional)
    import numpy as np

    from kvfs.gpu import DeviceBuffer, _kvikio
    from kvfsd.testing import DaemonProcess

    from .bench_util import drop_caches

    kvikio = _kvikio()
    total = int(args.total * args.scale)
    from kvfs.sizes import parse_size
    blocks = [parse_size(b) for b in (args.blocks or "1M,2M,8M,64M").split(",")]
    threads = [int(t) for t in (args.threads if args.threads != "1,4,16" else "1,8,32").split(",")]
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="kvfs-gpu-"))
    work = base / f"gpu-{os.getpid()}"
    work.mkdir(parents=True)
    rt = cp.cuda.runtime
    stream = cp.cuda.Stream(non_blocking=True)
    dev = cp.empty(total, dtype=cp.uint8)
    src = cp.random.default_rng(7).integers(0, 256, total, dtype=cp.uint8)
    pinned = cp.cuda.alloc_pinned_memory(total)
    host = np.frombuffer(pinned, dtype=np.uint8, count=total)
    host[:] = cp.asnumpy(src)
    plain = work / "plain.bin"
    host.tofile(plain)
    props = rt.getDeviceProperties(0)
    res: dict[str, Any] = {"device": props["name"].decode(), "bytes": total, "rows": []}
    rep = args.repeat

    def copy_all(kind: int, bs: int) -> None:
        for off in range(0, total, bs):
            if kind == 1:
                rt.memcpyAsync(dev.data.ptr + off, pinned.ptr + off, bs, 1, stream.ptr)
            else:
                rt.memcpyAsync(pinned.ptr + off, dev.data.ptr + off, bs, 2, stream.ptr)
        stream.synchronize()

    def kvikio_all(bs: int) -> None:
        with kvikio.CuFile(str(plain), "r") as f:
            futs = [f.pread(dev[off:off + bs], bs, off) for off in range(0, total, bs)]
            for fu in futs:
                fu.get()

    d0 = DaemonProcess(work / "t0", capacity=str(4 * total + (1 << 30)), shm_size=str(2 * total + (256 << 20)))
    d1 = DaemonProcess(work / "t1", capacity=str(4 * total + (1 << 30)), shm_size=0)
    cold = os.geteuid() == 0 and not args.no_cold
    try:
        d0.start()
        d1.start()
        # one Store per daemon and reader kind, as an inference process keeps
        # one: the arena is registered with CUDA once, before any timing
        s0 = d0.connect(threads=max(threads))
        s0.pin_arena()
        s0_host = d0.connect(threads=max(threads))  # puts hashed on the host, after the copy
        s0_host.pin_arena()
        s0_host._gpu_plane()._hasher = None
        s0_full = d0.connect(threads=max(threads), verify="full")
        s0_full.pin_arena()
        s1 = {"kvikio": d1.connect(threads=max(threads), gpu_reader="kvikio") if kvikio is not None else None,
              "staging": d1.connect(threads=max(threads), gpu_reader="staging")}
        for bs in blocks:
            n = total // bs
            slices = [DeviceBuffer(dev.data.ptr + i * bs, bs, False, dev) for i in range(n)]
            srcs = [DeviceBuffer(src.data.ptr + i * bs, bs, False, src) for i in range(n)]
            row: dict[str, Any] = {"block": bs}
            row["h2d"] = total / median_seconds(lambda: copy_all(1, bs), rep) / 1e9
            row["d2h"] = total / median_seconds(lambda: copy_all(2, bs), rep) / 1e9
            ns = f"b{bs}"
            keys = [f"k{i}" for i in range(n)]
            for col, st in (("put_t0", s0), ("put_host", s0_host)):
                puts = []
                # fresh keys each round: a put of a stored key is a no-op; the
                # first round is not timed, as median_seconds' warm-up (the
                # first device put compiles the hash kernels: it made the
                # first block size's figure read 0.4-0.6 x D2H)
                for r in range(rep + 1):
                    t = time.perf_counter()
                    st.put_many([f"p{r}-{k}" for k in keys], srcs, ns=ns)
                    if r:
                        puts.append(time.perf_counter() - t)
                    st.flush()
                    st.delete([f"p{r}-{k}" for k in keys], ns=ns)
                row[col] = total / statistics.median(puts) / 1e9
            s0.put_many(keys, srcs, ns=ns)
            s0.flush()
            row["t0"] = total / median_seconds(lambda: s0.get_many_into(keys, slices, ns=ns), rep) / 1e9
            assert bool((dev == src).all()), "T0 -> GPU returned other bytes"
            dev.fill(0)
            row["t0_full"] = total / median_seconds(lambda: s0_full.get_many_into(keys, slices, ns=ns), rep) / 1e9
            assert bool((dev == src).all()), "T0 -> GPU (verify='full') returned other bytes"
            s1["staging"].put_many(keys, srcs, ns=ns)
            s1["staging"].flush()
            for t_n in threads:
                if kvikio is not None:
                    kvikio.defaults.set("num_threads", t_n)
                    row[f"raw_hot_{t_n}"] = total / median_seconds(lambda: kvikio_all(bs), rep) / 1e9
                    row[f"t1_hot_{t_n}"] = total / median_seconds(
                        lambda: s1["kvikio"].get_many_into(keys, slices, ns=ns), rep) / 1e9
                    sf = d1.connect(threads=t_n, gpu_reader="kvikio", verify="full")
                    row[f"t1_kvikio_full_{t_n}"] = total / median_seconds(
                        lambda: sf.get_many_into(keys, slices, ns=ns), rep) / 1e9
                    sf.close()
                for col, verify in (("t1_staged", True), ("t1_full", "full")):
                    st = d1.connect(threads=t_n, gpu_reader="staging", verify=verify)
                    row[f"{col}_{t_n}"] = total / median_seconds(lambda: st.get_many_into(keys, slices, ns=ns), rep) / 1e9
                    st.close()
            for kind, st in s1.items():
                if st is None:
                    continue
                dev.fill(0)
                st.get_many_into(keys, slices, ns=ns)
                assert bool((dev == src).all()), f"T1 -> GPU ({kind}) returned other bytes"
            if cold:
                t_n = threads[-1]
                if kvikio is not None:
                    kvikio.defaults.set("num_threads", t_n)
                runs: dict[str, Callable[[], Any]] = {
                    "t1_staged_cold": lambda: s1["staging"].get_many_into(keys, slices, ns=ns)}
                if kvikio is not None:
                    runs["raw_cold"] = lambda: kvikio_all(bs)
                    runs["t1_cold"] = lambda: s1["kvikio"].get_many_into(keys, slices, ns=ns)
                for name, fn in runs.items():
                    ts = []
                    for _ in range(rep):
                        drop_caches()
                        t = time.perf_counter()
                        fn()
                        ts.append(time.perf_counter() - t)
                    row[name] = total / statistics.median(ts) / 1e9
            s0.delete(keys, ns=ns)
            s1["staging"].delete(keys, ns=ns)
            res["rows"].append(row)
        res["capabilities"] = s0.capabilities()
        for st in [s0, s0_host, s0_full, *s1.values()]:
            if st is not None:
                st.close()
    finally:
        clean_up(work, base, bool(args.dir), [d0, d1])
    res["threads"] = threads
    return res


def format_gpu(res: dict[str, Any]) -> str:
    """Two tables: T0 and puts against pinned copies; T1 against pinned H2D
    and raw kvikio."""
    nan = float("nan")
    rows = []
    for r in res["rows"]:
        rows.append([f"{r['block'] // MiB} MiB", f"{r['h2d']:.1f}", f"{r['t0']:.1f}", f"{r['t0'] / r['h2d']:.2f}",
                     f"{r['t0_full']:.1f}", f"{r['d2h']:.1f}", f"{r['put_t0']:.1f}", f"{r['put_t0'] / r['d2h']:.2f}",
                     f"{r['put_host']:.1f}"])
    out = render(["block", "pinned H2D", "T0 -> GPU", "/ H2D", "T0, verify=full", "pinned D2H", "GPU -> put",
                  "/ D2H", "put, host-hashed"], rows)
    rows = []
    for r in res["rows"]:
        for n in res["threads"]:
            rows.append([f"{r['block'] // MiB} MiB", str(n), f"{r.get(f'raw_hot_{n}', nan):.1f}",
                         f"{r.get(f't1_hot_{n}', nan):.1f}", f"{r[f't1_staged_{n}']:.1f}",
                         f"{r.get(f't1_kvikio_full_{n}', nan):.1f}", f"{r[f't1_full_{n}']:.1f}",
                         f"{max(r.get(f't1_hot_{n}', 0), r[f't1_staged_{n}']) / r['h2d']:.2f}"])
    out += "\n\n" + render(["block", "threads", "raw kvikio", "T1 kvikio", "T1 staged", "T1 kvikio, verify=full",
                             "T1 staged, verify=full", "best / H2D"], rows)
    rows = []
    for r in res["rows"]:
        if "t1_staged_cold" in r:
            raw = r.get("raw_cold", nan)
            best = max(r.get("t1_cold", 0), r["t1_staged_cold"])
            rows.append([f"{r['block'] // MiB} MiB", f"{raw:.2f}", f"{r.get('t1_cold', nan):.2f}",
                         f"{r['t1_staged_cold']:.2f}", f"{best / raw:.2f}"])
    if rows:
        out += "\n\n" + render(["block (cold)", "raw kvikio", "T1 kvikio", "T1 staged", "best / raw"], rows)
    return out + (f"\n\nGB/s; {res['device']}; {res['bytes'] / MiB:.0f} MiB per block size; medians of "
                  f"warm runs; capabilities {res.get('capabilities')}")
