"""`kvfs bench --lmcache`: LMCache's storage tiers on the same chunks.

The same 256-token chunks (a real model's geometry, Llama-3.1-8B by
default: 32 layers x K/V x 256 tokens x 8 KV heads x 128, bf16 = 32 MiB)
are stored and retrieved through LMCache's own backend classes, in one
process, interleaved round by round:

  kvfs            LMCache's RemoteBackend over the kvfs plugin
                  (kvfs.integrations.lmcache), a daemon with its T0 arena
  kvfs, T1 only   the same with no arena: every read from the segment files
  local_disk      LMCache's LocalDiskBackend (one file per chunk)
  fs://           LMCache's RemoteBackend over its FSConnector

store: the batch submitted until the last chunk is stored (acknowledged by
kvfs / on the backend's books), GB/s. retrieve: batched_get_blocking of
the batch into LMCache's CPU buffers, page cache warm (right after the
store) and, where this process may drop the page cache, cold. kvfs checks
every chunk's checksum as it reads; the file backends check nothing. The
first round checks every retrieved byte against what was stored. Median
over --repeat rounds. The files of all four live on the same disk
(--dir).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import threading
import time
from typing import Any, Callable

from .bench_util import clean_up, commit, work_dirs
from .table import render

MiB = 1 << 20
GiB = 1 << 30
CHUNK_TOKENS = 256
# (name, layers, kv heads, head size)
GEOMETRY = {"llama-3.1-8b": ("Llama-3.1-8B", 32, 8, 128), "tiny": ("tiny (2 layers)", 2, 2, 64)}


def _wait(done: Callable[[], bool], what: str, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.0005)


class Tier:
    """One of LMCache's storage backends, driven as LMCache's engine drives it."""

    def __init__(self, name: str, backend: Any):
        self.name, self.backend = name, backend

    def store(self, keys: list[Any], objs: list[Any]) -> None:
        """Submit the batch; return once the backend calls back for its last key."""
        done: list[Any] = []
        self.backend.batched_submit_put_task(keys, objs, on_complete_callback=done.append)
        _wait(lambda: len(done) >= len(keys), f"{self.name} to store")

    def retrieve(self, keys: list[Any]) -> list[Any]:
        got = self.backend.batched_get_blocking(keys)
        if any(o is None for o in got):
            raise RuntimeError(f"{self.name}: {sum(o is None for o in got)} of {len(keys)} chunks did not come back")
        return list(got)

    def remove(self, keys: list[Any]) -> None:
        for k in keys:
            self.backend.remove(k, force=True)


def run_lmcache_bench(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("LMCACHE_LOG_LEVEL", "WARNING")  # read as LMCache makes its loggers
    import torch
    from lmcache.utils import CacheEngineKey
    from lmcache.v1.config import LMCacheEngineConfig
    from lmcache.v1.metadata import LMCacheMetadata
    from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend
    from lmcache.v1.storage_backend.local_disk_backend import LocalDiskBackend
    from lmcache.v1.storage_backend.remote_backend import RemoteBackend

    from kvfsd.testing import DaemonProcess

    from .bench_util import drop_caches

    label, layers, heads, head = GEOMETRY[args.lmcache_geometry]
    n, reps = args.lmcache_chunks, max(1, args.repeat)
    shape = (layers, 2, CHUNK_TOKENS, heads, head)
    chunk_bytes = layers * 2 * CHUNK_TOKENS * heads * head * 2
    base, work = work_dirs(args.dir, "kvfs-bench-lmcache-")
    daemons = [DaemonProcess(work / "kvfs", stripes=args.stripes, shm_size=max(256 * MiB, 2 * n * chunk_bytes),
                             capacity=str(8 * n * chunk_bytes), log=work / "kvfs.log"),
               DaemonProcess(work / "kvfs-t1", stripes=args.stripes, shm_size=0,
                             capacity=str(8 * n * chunk_bytes), log=work / "kvfs-t1.log")]
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    tiers: list[Tier] = []
    out: dict[str, Any] = {"machine": {"cpus": os.cpu_count()}, "commit": commit(),
                           "geometry": {"model": label, "shape": list(shape), "dtype": "bfloat16",
                                        "chunk_tokens": CHUNK_TOKENS, "chunk_bytes": chunk_bytes},
                           "chunks": n, "repeat": reps}
    try:
        for d in daemons:
            d.start()
        cpu_gb = (2 * n * chunk_bytes + 256 * MiB) / GiB  # the sources and one retrieved batch

        def config(**kw: Any) -> Any:
            return LMCacheEngineConfig.from_defaults(chunk_size=CHUNK_TOKENS, local_cpu=False,
                                                     max_local_cpu_size=cpu_gb, **kw)

        md = LMCacheMetadata(model_name="bench/model", world_size=1, local_world_size=1, worker_id=0,
                             local_worker_id=0, kv_dtype=torch.bfloat16, kv_shape=shape)
        cpu = LocalCPUBackend(config(), md)
        for name, d in (("kvfs", daemons[0]), ("kvfs, T1 only", daemons[1])):
            cfg = config(remote_storage_plugins=["kvfs"], extra_config={
                "remote_storage_plugin.kvfs.module_path": "kvfs.integrations.lmcache",
                "remote_storage_plugin.kvfs.class_name": "KvfsConnector",
                "remote_storage_plugin.kvfs.socket": str(d.socket)})
            rb = RemoteBackend(cfg, md, loop, cpu, "cpu", plugin_name="kvfs")
            tiers.append(Tier(name, rb))
        (work / "disk").mkdir()
        ld = LocalDiskBackend(config(local_disk=str(work / "disk") + "/", max_local_disk_size=8 * n * chunk_bytes / GiB),
                              loop, cpu, "cpu", metadata=md)
        tiers.append(Tier("local_disk", ld))
        (work / "fs").mkdir()
        # the host and port are unused by fs://, but LMCache's URL parser wants them
        fs = RemoteBackend(config(remote_url=f"fs://127.0.0.1:0{work / 'fs'}/"), md, loop, cpu, "cpu")
        tiers.append(Tier("fs://", fs))

        fsc = fs.connection._connector  # under LMCache's InstrumentedRemoteConnector
        shapes, dtypes, fmt = fsc.meta_shapes, fsc.meta_dtypes, fsc.meta_fmt
        srcs = []
        g = torch.Generator().manual_seed(1)
        for _ in range(n):
            o = cpu.allocate(shapes, dtypes, fmt)
            o.tensor.copy_(torch.randn(o.tensor.shape, generator=g).to(o.tensor.dtype))
            srcs.append(o)
        want = [bytes(o.byte_array) for o in srcs[:n]]
        can_drop = drop_caches()
        times: dict[str, dict[str, list[float]]] = {t.name: {"store": [], "warm": [], "cold": []} for t in tiers}
        for r in range(reps):
            for t in tiers:  # interleaved: each round runs every tier once, in the same order
                keys = [CacheEngineKey("bench/model", 1, 0, hash((t.name, r, i)) & (2**63 - 1), torch.bfloat16)
                        for i in range(n)]
                t0 = time.perf_counter()
                t.store(keys, srcs)
                times[t.name]["store"].append(time.perf_counter() - t0)
                for when in ("warm", "cold"):
                    if when == "cold" and not (can_drop and drop_caches()):
                        continue
                    t0 = time.perf_counter()
                    got = t.retrieve(keys)
                    times[t.name][when].append(time.perf_counter() - t0)
                    if r == 0 and [bytes(o.byte_array) for o in got] != want:
                        raise RuntimeError(f"{t.name}: retrieved bytes differ from what was stored")
                    for o in got:
                        o.ref_count_down()
                t.remove(keys)
        total = n * chunk_bytes
        out["tiers"] = {name: {k: (total / statistics.median(v) / 1e9 if v else None) for k, v in ts.items()}
                        for name, ts in times.items()}
        out["cold_measured"] = can_drop
        for o in srcs:
            o.ref_count_down()
    finally:
        for t in tiers:
            try:
                t.backend.close()
            except Exception:  # noqa: BLE001 - closing what a failed run left
                pass
        loop.call_soon_threadsafe(loop.stop)
        clean_up(work, base, bool(args.dir), daemons)
    return out


def format_lmcache(res: dict[str, Any]) -> str:
    g = res["geometry"]
    ref = res["tiers"]["local_disk"]

    def cell(v: float | None, base: float | None) -> list[str]:
        if v is None:
            return ["n/a", ""]
        return [f"{v:.2f}", f"{v / base:.2f}x" if base else ""]

    rows = [[name] + cell(t["store"], ref["store"]) + cell(t["warm"], ref["warm"]) + cell(t["cold"], ref["cold"])
            for name, t in res["tiers"].items()]
    head = (f"LMCache tiers, {res['chunks']} chunks of {g['chunk_tokens']} tokens ({g['model']}, "
            f"{g['chunk_bytes'] / MiB:.0f} MiB each), median of {res['repeat']}, commit {res['commit']}, "
            f"{res['machine']['cpus']} cores")
    return head + "\n" + render(["tier", "store GB/s", "vs local_disk", "retrieve warm GB/s", "vs local_disk",
                                 "retrieve cold GB/s", "vs local_disk"], rows)
