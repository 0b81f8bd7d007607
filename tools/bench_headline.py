"""The README's headline figures: one short table per use, read from the
benchmark blocks in docs/ (`make bench-readme` writes both, in that order).

Every figure here is a cell of a block that `make bench-readme` wrote, and
every table names the block's command and the commit, machine and date in
its stamp: the headline goes stale exactly when its block does. A block
whose output no longer has the row or column asked for stops the run with
a `TableError` naming it, rather than leaving an old figure in place.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from .text_tables import TableError, cell, first_header, number

STAMPS = ("# made by make bench-readme: ", "# not yet rerun by make bench-readme: ")


@dataclass
class Source:
    """One benchmark block's output, as found in a page."""
    args: str
    gpus: int
    text: str  # its body, the stamp line included

    @property
    def stamp(self) -> str:
        """What the stamp says: commit, machine and date."""
        for line in reversed(self.text.split("\n")):
            for s in STAMPS:
                if line.startswith(s):
                    return line[len(s):]
        return "never run"

    @property
    def commit(self) -> str:
        m = re.search(r"commit (\S+?),", self.stamp)
        return m.group(1) if m else "?"


class Sources:
    def __init__(self, sources: list[Source]):
        self.all = sources

    def get(self, args: str, gpu: bool = False) -> Source:
        """The block whose command starts with ``args``, of a GPU machine or not."""
        for s in self.all:
            if s.args.startswith(args) and bool(s.gpus) == gpu:
                return s
        raise TableError(f"no {'@gpu ' if gpu else ''}block for kvfs {args}")


def _short(stamp: str) -> str:
    """A stamp without the CPU vendor's marks ("Intel(R) Xeon(R) Processor" is "Intel Xeon")."""
    return re.sub(r"\(R\)|\(TM\)| Processor", "", stamp)


def _x(a: float, b: float) -> str:
    return f"{a / b:.2f} x" if b else "-"


def _caption(title: str, *srcs: Source) -> str:
    made = "; ".join(f"`kvfs {s.args}` at {_short(s.stamp)}" for s in srcs)
    return f"**{title}** ({made})"


def host(src: Sources) -> str:
    s = src.get("bench --compare")
    rows = []
    for name, system, base in (("T0 read (shared memory), verified", "kvfs T0 get_into", "memcpy"),
                               ("T1 read (NVMe, page cache warm), verified", "kvfs T1 get_into", "raw preadv"),
                               ("T1 read, cold", "kvfs T1 get_into cold", "raw preadv cold")):
        where = {"get: block": "8192 KiB", "thr": "1", "system": system}
        gbs = number(s.text, "GB/s", where)
        limit = number(s.text, "GB/s", {**where, "system": base})
        peers = cell(s.text, "x file-per-block / diskcache / redis", where).split()
        rows.append([name, f"{gbs:.2f}", f"{_x(gbs, limit)} {base}", " / ".join(peers)])
    put = {"puts, 1 thr: GB/s (x baseline)": "kvfs T0 put_many"}
    gbs = number(s.text, "8 MiB", put)
    limit = number(s.text, "8 MiB", {"puts, 1 thr: GB/s (x baseline)": "raw pwrite"})
    vs = [gbs / number(s.text, "8 MiB", {"puts, 1 thr: GB/s (x baseline)": p})
          for p in ("file-per-block", "diskcache", "redis")]
    rows.append(["put_many (T0, written back)", f"{gbs:.2f}", f"{_x(gbs, limit)} raw pwrite",
                 " / ".join(f"{v:.1f}" for v in vs)])
    return _caption("The Python client, host memory: 8 MiB blocks, 1 thread", s) + "\n\n" + _md(
        ["", "GB/s", "against the physical limit", "x file-per-block / diskcache / redis"], rows)


def gpu(src: Sources) -> str:
    s = src.get("bench --gpu --total", gpu=True)
    w = {"block": "8 MiB"}
    h2d, d2h = number(s.text, "pinned H2D", w), number(s.text, "pinned D2H", w)
    t0, put = number(s.text, "T0 -> GPU", w), number(s.text, "GPU -> put", w)
    t1 = max(number(s.text, "T1 kvikio", w), number(s.text, "T1 staged", w))
    rows = [["T0 (shared memory) into GPU memory", f"{t0:.1f}", f"{_x(t0, h2d)} pinned H2D"],
            ["T1 (NVMe, page cache warm) into GPU memory, kvikio or staged", f"{t1:.1f}", f"{_x(t1, h2d)} pinned H2D"],
            ["put from GPU memory (T0)", f"{put:.1f}", f"{_x(put, d2h)} pinned D2H"]]
    return _caption("The Python client, GPU memory: 8 MiB blocks", s) + "\n\n" + _md(
        ["", "GB/s", "against the physical limit"], rows)


