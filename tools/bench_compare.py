"""`kvfs bench --compare`: kvfs next to the physical limits and its peers,
in one process tree, on the same bytes and the same disk (DESIGN §9).

For each block size and thread count, in interleaved rounds (median kept):
  memcpy       native copy of every block into distinct destinations
               (and the same copies from the arena's shared memory: the
               bound T0 gets meet first; and copies that verify each
               block's xxh3 sum as they go: the bound of any verified read)
  raw preadv   a plain file of the same blocks, page-cache hot (and cold
               after dropping caches, when run as root); raw pwrite for puts
  kvfs T0      get_into / get_view from the shared-memory arena (/dev/shm,
               4 KiB pages); as root also get_into from an arena on 2 MiB
               pages (a tmpfs of its own mounted huge=advise, --shm-dir),
               with the memcpy out of that arena
  kvfs T1      get_into from the segment files (a daemon without T0), hot
               and cold
  peers        file-per-block, diskcache.FanoutCache, Redis on loopback
Every get lands in its own slice of one large page-aligned buffer, and the
buffer is checked against the source bytes after each timed phase.
Page-cache-hot reads (raw, kvfs T1, the peers) are the faster of two passes
after a warm one (see _hot); kvfs T0 reads are one pass by a client that
has not read those keys before.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from kvfs.optional import need

from .bench_util import clean_up, drop_caches
from .table import render

KiB, MiB = 1 << 10, 1 << 20
BLOCKS = [64 * KiB, 1 * MiB, 2 * MiB, 8 * MiB, 64 * MiB]
PUT_MANY_BATCH = 64  # values per put_many call in the batched T0 put row


def _timed(threads: int, n: int, op: Callable[[int], object]) -> float:
    """Wall seconds to run op(i) for i < n on ``threads`` threads (contiguous shares)."""
    from .cmd_bench import _timed as timed_with_latencies
    return timed_with_latencies(threads, n, op)[0]


def _hot(threads: int, n: int, op: Callable[[int], object]) -> float:
    """Page-cache-hot reads: one untimed pass, then the faster of two timed
    ones. The kernel moves a page to its active list on a later access, and
    on this VM whichever pass pays for that runs at half speed; raw files
    and kvfs get the same treatment."""
    _timed(threads, n, op)
    return min(_timed(threads, n, op), _timed(threads, n, op))


def _aligned(n: int) -> Any:
    """A page-aligned numpy byte array (a slice of a larger one, so numpy
    still asks for transparent huge pages)."""
    import numpy as np
    raw = np.empty(n + 4096, dtype=np.uint8)
    off = (-raw.ctypes.data) % 4096
    return raw[off:off + n]


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path):
        import numpy as np

        from kvfs import native
        from kvfsd.testing import DaemonProcess

        from . import bench_peers

        self.args = args
        self.work = work
        self.total = int(args.total * args.scale)
        from kvfs.sizes import parse_size
        chosen = [parse_size(b) for b in args.blocks.split(",")] if args.blocks else BLOCKS
        self.blocks = [b for b in chosen if b <= self.total]
        self.threads = [int(t) for t in str(args.threads).split(",")]
        self.native = native.backend
        # Page-aligned, as an engine's KV buffers are (torch aligns to 512 B,
        # pinned memory to pages); numpy alone aligns large arrays to 16 B,
        # which costs a verified copy about a third of its speed here.
        self.src = _aligned(self.total)
        self.src[:] = np.random.default_rng(0).integers(0, 256, size=self.total, dtype=np.uint8)
        self.dst = _aligned(self.total)
        self.dst[:] = 1  # pages faulted in: we time copies, not first touch
        self.can_drop = os.geteuid() == 0 and not args.no_cold
        cap = str(4 * self.total + (1 << 30))
        self.d0 = DaemonProcess(work / "t0", capacity=cap, shm_size=str(self.total + self.total // 4 + 64 * MiB),
                                log=work / "t0.log")
        self.d1 = DaemonProcess(work / "t1", capacity=cap, shm_size=0, log=work / "t1.log")
        self.d0.start()
        self.d1.start()
        # T0 on 2 MiB pages, as the README's tuning section sets a node up:
        # a tmpfs of the benchmark's own mounted huge=advise (root only)
        self.hugeshm: Path | None = work / "hugeshm"
        self.d2: Any = None
        try:
            self.hugeshm.mkdir()
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.total + self.total // 4 + 128 * MiB},huge=advise",
                            "kvfs-bench", str(self.hugeshm)], check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError):
            self.hugeshm = None
        if self.hugeshm is not None:
            self.d2 = DaemonProcess(work / "t0h", capacity=cap, shm_size=str(self.total + self.total // 4 + 64 * MiB),
                                    log=work / "t0h.log", shm_dir=self.hugeshm)
            self.d2.start()
        self.peers: dict[str, Any] = {}
        self.unavailable: dict[str, str] = {}
        for cls in (bench_peers.FilePerBlock, bench_peers.Diskcache, bench_peers.Redis):
            try:
                self.peers[cls.name] = cls(work / cls.name)
            except Exception as e:  # noqa: BLE001 - a missing peer is reported, not fatal
                self.unavailable[cls.name] = str(e)
        self.raw = work / "raw.bin"
        self._stores: dict[int, tuple[Any, ...]] = {}

    def stores(self, threads: int) -> tuple[Any, ...]:
        """Long-lived (writer, reader) clients of each daemon, as an engine
        keeps them: the reader is another client than the writer, so it
        knows no location yet. Their arena mappings are touched once first:
        a long-running process takes a page fault per arena page only once,
        and so should the benchmark."""
        if threads not in self._stores:
            # as connect() makes them (its data plane's threads copy and
            # verify one caller's large values on several cores): what one
            # process with ``threads`` calling threads gets
            cs: tuple[Any, ...] = (self.d0.connect(), self.d0.connect(), self.d1.connect(), self.d1.connect(),
                                   self.d0.connect(verify=False), self.d1.connect(verify=False))
            for c in (cs[0], cs[1], cs[4]):
                if c.arena is not None:
                    self.native.hash_many([c.arena.ro], 1)
            if self.d2 is not None:
                cs += (self.d2.connect(), self.d2.connect())
                self.native.hash_many([cs[-1].arena.ro], 1)
            self._stores[threads] = cs
        return self._stores[threads]

    def close(self) -> None:
        for cs in self._stores.values():
            for c in cs:
                c.close()
        for p in self.peers.values():
            p.close()
        for d in (self.d0, self.d1, self.d2):
            if d is not None and d.alive():
                d.stop()
        if self.hugeshm is not None:
            subprocess.run(["umount", "-l", str(self.hugeshm)], check=False)

    def _check(self, n: int, what: str) -> None:
        import numpy as np
        if not np.array_equal(self.dst[:n], self.src[:n]):
            raise AssertionError(f"{what}: the bytes read differ from the bytes written")
        self.dst[:n] = 0

    def round(self, bs: int, threads: int, r: int) -> dict[str, dict[str, float]]:
        """One interleaved round for one cell: every system writes, then reads, the same blocks."""
        count = self.total // bs
        n = count * bs
        keys = [f"b{bs}-{r}-{i:06d}" for i in range(count)]
        srcv = [memoryview(self.src[i * bs:(i + 1) * bs]) for i in range(count)]
        dstv: list[Any] = [self.dst[i * bs:(i + 1) * bs] for i in range(count)]
        gbs = lambda sec: n / sec / 1e9  # noqa: E731
        put: dict[str, float] = {}
        get: dict[str, float] = {}
        self.dst[:n] = 0

        def read(name: str, timer: Callable[..., float], op: Callable[[int], object]) -> None:
            """Time one get phase, then check every byte it delivered."""
            get[name] = gbs(timer(threads, count, op))
            self._check(n, name)

        # -- physical
        get["memcpy"] = gbs(_timed(1, 1, lambda _i: self.native.copy_many(dstv, srcv, [None] * count, threads)))
        self._check(n, "memcpy")
        # the bound of a verified copy (every kvfs read checks the bytes it
        # delivers): the data plane's copy that hashes each block while it
        # is in cache and compares the sum, with no lookup around it
        sums = self.native.hash_many(srcv, 1)
        read("memcpy + xxh3", lambda _t, _c, op: _timed(1, 1, op),
             lambda _i: self.native.copy_many(dstv, srcv, sums, threads))
        fd = os.open(self.raw, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.sync()
            put["raw pwrite"] = gbs(_timed(threads, count, lambda i: os.pwrite(fd, srcv[i], i * bs)))
            os.sync()
            read("raw preadv", _hot, lambda i: os.preadv(fd, [dstv[i]], i * bs))
            # the bound of a verified read on one thread: read, then hash
            # while in cache (the C data plane's fused read, one thread per
            # calling thread)
            read("raw preadv + xxh3, 1 thread", _hot,
                 lambda i: self.native.read_many([fd], [i * bs], [dstv[i]], [sums[i]], 1))
            if self.can_drop and drop_caches():
                read("raw preadv cold", _timed, lambda i: os.preadv(fd, [dstv[i]], i * bs))
        finally:
            os.close(fd)
            self.raw.unlink()
        # the same blocks laid out as kvfs T1 records written one put at a
        # time: a 4 KiB page of header, then the payload, one pwritev each.
        # The page cache then holds each payload in small folios (a folio
        # is aligned to its own size in the file, and these payloads are
        # not), and a hot read of it costs more than of a file written in
        # one piece: the bound T1 gets meet before any checksum
        rec = bs + 4096
        fd = os.open(self.raw, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            head = bytes(4096)
            for i in range(count):
                os.pwritev(fd, [head, srcv[i]], i * rec)
            read("raw preadv, kvfs record layout", _hot, lambda i: os.preadv(fd, [dstv[i]], i * rec + 4096))
        finally:
            os.close(fd)
            self.raw.unlink()
        # -- kvfs T0 (fast mode: acknowledged once in the arena)
        w0, r0, w1, r1, n0, n1, *huge = self.stores(threads)
        os.sync()
        put["kvfs T0 put"] = gbs(_timed(threads, count, lambda i: w0.put(keys[i], srcv[i])))
        w0.flush()
        os.sync()
        # the bound T0 reads meet first: the same copies from the arena's
        # shared memory (4 KiB pages, unless /dev/shm gives huge ones) rather
        # than from the private buffer `memcpy` reads (what bytes: whatever
        # the arena holds there; only the time counts)
        asrc = [r0.arena.ro[i * bs:(i + 1) * bs] for i in range(count)] if r0.arena is not None else []
        if asrc and len(r0.arena.ro) >= n:
            get["memcpy, arena source"] = gbs(_timed(1, 1, lambda _i: self.native.copy_many(
                dstv, asrc, [None] * count, threads)))
            self.dst[:n] = 0
        hits0 = r0.stats()["tiers"]["T0"]["hits"]
        read("kvfs T0 get_into", _timed, lambda i: r0.get_into(keys[i], dstv[i]))

        def view(i: int) -> None:
            with r0.get_view(keys[i]) as v:
                assert v.nbytes == bs
        get["kvfs T0 get_view"] = gbs(_timed(threads, count, view))
        read("kvfs T0 get_into, verify off", _timed, lambda i: n0.get_into(keys[i], dstv[i]))
        # direct reads report their hits in batches: send what both readers
        # hold, then a call on each connection (answered after its reports)
        for st_ in (r0, n0):
            st_._flush_touches(st_._conn())
        n0.stats()
        hits = r0.stats()["tiers"]["T0"]["hits"] - hits0
        if hits < 2 * count:
            print(f"  note: only {hits} of {2 * count} T0 gets hit T0", file=sys.stderr)
        r0.delete(keys)
        if huge:  # the same on 2 MiB pages (put in batches: these puts are not what is measured)
            w2, r2 = huge
            for j in range(0, count, PUT_MANY_BATCH):
                w2.put_many(keys[j:j + PUT_MANY_BATCH], srcv[j:j + PUT_MANY_BATCH])
            w2.flush()
            hsrc = [r2.arena.ro[i * bs:(i + 1) * bs] for i in range(count)]
            if len(r2.arena.ro) >= n:
                get["memcpy, huge-page arena source"] = gbs(_timed(1, 1, lambda _i: self.native.copy_many(
                    dstv, hsrc, [None] * count, threads)))
                self.dst[:n] = 0
            read("kvfs T0 get_into, huge pages", _timed, lambda i: r2.get_into(keys[i], dstv[i]))
            w2.delete(keys)
        # batched: the same blocks under other keys, in put_many calls of
        # PUT_MANY_BATCH, one per thread at a time (acknowledged, as above).
        # After the T0 gets: this many more bytes would evict the blocks
        # they read from the arena, and the gets would measure T1.
        bkeys = [f"m{k}" for k in keys]
        nb = -(-count // PUT_MANY_BATCH)
        os.sync()
        put["kvfs T0 put_many"] = gbs(_timed(threads, nb, lambda j: w0.put_many(
            bkeys[j * PUT_MANY_BATCH:(j + 1) * PUT_MANY_BATCH], srcv[j * PUT_MANY_BATCH:(j + 1) * PUT_MANY_BATCH])))
        w0.flush()
        w0.delete(bkeys)
        # -- kvfs T1 (a daemon without T0: page-cache hot, then cold)
        os.sync()
        put["kvfs T1 put"] = gbs(_timed(threads, count, lambda i: w1.put(keys[i], srcv[i])))
        os.sync()
        read("kvfs T1 get_into", _hot, lambda i: r1.get_into(keys[i], dstv[i]))
        read("kvfs T1 get_into, verify off", _hot, lambda i: n1.get_into(keys[i], dstv[i]))
        if self.can_drop and drop_caches():
            read("kvfs T1 get_into cold", _timed, lambda i: r1.get_into(keys[i], dstv[i]))
        r1.delete(keys)
        # -- peers
        for name, p in self.peers.items():
            os.sync()
            put[name] = gbs(_timed(threads, count, lambda i: p.put(keys[i], srcv[i])))
            os.sync()
            read(name, _hot, lambda i: p.get_into(keys[i], dstv[i]))
            p.clear()
        return {"put": put, "get": get}

    def run(self) -> dict[str, Any]:
        cells = []
        for bs in self.blocks:
            for threads in self.threads:
                rounds = [self.round(bs, threads, r) for r in range(self.args.repeat)]
                cell: dict[str, Any] = {"block": bs, "threads": threads, "count": self.total // bs,
                                        "bytes": (self.total // bs) * bs, "rounds": len(rounds)}
                for kind in ("put", "get"):
                    cell[kind] = {k: statistics.median(r[kind][k] for r in rounds) for k in rounds[0][kind]}
                cells.append(cell)
                g = cell["get"]
                print(f"  {bs // KiB:6d} KiB x {cell['count']:5d}, {threads:2d} thr: T0 get {g['kvfs T0 get_into']:.2f} "
                      f"GB/s ({g['kvfs T0 get_into'] / g['memcpy']:.2f}x memcpy), T1 get "
                      f"{g['kvfs T1 get_into']:.2f} ({g['kvfs T1 get_into'] / g['raw preadv']:.2f}x preadv)",
                      file=sys.stderr, flush=True)
        with self.d0.connect() as s:
            from .cmd_bench import measure_meta
            meta = measure_meta(s)
        return {"machine": {"cpus": os.cpu_count(), "dir": str(self.work), "native": self.native.__name__,
                            "huge_page_arena": self.d2 is not None,
                            "cold": self.can_drop},
                "total_bytes": self.total, "cells": cells, "meta": meta, "unavailable": self.unavailable}


def run_compare(args: argparse.Namespace) -> dict[str, Any]:
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="kvfs-compare-"))
    work = base / f"compare-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    b = None
    try:
        b = Bench(args, work)
        return b.run()
    finally:
        if b is not None:
            b.close()
        clean_up(work, base, bool(args.dir))


GET_ORDER = ["memcpy", "memcpy + xxh3", "memcpy, arena source", "memcpy, huge-page arena source", "raw preadv",
             "raw preadv + xxh3, 1 thread", "raw preadv, kvfs record layout", "raw preadv cold", "kvfs T0 get_into", "kvfs T0 get_into, huge pages", "kvfs T0 get_into, verify off",
             "kvfs T0 get_view", "kvfs T1 get_into", "kvfs T1 get_into, verify off", "kvfs T1 get_into cold",
             "file-per-block", "diskcache", "redis"]
PUT_ORDER = ["raw pwrite", "kvfs T0 put", "kvfs T0 put_many", "kvfs T1 put", "file-per-block", "diskcache", "redis"]


def _ratio_base(system: str) -> str:
    """Which baseline a get figure is read against."""
    if system.startswith("kvfs T0") or system.startswith("memcpy"):
        return "memcpy"
    return "raw preadv cold" if system.endswith("cold") else "raw preadv"


def format_summary(res: dict[str, Any], kind: str, threads: int) -> str:
    """One table per thread count: a row per system, a column per block
    size, GB/s with the ratio to that row's physical baseline."""
    cells = [c for c in res["cells"] if c["threads"] == threads]
    order = GET_ORDER if kind == "get" else PUT_ORDER
    rows = []
    for name in order:
        if not any(name in c[kind] for c in cells):
            continue
        row: list[Any] = [name]
        for c in cells:
            figs = c[kind]
            base = _ratio_base(name) if kind == "get" else "raw pwrite"
            row.append(f"{figs[name]:.2f} ({figs[name] / figs[base]:.2f})" if name in figs else "")
        rows.append(row)
    heads = [f"{kind}s, {threads} thr: GB/s (x baseline)"] + [
        f"{c['block'] // KiB} KiB" if c["block"] < MiB else f"{c['block'] // MiB} MiB" for c in cells]
    return render(heads, rows)


