"""Where the daemon's per-object CPU goes for a T0 put, phase by phase.

An engine runs in this process (real LMDB, real segment files, a real
arena; no socket, no write-back pool), and a batch of values goes through
exactly the calls the server and the write-back make for a ``put_t0``:

  prepare      items, keys and the client's checksums checked (one pass
               in C), T1 space reserved, arena extents carved
               (``prepare_placed``)
  publish T0   dirty mirror entries, the directory, the T0 journal
  records      each record's header encoded and the records written,
               coalesced (``t0_write_records``, in C with the GIL
               released): mostly the kernel's copy of the bytes
  LMDB         the publishing transaction on the writer thread
  mirror       the mirror and directory after the commit (``finish_commit``)

The garbage collector runs as in the daemon (``kvfsd.gc_policy``: young
collections every 20,000 allocations, what lived before the run frozen);
with CPython's default (every 700) the collections landed on publish T0
and made it read 5-16 us per object instead of 3-5 here.

Per object, the fastest of a few runs (this is a noisy VM). What the
socket, msgpack and thread hand-offs add is the rest of ``kvfs bench
--puts``'s daemon CPU figure.
"""
from __future__ import annotations

import gc
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

BATCH = 64
PHASES = ["prepare", "publish T0", "records", "LMDB", "mirror"]


def _one_run(value: int, batches: int) -> dict[str, float]:
    from kvfs import format as fmt
    from kvfs import native
    from kvfsd.config import Config
    from kvfsd.engine import Engine
    from kvfsd.gc_policy import GcPolicy

    root = Path(tempfile.mkdtemp(prefix="kvfs-phases-"))
    eng = Engine(Config(root=root / "e", capacity=8 << 30, shm_size=1 << 30).resolve())
    threshold = gc.get_threshold()
    GcPolicy().started()  # as the server does once the engine is open
    try:
        assert eng.wb_pool is not None and eng.t0 is not None
        eng.wb_pool.stop()  # this run does the write-back itself, phase by phase
        eng.wb_pool = None
        sums = [fmt.checksum(bytes(value)), [fmt.checksum(bytes(value))]]
        step, _align = fmt.arena_rounded(value)
        spent: defaultdict[str, float] = defaultdict(float)
        plans = []
        for b in range(batches):
            off, size = eng.reserve_arena(BATCH * step + 4096)
            rest = [off, off + size]
            offs = [off + i * step for i in range(BATCH)]
            raw = [[f"b{b}-{j}", value, None, offs[j], sums] for j in range(BATCH)]
            t = time.perf_counter()
            plan = eng.prepare_placed("default", raw, rest, may_evict=False)
            t2 = time.perf_counter()
            eng.publish_t0(plan)
            t3 = time.perf_counter()
            spent["prepare"] += t2 - t
            spent["publish T0"] += t3 - t2
            eng.release_arena(*rest)
            plans.append(plan)
        arena = eng.t0.arena.view
        for i in range(0, len(plans), 8):  # as the pool does: several plans a batch
            group = plans[i:i + 8]
            t = time.perf_counter()
            with eng._lock:
                fds = {sid: eng.segs[sid].fd for p in group for sid in p.touched}
            failed, _runs = native.backend.t0_write_records(
                [(p.ns.encode(), p.items, k) for k, p in enumerate(group)], arena, fds)
            assert not failed
            t2 = time.perf_counter()
            jobs = [eng.publish_job(p, False, shared=k == 0) for k, p in enumerate(group)]
            done = eng.writer.call(lambda txn: [job(txn) for job in jobs], sync=False)
            t3 = time.perf_counter()
            for p, d in zip(group, done):
                eng.finish_commit(p, d)
            t4 = time.perf_counter()
            spent["records"] += t2 - t
            spent["LMDB"] += t3 - t2
            spent["mirror"] += t4 - t3
        n = batches * BATCH
        return {k: spent[k] / n * 1e6 for k in PHASES}
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
        eng.close()
        import shutil
        shutil.rmtree(root, ignore_errors=True)


def run_phases(quick: bool, values: tuple[int, ...] = (4096, 65536)) -> dict[str, Any]:
    """Per value size: µs per object of each phase (the fastest of the runs)."""
    batches, runs = (20, 2) if quick else (150, 3)
    out: dict[str, Any] = {"batch": BATCH, "objects": batches * BATCH, "runs": runs}
    for v in values:
        best: dict[str, float] = {}
        for _ in range(runs):
            for k, us in _one_run(v, batches).items():
                best[k] = min(best.get(k, us), us)
        out[str(v)] = best
    return out


def format_phases(res: dict[str, Any]) -> str:
    from .table import render
    sizes = [k for k in res if k.isdigit()]
    rows = [[p] + [f"{res[s][p]:.1f}" for s in sizes] for p in PHASES]
    rows.append(["all phases"] + [f"{sum(res[s].values()):.1f}" for s in sizes])
    head = ["daemon work per T0 put, in-process, us/object"] + [f"{int(s) >> 10} KiB" for s in sizes]
    return (render(head, rows) + f"\n(batches of {res['batch']}, {res['objects']} objects, the fastest of "
            f"{res['runs']} runs; socket, msgpack and thread hand-offs not included)")