TTFT = re.compile(r"^(?P<tier>T[01])\s+(?P<load>\w+)\s+(?P<tokens>\d+) tokens: recompute\s+(?P<rec>[\d.]+) ms, "
                  r"kvfs\s+(?P<kvfs>[\d.]+) ms.*?\s(?P<x>[\d.]+)x \(", re.M)


def ttft_points(text: str) -> dict[str, list[tuple[int, float, float]]]:
    """Per tier (T0, T1): (prompt tokens, recompute ms, kvfs ms) of a demo-ttft block."""
    out: dict[str, list[tuple[int, float, float]]] = {}
    for m in TTFT.finditer(text):
        out.setdefault(m["tier"], []).append((int(m["tokens"]), float(m["rec"]), float(m["kvfs"])))
    if not out:
        raise TableError("no TTFT lines in the demo-ttft block")
    return out


def ttft(src: Sources) -> str:
    s = src.get("demo-ttft --tokens", gpu=True)
    pts = ttft_points(s.text)
    rows = []
    t1s = {tokens: (rec, kv) for tokens, rec, kv in pts.get("T1", [])}  # each against its own run's recompute
    for tokens, rec, t0 in pts["T0"]:
        rec1, t1 = t1s.get(tokens, (0.0, 0.0))
        rows.append([f"{tokens}", f"{rec:.0f}", f"{t0:.0f}", f"{rec / t0:.1f} x",
                     f"{t1:.0f}" if t1 else "-", f"{rec1 / t1:.1f} x" if t1 else "-"])
    return _caption("Time to first token, Llama-3.1-8B shape, layer-wise loads (ms)", s) + "\n\n" + _md(
        ["prompt tokens", "recompute", "from T0", "faster", "from T1", "faster"], rows) + \
        "\n\n![TTFT against prompt length](docs/ttft.png)"


def vllm(src: Sources) -> str:
    s = src.get("bench --vllm")
    key = first_header(s.text)
    cold = number(s.text, "ms", {key: "cold (the baseline)"})
    rows = []
    for name, row in (("recomputed (no cache)", "cold (the baseline)"),
                      ("vLLM's own prefix cache, same process", "vLLM's own prefix cache"),
                      ("a new process, loaded from kvfs", "new process, from kvfs (async load)")):
        ms = number(s.text, "ms", {key: row})
        rows.append([name, f"{ms:.0f}", f"{ms / cold:.2f}"])
    return _caption("vLLM: TTFT of a 2048-token prompt, CPU backend", s) + "\n\n" + _md(
        ["", "ms", "/ recomputed"], rows)


def lmcache(src: Sources) -> str:
    s = src.get("bench --lmcache")
    rows = []
    for name, col in (("store", "store GB/s"), ("retrieve, warm", "retrieve warm GB/s"),
                      ("retrieve, cold", "retrieve cold GB/s")):
        k, d = number(s.text, col, {"tier": "kvfs"}), number(s.text, col, {"tier": "local_disk"})
        rows.append([name, f"{k:.2f}", f"{d:.2f}", _x(k, d)])
    return _caption("LMCache: 256-token chunks through its remote storage plugin", s) + "\n\n" + _md(
        ["", "kvfs GB/s", "LMCache local_disk GB/s", "kvfs / local_disk"], rows)


def nixl(src: Sources) -> str:
    s, g = src.get("bench --nixl --repeat"), src.get("bench --nixl --nixl-vram", gpu=True)
    rows = []
    for name, tier, path, base in (("T1 warm, NIXL POSIX (posix_aio)", "T1 warm", "NIXL POSIX posix_aio", "raw preadv"),
                                   ("T1 cold, NIXL POSIX (default)", "T1 cold", "NIXL POSIX default", "raw preadv"),
                                   ("T0, KvfsNixl (kvfs copies)", "T0", "KvfsNixl, kvfs copies", "memcpy")):
        where = {"blocks": "8 MiB x 64", "tier": tier}
        v, b = number(s.text, "GB/s", {**where, "path": path}), number(s.text, "GB/s", {**where, "path": base})
        rows.append([name, f"{v:.2f}", f"{_x(v, b)} {base}"])
    v = number(g.text, "GB/s", {"blocks": "8 MiB", "path": "T0 KvfsNixl, copy engine"})
    b = number(g.text, "GB/s", {"blocks": "8 MiB", "path": "pinned H2D"})
    rows.append(["T0 into GPU memory, KvfsNixl (copy engine)", f"{v:.2f}", f"{_x(v, b)} pinned H2D"])
    return _caption("NIXL: 8 MiB blocks through `KvfsNixl`", s, g) + "\n\n" + _md(
        ["", "GB/s", "against the physical limit"], rows)


