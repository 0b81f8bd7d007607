"""`kvfs bench --nixl`: kvfs blocks moved by NIXL, next to kvfs's own
client and the raw reads of the same bytes, in one run.

For 1 MiB and 8 MiB blocks (--total bytes of each, times --scale), stored
in a daemon without an arena (every block in the segment files) and in one
with it (every block in T0 too), read into distinct offsets of one
preallocated, registered buffer, rounds interleaved:

  T1 (segment files, page cache warm; cold too where this process may drop it)
    raw preadv           the blocks' very extents, read by the native data
                         plane (--threads threads), nothing checked
    get_many_into        kvfs's client (lookup, parallel preadv, checksums)
    NIXL POSIX <mode>    KvfsNixl.get_many_into: hold, NIXL READ through its
                         POSIX backend (each queue mode asked for), checksums
    NIXL transfer only   the READ alone, descriptors made beforehand
  T0 (the arena)
    memcpy               the blocks' arena bytes copied by the data plane
    get_many_into        kvfs's client
    KvfsNixl, kvfs copies   KvfsNixl.get_many_into, arena bytes copied by
                         kvfs's data plane (its default)
    KvfsNixl, NIXL UCX   the same with copies="nixl": UCX moves them
  writes (T1)
    raw pwrite           a plain file on the same disk
    put_many             kvfs's client (alloc, pwrite, commit)
    NIXL POSIX put_many  reserve, NIXL WRITE, commit

and with --nixl-vram on a GPU: blocks into device memory, T0 through the
CUDA copy engine (KvfsNixl's default) and through UCX, T1 through POSIX
and the pinned bounce buffer, against the client's device reads and a
pinned host-to-device copy; and whether GDS / GDS_MT can start and
register a segment file (what stopped it if not).

Every result of the first round is checked byte for byte. GB/s, median of
--repeat rounds, ratios to the raw row of the same group.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any, Callable

from .bench_util import clean_up, commit, work_dirs
from .table import render

MiB = 1 << 20
BLOCKS = (1 * MiB, 8 * MiB)


def run_nixl_bench(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")  # NIXL logs every agent and backend to stdout
    import numpy as np

    from kvfs import native
    from kvfs.format import segment_name
    from kvfs.integrations.nixl import POSIX_MODES, KvfsNixl
    from kvfs.sizes import parse_size
    from kvfsd.testing import DaemonProcess

    from .bench_util import drop_caches

    total = int(parse_size(args.total) * args.scale)
    reps = max(1, args.repeat)
    threads = max(int(x) for x in str(args.threads).split(","))
    modes = [m for m in args.nixl_modes.split(",") if m]
    for m in modes:
        if m not in POSIX_MODES:
            raise SystemExit(f"kvfs bench --nixl: unknown POSIX mode {m!r} (one of {', '.join(POSIX_MODES)})")
    base, work = work_dirs(args.dir, "kvfs-bench-nixl-")
    cap = str(8 * total + 512 * MiB)
    d1 = DaemonProcess(work / "t1", stripes=args.stripes, shm_size=0, capacity=cap, log=work / "t1.log")
    d0 = DaemonProcess(work / "t0", stripes=args.stripes, shm_size=int(total * 1.25) + 64 * MiB, capacity=cap,
                       log=work / "t0.log")
    out: dict[str, Any] = {"machine": {"cpus": os.cpu_count()}, "commit": commit(), "total": total,
                           "repeat": reps, "threads": threads, "modes": modes, "blocks": {}}
    opened: list[Any] = []
    try:
        d1.start()
        d0.start()
        s1, s0 = d1.connect(threads=threads), d0.connect(threads=threads)
        opened += [s1, s0]
        kns = {m: KvfsNixl(s1, params=POSIX_MODES[m], memory=None) for m in modes}  # T1 only: no UCX
        kn0 = KvfsNixl(s0)  # arena bytes copied by kvfs (the default)
        knu = KvfsNixl(s0, copies="nixl")  # ... or moved by NIXL's UCX
        opened += list(kns.values()) + [kn0, knu]
        can_drop = drop_caches()
        out["cold_measured"] = can_drop
        rng = np.random.default_rng(7)
        for bs in BLOCKS:
            n = max(1, total // bs)
            data = rng.integers(0, 256, (n, bs), dtype=np.uint8)
            keys = [f"b{bs >> 20}m-{i}" for i in range(n)]
            s1.put_many(keys, list(data), ns="bench")
            s0.put_many(keys, list(data), ns="bench")
            s0.flush()
            dest = np.empty_like(data)
            regs = [kn.register(dest) for kn in [*kns.values(), kn0, knu]]
            outs = list(dest)
            # the blocks' extents, for the raw reads of the same bytes
            with s1.hold(keys, ns="bench") as h:
                t1_ext = [(os.path.join(s1.stripes[st], segment_name(sg)), off, ln, i)
                          for i, it in enumerate(h.items) for st, sg, off, ln, _c in it[3]]
            with s0.hold(keys, ns="bench") as h:
                t0_off = [it[4][0] for it in h.items]
            fds = {p: os.open(p, os.O_RDONLY) for p in {e[0] for e in t1_ext}}
            pos = _positions(t1_ext)

            def raw_read() -> None:
                native.backend.read_many([fds[p] for p, _o, _n, _i in t1_ext], [o for _p, o, _n, _i in t1_ext],
                                         [outs[i][q:q + ln] for (_p, _o, ln, i), q in zip(t1_ext, pos)],
                                         [None] * len(t1_ext), threads)

            arena = s0.arena
            assert arena is not None

            def memcpy() -> None:
                native.backend.copy_many(outs, [arena.ro[o:o + bs] for o in t0_off], [None] * n, threads)

            def ok(sizes: list[int]) -> None:
                if sizes != [bs] * n:
                    raise RuntimeError(f"{sum(x != bs for x in sizes)} of {n} blocks did not come back")

            rd = kns[modes[0]].descriptors(keys, ns="bench") if modes else None
            t1_cases: dict[str, Callable[[], None]] = {"raw preadv": raw_read,
                                                      "get_many_into": lambda: ok(s1.get_many_into(keys, outs, ns="bench"))}
            def nixl_get(kn: Any) -> Callable[[], None]:
                return lambda: ok(kn.get_many_into(keys, outs, ns="bench"))
            for m, kn in kns.items():
                t1_cases[f"NIXL POSIX {m}"] = nixl_get(kn)
            if rd is not None:
                kn_first = kns[modes[0]]
                addrs = [dest[i].ctypes.data for i in range(n)]
                file_local, _ = rd.local(addrs)

                def xfer_only() -> None:
                    if not kn_first.nixl.run("READ", file_local, "DRAM", rd.file, "FILE", kn_first.backend):
                        raise RuntimeError("NIXL READ failed")
                t1_cases[f"NIXL transfer only ({modes[0]})"] = xfer_only
            t0_cases = {"memcpy": memcpy, "get_many_into": lambda: ok(s0.get_many_into(keys, outs, ns="bench")),
                        "KvfsNixl, kvfs copies": lambda: ok(kn0.get_many_into(keys, outs, ns="bench")),
                        "KvfsNixl, NIXL UCX": lambda: ok(knu.get_many_into(keys, outs, ns="bench"))}
            times: dict[str, dict[str, list[float]]] = {"T1 warm": {}, "T1 cold": {}, "T0": {}, "writes": {}}
            raw_w = work / "raw-writes"
            wfd = os.open(raw_w, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                for r in range(reps):
                    for group, cases in (("T1 warm", t1_cases), ("T0", t0_cases)):
                        for name, fn in cases.items():
                            dest.fill(0)
                            t = time.perf_counter()
                            fn()
                            times[group].setdefault(name, []).append(time.perf_counter() - t)
                            if r == 0 and not np.array_equal(dest, data):
                                raise RuntimeError(f"{group} {name}: the bytes read differ from those stored")
                    if can_drop:
                        for name, fn in t1_cases.items():
                            if name.startswith("NIXL transfer only"):
                                continue
                            drop_caches()
                            t = time.perf_counter()
                            fn()
                            times["T1 cold"].setdefault(name, []).append(time.perf_counter() - t)
                    wkeys = [f"w{r}-{k}" for k in keys]

                    writer = kns[modes[0]] if modes else kn0
                    writes: list[tuple[str, Callable[[], Any]]] = [
                        ("raw pwrite", lambda: native.backend.write_many([wfd] * n, [i * bs for i in range(n)],
                                                                         list(data), threads)),
                        ("put_many", lambda: s1.put_many(wkeys, list(data), ns="w")),
                        (f"NIXL POSIX put_many ({modes[0] if modes else 'default'})",
                         lambda: writer.put_many([k + "n" for k in wkeys], list(data), ns="w"))]
                    for name, wfn in writes:
                        t = time.perf_counter()
                        wfn()
                        times["writes"].setdefault(name, []).append(time.perf_counter() - t)
                    if r == 0:
                        got = np.empty_like(data)
                        for suffix in ("", "n"):
                            if s1.get_many_into([k + suffix for k in wkeys], list(got), ns="w") != [bs] * n \
                                    or not np.array_equal(got, data):
                                raise RuntimeError("writes: a block written did not read back")
                    s1.delete([k + sfx for k in wkeys for sfx in ("", "n")], ns="w")
            finally:
                os.close(wfd)
                raw_w.unlink(missing_ok=True)
                for fd in fds.values():
                    os.close(fd)
                if rd is not None:
                    rd.release()
                for kn, reg in zip([*kns.values(), kn0, knu], regs):
                    kn.deregister(reg)
            nbytes = n * bs
            out["blocks"][str(bs)] = {
                "count": n,
                "groups": {g: {name: nbytes / statistics.median(v) / 1e9 for name, v in cases.items() if v}
                           for g, cases in times.items() if cases}}
            s1.delete(keys, ns="bench")
            s0.delete(keys, ns="bench")
        if args.nixl_vram:
            out["vram"] = _vram(args, s0, s1, total)
    finally:
        for x in reversed(opened):
            try:
                x.close()
            except Exception:  # noqa: BLE001 - closing what a failed run left
                pass
        clean_up(work, base, bool(args.dir), [d1, d0])
    return out


def _positions(exts: list[tuple[str, int, int, int]]) -> list[int]:
    """Each extent's offset within its block (extents are in chunk order)."""
    pos, last, at = [], -1, 0
    for _p, _o, ln, i in exts:
        at = 0 if i != last else at
        pos.append(at)
        at += ln
        last = i
    return pos


