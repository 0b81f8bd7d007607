"""`kvfs bench --gpu --multi`: one process per GPU, all reading from one
daemon at once, against one process alone, in the same run.

Each process reads a set of blocks shared by all and a set of its own
(disjoint) into its GPU with ``get_many_into``, from T0. The figure is the
aggregate GB/s of N processes started together against N x the GB/s of one
process alone.

Workers are this module run as ``python -m kvfstools.bench_multigpu
--worker``: each sees one GPU (CUDA_VISIBLE_DEVICES), says "ready", waits
for "go" on stdin (so all start together), and prints its result as JSON.
"""
from __future__ import annotations

import argparse
import json
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

MiB = 1 << 20


def _worker(args: argparse.Namespace) -> int:
    cp = need("cupy")  # one line and exit 2 if missing (kvfs.optional)

    import kvfs
    from kvfs.gpu import DeviceBuffer

    keys = json.loads(args.keys)
    bs = args.block
    dev = cp.empty(len(keys) * bs, dtype=cp.uint8)
    outs = [DeviceBuffer(dev.data.ptr + i * bs, bs, False, dev) for i in range(len(keys))]
    with kvfs.connect(args.socket, threads=args.threads) as s:
        s.pin_arena()  # before any timing
        assert s.get_many_into(keys, outs, ns="mg") == [bs] * len(keys)  # warm, and checked
        print("ready", flush=True)
        sys.stdin.readline()
        ts = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            s.get_many_into(keys, outs, ns="mg")
            ts.append(time.perf_counter() - t)
    print(json.dumps({"bytes": len(keys) * bs, "seconds": ts, "start": time.time()}), flush=True)
    return 0


def _run_workers(gpus: list[int], keysets: list[list[str]], sock: str, bs: int, repeat: int,
                 threads: int) -> list[dict[str, Any]]:
    procs = []
    for g, keys in zip(gpus, keysets):
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(g))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "kvfstools.bench_multigpu", "--worker", "--socket", sock, "--block", str(bs),
             "--repeat", str(repeat), "--threads", str(threads), "--keys", json.dumps(keys)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env))
    for p in procs:
        line = p.stdout.readline() if p.stdout else ""
        if line.strip() != "ready":
            raise RuntimeError(f"a worker did not start: {line!r}")
    for p in procs:  # all together
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    out = []
    for p in procs:
        stdout, _ = p.communicate(timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"a worker failed ({p.returncode})")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def run_multigpu_bench(args: argparse.Namespace) -> dict[str, Any]:
    cp = need("cupy")  # one line and exit 2 if missing (kvfs.optional)
    import numpy as np

    import kvfs
    from kvfsd.testing import DaemonProcess

    n = cp.cuda.runtime.getDeviceCount()
    if n < 2:
        raise SystemExit("kvfs bench --gpu --multi needs at least 2 GPUs")
    gpus = list(range(n))
    bs = 8 * MiB
    per = max(2, int(args.total * args.scale) // bs // 2)  # blocks shared, and blocks of each process's own
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="kvfs-mgpu-"))
    work = base / f"mgpu-{os.getpid()}"
    total_blocks = per * (1 + n)
    d = DaemonProcess(work / "s", capacity=str(2 * total_blocks * bs + (1 << 30)),
                      shm_size=str(total_blocks * bs + (512 << 20)))
    res: dict[str, Any] = {"gpus": n, "device": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(),
                           "block": bs, "per_process_bytes": 2 * per * bs}
    try:
        d.start()
        rng = np.random.default_rng(5)
        shared = [f"shared{i}" for i in range(per)]
        own = [[f"own{g}-{i}" for i in range(per)] for g in gpus]
        with kvfs.connect(str(d.socket)) as s:
            for keys in [shared, *own]:
                s.put_many(keys, [rng.integers(0, 256, bs, dtype=np.uint8) for _ in keys], ns="mg")
            s.flush()
        keysets = [shared + own[g] for g in gpus]
        one = _run_workers([0], keysets[:1], str(d.socket), bs, args.repeat, 16)[0]
        res["single_gbps"] = one["bytes"] / statistics.median(one["seconds"]) / 1e9
        many = _run_workers(gpus, keysets, str(d.socket), bs, args.repeat, 16)
        # aggregate: all bytes over the wall time of the slowest, round by round
        rounds = [sum(w["bytes"] for w in many) / max(w["seconds"][r] for w in many) / 1e9
                  for r in range(args.repeat)]
        res["aggregate_gbps"] = statistics.median(rounds)
        res["per_process_gbps"] = [w["bytes"] / statistics.median(w["seconds"]) / 1e9 for w in many]
        res["ratio_to_n_x_single"] = res["aggregate_gbps"] / (n * res["single_gbps"])
    finally:
        clean_up(work, base, bool(args.dir), [d])
    return res


def format_multigpu(res: dict[str, Any]) -> str:
    per = ", ".join(f"{x:.1f}" for x in res["per_process_gbps"])
    return (f"{res['gpus']} x {res['device']}, T0 -> GPU, {res['block'] // MiB} MiB blocks, "
            f"{res['per_process_bytes'] / MiB:.0f} MiB per process (half shared by all, half its own)\n"
            f"one process alone:       {res['single_gbps']:.1f} GB/s\n"
            f"{res['gpus']} processes at once:  {res['aggregate_gbps']:.1f} GB/s aggregate (per process: {per})\n"
            f"aggregate / ({res['gpus']} x single): {res['ratio_to_n_x_single']:.2f}")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true")
    p.add_argument("--socket")
    p.add_argument("--block", type=int)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--keys")
    args = p.parse_args()
    if not args.worker:
        p.error("run through `kvfs bench --gpu --multi`")
    return _worker(args)


if __name__ == "__main__":
    sys.exit(main())