def mount(src: Sources) -> str:
    s = src.get("bench --fuse")
    col0 = first_header(s.text)
    rows = []
    for name, row in (("`cp` a 1 GiB file in", "write: cp into"),
                      ("`cp` into a FUSE mount that discards it (the ceiling)", "write: cp into a null fs of that kind"),
                      ("read cold, 1 MiB reads", "read cold, 1 MiB reads"),
                      ("read hot, 1 MiB reads", "read hot, 1 MiB reads")):
        where = {col0: row}
        c, p = number(s.text, "C mount GB/s", where), number(s.text, "plain GB/s", where)
        rows.append([name, f"{c:.2f}", f"{p:.2f}", _x(c, p)])
    return _caption("The mount (the C mount)", s) + "\n\n" + _md(
        ["", "mount GB/s", "plain file GB/s", "mount / plain"], rows)


def shared(src: Sources) -> str:
    s = src.get("bench --remote")
    rows = []
    for blocks in ("256 x 1 MiB", "32 x 8 MiB"):
        w = {"blocks": blocks}
        # the block's own ratios: at 0.1 GB/s a ratio of the rounded rates is off by a tenth
        wt, wx = number(s.text, "write-through", w), number(s.text, "vs raw PUT", w)
        rt, rx = number(s.text, "read-through", w), number(s.text, "vs raw GET", w)
        rows.append([blocks, f"{wt:.2f}", f"{wx:.2f} x", f"{rt:.2f}", f"{rx:.2f} x"])
    col0 = "1024 keys on node B, held only remotely"
    pm = number(s.text, "p50 ms", {col0: "prefix_match (local miss, then the presence index)"})
    return _caption("Two nodes sharing blocks through S3 and a Redis cluster, on loopback", s) + "\n\n" + _md(
        ["blocks", "write-through GB/s", "/ raw PUT", "read-through GB/s", "/ raw GET"], rows) + \
        f"\n\nA cross-node `prefix_match` of 1024 blocks held only remotely: {pm:.2f} ms at p50."


FAULT = re.compile(r"^(?P<name>\w+)\s+(?P<ok>ok|FAILED|failed)\b", re.M)


def faults(src: Sources) -> str:
    s = src.get("faults")
    rows = []
    crash = re.search(r"(\d+) kill -9 cycles; (\d+) sync and (\d+) fast puts acknowledged; (\d+) reads checked: "
                      r"(\d+) sync lost, (\d+) wrong bytes", s.text)
    cut = re.search(r"sync: (\d+) power cuts.*?; (\d+) puts acknowledged, \d+ that must survive: (\d+) lost, "
                    r"(\d+) wrong bytes", s.text)
    if not crash or not cut:
        raise TableError("the faults block has no crash or power-cut line")
    rows.append([f"`kill -9` of the daemon, {crash[1]} times", crash[2], crash[5], crash[6]])
    rows.append([f"power cuts (sync mode), {cut[1]} times", cut[2], cut[3], cut[4]])
    verdicts = FAULT.findall(s.text)
    ok = sum(1 for _, v in verdicts if v == "ok")
    return _caption("Faults", s) + "\n\n" + _md(
        ["", "sync puts acknowledged", "lost", "wrong bytes served"], rows) + \
        f"\n\n{ok} of {len(verdicts)} scenarios ok: " + ", ".join(n for n, _ in verdicts) + "."


def _md(headers: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


USES: list[Callable[[Sources], str]] = [host, gpu, ttft, vllm, lmcache, nixl, mount, shared, faults]


def headline(sources: list[Source]) -> str:
    """The markdown between the README's headline markers."""
    src = Sources(sources)
    return "\n\n".join(use(src) for use in USES)

