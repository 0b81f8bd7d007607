"""`kvfs bench --meta`: what an engine's scheduler waits for on every
request, `contains` and `prefix_match` of a batch of block keys, idle and
while other processes put 64 KiB values as fast as they can.

For each state (idle, then with --meta-putters processes putting), the
client answers from the shared location directory (kvfs.directory) and,
in the same rounds, asks the daemon the same question (the round trip the
directory replaces). p50/p99 over --meta-samples calls of 1024 keys, half
of them stored; the putters' own rate is recorded beside. In the same
rounds a step of pure CPU as long as the idle directory call (no store,
no memory traffic): its p99 is what waiting for a core adds to any call
of that length in that state, the bound under the store's own tail.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from typing import Any

from .bench_util import clean_up, commit, latencies, percentile, work_dirs
from .table import render

KEYS = 1024
VALUE = 64 * 1024
CPU_STEP = "CPU-only step (bound)"


def run_meta_bench(args: argparse.Namespace) -> dict[str, Any]:
    from kvfsd.testing import DaemonProcess

    base, work = work_dirs(args.dir, "kvfs-bench-meta-")
    d = DaemonProcess(work / "kvfs", stripes=args.stripes, capacity="4G", shm_size="512M", log=work / "kvfs.log")
    n = max(10, args.meta_samples)
    out: dict[str, Any] = {"machine": {"cpus": os.cpu_count()}, "commit": commit(), "keys": KEYS,
                           "samples": n, "putters": args.meta_putters, "states": {}}
    try:
        d.start()
        with d.connect() as s:
            keys = [f"{i:064x}" for i in range(KEYS)]
            s.put_many(keys[::2], [b"v" * 4096] * (KEYS // 2), ns="meta")
            ks = s._dir is not None
            out["directory"] = ks

            # the bound on a p99 that no store beats: a step of pure CPU as
            # long as the idle directory call (its p50 in rounds like these,
            # measured first), timed in the same rounds; its tail is the
            # time the measuring thread waited for a core
            spin_s = 0.0

            def cpu_step() -> None:
                end = time.perf_counter() + spin_s
                while time.perf_counter() < end:
                    pass

            def measure(step: bool = True) -> dict[str, dict[str, float]]:
                cases = {"contains (directory)": lambda: s.contains(keys, ns="meta"),
                         "contains (round trip)": lambda: s._contains_asked(keys, "meta"),
                         "prefix_match (directory)": lambda: s.prefix_match(keys, ns="meta"),
                         "prefix_match (round trip)": lambda: s._prefix_asked(keys, "meta")}
                if step:
                    cases[CPU_STEP] = cpu_step
                times: dict[str, list[float]] = {k: [] for k in cases}
                for _ in range(n // 10):  # interleaved in rounds of 10 calls each
                    for name, fn in cases.items():
                        times[name] += latencies(fn, 10)
                return {k: {"p50_us": percentile(v, .5) * 1e6, "p99_us": percentile(v, .99) * 1e6}
                        for k, v in times.items()}
            spin_s = measure(step=False)["contains (directory)"]["p50_us"] * 1e-6
            out["cpu_step_us"] = spin_s * 1e6
            out["states"]["idle"] = measure()
            if args.meta_putters:
                procs = [subprocess.Popen([sys.executable, "-m", "kvfstools.bench_meta", str(d.socket), str(i),
                                           str(args.meta_seconds)], stdout=subprocess.PIPE, text=True)
                         for i in range(args.meta_putters)]
                time.sleep(1.0)  # let them get going
                under = measure()
                puts = 0
                for p in procs:
                    got, _ = p.communicate(timeout=args.meta_seconds + 120)
                    puts += int(got.strip() or 0)
                out["states"][f"{args.meta_putters} putting"] = under
                out["puts_per_s"] = puts / args.meta_seconds
    finally:
        clean_up(work, base, bool(args.dir), [d])
    return out


def format_meta(res: dict[str, Any]) -> str:
    head = (f"contains / prefix_match of {res['keys']} keys (half stored), {res['samples']} calls each, "
            f"commit {res['commit']}, {res['machine']['cpus']} cores")
    rows = []
    for state, cases in res["states"].items():
        for name, v in cases.items():
            rt = cases.get(name.split(" (")[0] + " (round trip)")
            rows.append([state, name, f"{v['p50_us']:.0f}", f"{v['p99_us']:.0f}",
                         f"{rt['p50_us'] / v['p50_us']:.1f}x" if rt and "directory" in name else ""])
    text = head + "\n" + render(["state", "call", "p50 us", "p99 us", "faster than the round trip"], rows)
    if "cpu_step_us" in res:
        text += (f"\n{CPU_STEP}: a busy loop of {res['cpu_step_us']:.0f} us (the idle directory contains' p50), "
                 "timed in the same rounds: its p99 is the wait for a core")
    if "puts_per_s" in res:
        text += f"\nputters: {res['putters']} processes, {res['puts_per_s']:.0f} puts of 64 KiB/s in all"
    return text


def _putter(sock: str, seed: int, seconds: float) -> int:
    """Put 64 KiB values in batches of 16 for ``seconds``, deleting the
    oldest as it goes (the store stays small); returns how many."""
    import kvfs
    val = os.urandom(VALUE)
    done = 0
    with kvfs.connect(sock) as s:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            ks = [f"p{seed}-{done + j}" for j in range(16)]
            s.put_many(ks, [val] * 16, ns="meta-put")
            done += 16
            if done >= 2048 and done % 1024 == 0:
                s.delete([f"p{seed}-{j}" for j in range(done - 2048, done - 1024)], ns="meta-put")
    return done


if __name__ == "__main__":
    print(_putter(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))
