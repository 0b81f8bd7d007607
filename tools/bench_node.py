"""`kvfs bench --gpu --node`: every GPU of the node at once against one
daemon, in the published token-warehouse table's three patterns, next to
the node's own limits measured in the same run.

Patterns, per GPU process: 2048 x 1 MiB (2 GiB), 512 x 8 MiB (4 GiB),
64 x 64 MiB (4 GiB). Phases, all processes together (one process per GPU,
``--threads`` data-plane threads each):

  h2d / d2h     pinned host <-> device copies of the pattern's bytes: the
                PCIe limit, per GPU and all together
  write T0      put_many from device memory into a T0 daemon
  read T0       get_many_into device memory from it
  write T1      put_many from device memory into a T1-only daemon
  read T1 hot   get_many_into from it (page cache warm)
  read T1 cold  the same after dropping the page cache (root only)
  disk          raw parallel pread of plain files, caches dropped (root only)

Aggregate GB/s is all processes' bytes over the slowest one's time.
Workers are this module (``python -m kvfstools.bench_node --worker``): one
GPU each (CUDA_VISIBLE_DEVICES), JSON commands on stdin, each run after the
coordinator's "go" so all start together.
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
PATTERNS = [(1 * MiB, 2048), (8 * MiB, 512), (64 * MiB, 64)]


def _worker(args: argparse.Namespace) -> int:
    cp = need("cupy")  # one line and exit 2 if missing (kvfs.optional)

    import kvfs
    from kvfs.gpu import DeviceBuffer

    g = args.gpu
    stores: dict[str, Any] = {}
    rt = cp.cuda.runtime
    stream = cp.cuda.Stream(non_blocking=True)
    state: dict[str, Any] = {}
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "quit":
            break
        if op == "setup":
            bs, n = cmd["block"], cmd["count"]
            state.clear()
            state["bs"], state["n"] = bs, n
            state["src"] = cp.random.default_rng(100 + g).integers(0, 256, bs * n, dtype=cp.uint8)
            state["dst"] = cp.empty(bs * n, dtype=cp.uint8)
            state["pinned"] = cp.cuda.alloc_pinned_memory(bs * n)
            state["srcs"] = [DeviceBuffer(state["src"].data.ptr + i * bs, bs, False, state["src"]) for i in range(n)]
            state["outs"] = [DeviceBuffer(state["dst"].data.ptr + i * bs, bs, False, state["dst"]) for i in range(n)]
            for name in ("t0", "t1"):
                if name not in stores:
                    stores[name] = kvfs.connect(cmd[name], threads=args.threads)
                    stores[name].pin_arena()
            cp.cuda.Device().synchronize()
            print(json.dumps({"ok": True}), flush=True)
            continue
        bs, n = state["bs"], state["n"]
        keys = [f"g{g}-{bs}-{i}-{cmd.get('round', 0)}" for i in range(n)]
        print("armed", flush=True)
        sys.stdin.readline()  # "go": everyone starts together
        t = time.perf_counter()
        if op in ("h2d", "d2h"):
            for i in range(n):
                host, dev = state["pinned"].ptr + i * bs, state["dst"].data.ptr + i * bs
                if op == "h2d":
                    rt.memcpyAsync(dev, host, bs, 1, stream.ptr)
                else:
                    rt.memcpyAsync(host, dev, bs, 2, stream.ptr)
            stream.synchronize()
        elif op == "put":
            stores[cmd["tier"]].put_many(keys, state["srcs"], ns="node")
        elif op == "get":
            got = stores[cmd["tier"]].get_many_into(keys, state["outs"], ns="node")
            if got != [bs] * n:
                raise SystemExit(f"gpu {g}: {sum(x != bs for x in got)} blocks missing")
        dt = time.perf_counter() - t
        ok = True
        if op == "get":
            ok = bool((state["dst"] == state["src"]).all())
        elif op == "flush":
            stores[cmd["tier"]].flush()
        elif op == "delete":
            stores[cmd["tier"]].delete(keys, ns="node")
        print(json.dumps({"seconds": dt, "bytes": bs * n, "ok": ok}), flush=True)
    for st in stores.values():
        st.close()
    return 0


class _Pool:
    def __init__(self, gpus: list[int], threads: int) -> None:
        self.procs = []
        for g in gpus:
            env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(g))
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "kvfstools.bench_node", "--worker", "--gpu", str(g), "--threads", str(threads)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env))
        for p in self.procs:
            self._expect(p, "ready")

    @staticmethod
    def _expect(p: subprocess.Popen[str], what: str) -> str:
        assert p.stdout is not None
        line = p.stdout.readline().strip()
        if what and line != what:
            raise RuntimeError(f"a worker said {line!r} (expected {what!r})")
        return line

    def _send(self, p: subprocess.Popen[str], msg: Any) -> None:
        assert p.stdin is not None
        p.stdin.write((msg if isinstance(msg, str) else json.dumps(msg)) + "\n")
        p.stdin.flush()

    def setup(self, **kw: Any) -> None:
        for p in self.procs:
            self._send(p, {"op": "setup", **kw})
        for p in self.procs:
            self._expect(p, "")

    def phase(self, procs: list[Any], **cmd: Any) -> dict[str, Any]:
        for p in procs:
            self._send(p, cmd)
        for p in procs:
            self._expect(p, "armed")
        for p in procs:
            self._send(p, "go")
        outs = [json.loads(self._expect(p, "")) for p in procs]
        if not all(o["ok"] for o in outs):
            raise RuntimeError(f"{cmd['op']}: a worker read other bytes than it wrote")
        return {"aggregate_gbps": sum(o["bytes"] for o in outs) / max(o["seconds"] for o in outs) / 1e9,
                "per_gpu_gbps": [o["bytes"] / o["seconds"] / 1e9 for o in outs]}

    def close(self) -> None:
        for p in self.procs:
            try:
                self._send(p, {"op": "quit"})
                p.wait(60)
            except (OSError, subprocess.TimeoutExpired):
                p.kill()


def _disk_gbps(work: Path, nbytes: int, threads: int) -> float:
    """Parallel pread of plain files after dropping the page cache."""
    from kvfs import native

    from .bench_util import drop_caches
    files = []
    per = nbytes // threads
    for i in range(threads):
        f = work / f"raw{i}"
        with open(f, "wb") as fh:
            for _ in range(per // (64 * MiB) or 1):
                fh.write(os.urandom(64 * MiB))
        files.append(f)
    drop_caches()
    fds = [os.open(f, os.O_RDONLY) for f in files]
    bufs = [bytearray(os.path.getsize(f)) for f in files]
    t = time.perf_counter()
    native.backend.read_many(fds, [0] * len(fds), bufs, [None] * len(fds), threads)
    dt = time.perf_counter() - t
    for fd in fds:
        os.close(fd)
    for f in files:
        f.unlink()
    return sum(len(b) for b in bufs) / dt / 1e9


def run_node_bench(args: argparse.Namespace) -> dict[str, Any]:
    cp = need("cupy")  # one line and exit 2 if missing (kvfs.optional)

    from kvfsd.testing import DaemonProcess

    from .bench_util import drop_caches
    n = cp.cuda.runtime.getDeviceCount()
    gpus = list(range(n))
    root = os.geteuid() == 0
    biggest = max(bs * cnt for bs, cnt in PATTERNS)
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="kvfs-node-"))
    work = base / f"node-{os.getpid()}"
    d0 = DaemonProcess(work / "t0", stripes=args.stripes, capacity=str(4 * n * biggest + (4 << 30)),
                       shm_size=str(n * biggest + (2 << 30)), extra=["--compact-at", "0"])
    d1 = DaemonProcess(work / "t1", stripes=args.stripes, capacity=str(4 * n * biggest + (4 << 30)), shm_size=0,
                       extra=["--compact-at", "0"])
    res: dict[str, Any] = {"gpus": n, "device": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(),
                           "threads_per_gpu": args.threads, "cpus": os.cpu_count(), "patterns": []}
    pool = None
    try:
        d0.start()
        d1.start()
        pool = _Pool(gpus, args.threads)
        for bs, cnt in PATTERNS:
            pool.setup(block=bs, count=cnt, t0=str(d0.socket), t1=str(d1.socket))
            row: dict[str, Any] = {"block": bs, "count": cnt, "bytes_per_gpu": bs * cnt}
            row["h2d_one"] = pool.phase(pool.procs[:1], op="h2d")["aggregate_gbps"]
            row["h2d_all"] = pool.phase(pool.procs, op="h2d")
            row["d2h_all"] = pool.phase(pool.procs, op="d2h")
            reps: dict[str, list[dict[str, Any]]] = {}
            for r in range(args.repeat):
                reps.setdefault("write_t0", []).append(pool.phase(pool.procs, op="put", tier="t0", round=r))
                reps.setdefault("read_t0", []).append(pool.phase(pool.procs, op="get", tier="t0", round=r))
                pool.phase(pool.procs, op="delete", tier="t0", round=r)
            reps["write_t1"] = [pool.phase(pool.procs, op="put", tier="t1", round=0)]
            pool.phase(pool.procs, op="flush", tier="t1", round=0)
            for r in range(args.repeat):
                reps.setdefault("read_t1_hot", []).append(pool.phase(pool.procs, op="get", tier="t1", round=0))
            if root and not args.no_cold:
                drop_caches()
                reps["read_t1_cold"] = [pool.phase(pool.procs, op="get", tier="t1", round=0)]
            pool.phase(pool.procs, op="delete", tier="t1", round=0)
            for name, runs in reps.items():
                best = sorted(runs, key=lambda x: x["aggregate_gbps"])[len(runs) // 2]  # the median run
                row[name] = best
            res["patterns"].append(row)
            print(format_row(row, n), file=sys.stderr, flush=True)
        if root and not args.no_cold:
            res["disk_gbps"] = _disk_gbps(work, min(16 << 30, n * biggest), 32)
    finally:
        if pool is not None:
            pool.close()
        clean_up(work, base, bool(args.dir), [d0, d1])
    return res


def format_row(r: dict[str, Any], n: int) -> str:
    def g(x: Any) -> str:
        return f"{x['aggregate_gbps']:.1f}" if isinstance(x, dict) else f"{x:.1f}"
    name = f"{r['count']} x {r['block'] // MiB} MiB"
    cold = g(r["read_t1_cold"]) if "read_t1_cold" in r else "-"
    return (f"{name:<12} H2D 1 GPU {g(r['h2d_one'])}, {n} GPUs {g(r['h2d_all'])}; D2H {g(r['d2h_all'])}; "
            f"write T0 {g(r['write_t0'])}, read T0 {g(r['read_t0'])}; write T1 {g(r['write_t1'])}, "
            f"read T1 hot {g(r['read_t1_hot'])}, cold {cold} GB/s aggregate")


def format_node(res: dict[str, Any]) -> str:
    from .table import render
    n = res["gpus"]
    rows = []
    for r in res["patterns"]:
        def a(k: str) -> str:
            return f"{r[k]['aggregate_gbps']:.1f}" if k in r else "-"

        def per(k: str) -> str:
            return f"{r[k]['aggregate_gbps'] / n:.1f}" if k in r else "-"
        rows.append([f"{r['count']} x {r['block'] // MiB} MiB", a("h2d_all"), a("d2h_all"), a("read_t0"), per("read_t0"),
                     a("write_t0"), a("read_t1_hot"), a("read_t1_cold"), a("write_t1")])
    out = render(["pattern (per GPU)", "pinned H2D", "pinned D2H", "read T0", "per GPU", "write T0", "read T1 hot",
                  "read T1 cold", "write T1"], rows)
    out += (f"\n\nGB/s aggregate over {n} x {res['device']} ({res['threads_per_gpu']} threads per GPU process, "
            f"{res['cpus']} CPUs)" + (f"; disk (raw parallel pread, cold): {res['disk_gbps']:.1f} GB/s"
                                       if "disk_gbps" in res else "")
            + "\npublished (one node, 8 x H100, 128-384 threads): reads 180-270 GB/s, writes 82-123 GB/s aggregate "
              "(22-34 GB/s read per GPU)")
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true")
    p.add_argument("--gpu", type=int)
    p.add_argument("--threads", type=int, default=16)
    args = p.parse_args()
    if not args.worker:
        p.error("run through `kvfs bench --gpu --node`")
    return _worker(args)


if __name__ == "__main__":
    sys.exit(main())