def _vram(args: argparse.Namespace, s0: Any, s1: Any, total: int) -> dict[str, Any]:
    """Blocks into device memory: T0 (arena) through the CUDA copy engine
    (KvfsNixl's default) and through NIXL's UCX, T1 through POSIX and the
    pinned bounce buffer, next to the client's own device reads and a
    pinned host-to-device copy; and what GDS / GDS_MT do with a segment
    file here."""
    import cupy as cp
    import numpy as np

    from kvfs.integrations.nixl import KvfsNixl

    res: dict[str, Any] = {"device": cp.cuda.runtime.getDeviceProperties(0)["name"].decode()}
    s0.pin_arena()
    kn0, knu, kn1 = KvfsNixl(s0), KvfsNixl(s0, copies="nixl"), KvfsNixl(s1, memory=None)
    try:
        for bs in BLOCKS:
            n = max(1, total // bs)
            data = np.random.default_rng(3).integers(0, 256, (n, bs), dtype=np.uint8)
            keys = [f"v{bs >> 20}m-{i}" for i in range(n)]
            s0.put_many(keys, list(data), ns="vram")
            s1.put_many(keys, list(data), ns="vram")
            dev = cp.empty((n, bs), dtype=cp.uint8)
            regs = [(kn, kn.register(dev)) for kn in (kn0, knu)]
            outs = [dev[i] for i in range(n)]
            host = cp.cuda.alloc_pinned_memory(n * bs)
            np.frombuffer(host, np.uint8, n * bs).reshape(n, bs)[:] = data
            cases: dict[str, Callable[[], Any]] = {
                "pinned H2D": lambda: cp.cuda.runtime.memcpy(dev.data.ptr, host.ptr, n * bs, 1),
                "T0 get_many_into (device)": lambda: s0.get_many_into(keys, outs, ns="vram"),
                "T0 KvfsNixl, copy engine": lambda: kn0.get_many_into(keys, outs, ns="vram"),
                "T0 KvfsNixl, NIXL UCX": lambda: knu.get_many_into(keys, outs, ns="vram"),
                "T1 get_many_into (device)": lambda: s1.get_many_into(keys, outs, ns="vram"),
                "T1 KvfsNixl, POSIX + bounce": lambda: kn1.get_many_into(keys, outs, ns="vram")}
            times: dict[str, list[float]] = {k: [] for k in cases}
            for r in range(max(1, args.repeat)):
                for name, fn in cases.items():
                    dev.fill(0)
                    cp.cuda.runtime.deviceSynchronize()
                    t = time.perf_counter()
                    fn()
                    cp.cuda.runtime.deviceSynchronize()
                    times[name].append(time.perf_counter() - t)
                    if r == 0 and not np.array_equal(cp.asnumpy(dev), data):
                        raise RuntimeError(f"VRAM {name}: the bytes differ from those stored")
            for kn, reg in regs:
                kn.deregister(reg)
            s0.delete(keys, ns="vram")
            s1.delete(keys, ns="vram")
            res[str(bs)] = {k: n * bs / statistics.median(v) / 1e9 for k, v in times.items()}
    finally:
        for kn in (kn0, knu, kn1):
            kn.close()
    want = os.urandom(4 * MiB)
    s1.put("gds-probe", want, ns="vram")  # the daemon without an arena: only the file backend can read it
    for backend in ("GDS_MT", "GDS"):
        try:
            with KvfsNixl(s1, backend=backend, memory=None) as kn:
                probe = cp.empty(4 * MiB, dtype=cp.uint8)
                got = kn.get_many_into(["gds-probe"], [probe], ns="vram")[0]
                right = got == len(want) and cp.asnumpy(probe).tobytes() == want
                res[backend] = (f"read {got} bytes from a segment file into VRAM"
                                f"{' byte-exact' if right else ', wrong or missing'} "
                                f"({kn.counters['file_chunks']} file chunks, {kn.counters['staged_chunks']} staged)")
        except Exception as e:  # noqa: BLE001 - the point is to say what stopped it
            res[backend] = f"{type(e).__name__}: {e}"
    return res


def format_nixl(res: dict[str, Any]) -> str:
    head = (f"kvfs blocks through NIXL, {res['total'] / MiB:.0f} MiB per block size, median of {res['repeat']}, "
            f"{res['threads']} threads, commit {res['commit']}, {res['machine']['cpus']} cores")
    rows = []
    for bs, b in res["blocks"].items():
        for group, cases in b["groups"].items():
            base = next(iter(cases.values()))
            for name, gbs in cases.items():
                rows.append([f"{int(bs) >> 20} MiB x {b['count']}", group, name, f"{gbs:.2f}", f"{gbs / base:.2f}x"])
    text = head + "\n" + render(["blocks", "tier", "path", "GB/s", "vs first"], rows)
    v = res.get("vram")
    if v:
        vrows = [[f"{int(bs) >> 20} MiB", name, f"{gbs:.2f}", f"{gbs / next(iter(c.values())):.2f}x"]
                 for bs, c in v.items() if isinstance(c, dict) for name, gbs in c.items()]
        text += f"\n\nT0 into device memory ({v['device']})\n" + render(["blocks", "path", "GB/s", "vs first"], vrows)
        text += "".join(f"\n{b}: {v[b]}" for b in ("GDS_MT", "GDS") if b in v)
    return text