def format_compare(res: dict[str, Any]) -> str:
    out = [format_summary(res, k, t) for k in ("get", "put") for t in sorted({c["threads"] for c in res["cells"]})]
    for kind, order in (("get", GET_ORDER), ("put", PUT_ORDER)):
        rows = []
        for c in res["cells"]:
            figs = c[kind]
            for name in order:
                if name not in figs:
                    continue
                base = _ratio_base(name) if kind == "get" else "raw pwrite"
                peers = [p for p in ("file-per-block", "diskcache", "redis") if p in figs]
                vs_peer = "" if not name.startswith("kvfs") else " ".join(
                    f"{figs[name] / figs[p]:.1f}" for p in peers)
                rows.append([f"{c['block'] // KiB} KiB", c["threads"], name, f"{figs[name]:.2f}",
                             f"{figs[name] / figs[base]:.2f} x {base}", vs_peer])
        out.append(render([f"{kind}: block", "thr", "system", "GB/s", "ratio to the physical baseline",
                           "x file-per-block / diskcache / redis"], rows))
    m = res["meta"]
    out.append(f"contains(1024 keys) p50 {m['contains_1024_p50_ms']:.3f} ms; prefix_match(1024) p50 "
               f"{m['prefix_match_1024_p50_ms']:.3f} ms; 4 KiB get p50 {m['get_4k_p50_us']:.0f} us, "
               f"first-lookup 4 KiB get p50 {m['get_4k_lookup_p50_us']:.0f} us")
    if res["unavailable"]:
        out.append("not measured: " + "; ".join(f"{k} ({v})" for k, v in res["unavailable"].items()))
    return "\n\n".join(out)


def plot_compare(res: dict[str, Any], path: str) -> None:
    matplotlib = need("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    threads = max(c["threads"] for c in res["cells"])
    cells = [c for c in res["cells"] if c["threads"] == threads]
    fig, axes = plt.subplots(2, 1, figsize=(12, 9))
    for ax, kind, order in ((axes[0], "get", GET_ORDER), (axes[1], "put", PUT_ORDER)):
        names = [n for n in order if any(n in c[kind] for c in cells)]
        width = 0.8 / max(1, len(names))
        for j, name in enumerate(names):
            xs = [i + j * width for i in range(len(cells))]
            ax.bar(xs, [c[kind].get(name, 0) for c in cells], width, label=name, color=plt.cm.tab20(j % 20))
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cells))])
        ax.set_xticklabels([f"{c['block'] // KiB} KiB" if c["block"] < MiB else f"{c['block'] // MiB} MiB"
                            for c in cells])
        ax.set_ylabel("GB/s")
        ax.set_title(f"{kind}s, {threads} threads, {res['total_bytes'] // MiB} MiB per block size")
        ax.legend(fontsize=8, ncol=2)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
