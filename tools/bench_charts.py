"""The charts in docs/, drawn from the benchmark blocks `make bench-readme` wrote.

- ``docs/throughput.png``: kvfs's reads and writes against the physical
  limits measured in the same run (memcpy, raw preadv, raw pwrite, pinned
  H2D) and against its peers (file-per-block, diskcache, Redis), by block
  size (``kvfs bench --compare``, ``kvfs bench --gpu``).
- ``docs/ttft.png``: time to first token against prompt length, recomputed
  and loaded from kvfs's T0 and T1 (``kvfs demo-ttft``).

Each chart's title names the commit of the block it came from.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from kvfs.optional import need

from .bench_headline import Source, Sources, ttft_points
from .text_tables import Table, TableError, table_named, tables

# (row in the compare block, style): the physical limits dashed, kvfs solid, peers dotted
GETS = [("memcpy", "k--"), ("raw preadv", "C7--"), ("raw preadv cold", "C7:"),
        ("kvfs T0 get_into", "C0o-"), ("kvfs T1 get_into", "C1o-"), ("kvfs T1 get_into cold", "C1s-."),
        ("file-per-block", "C2^:"), ("diskcache", "C4v:"), ("redis", "C3x:")]
PUTS = [("raw pwrite", "k--"), ("kvfs T0 put_many", "C0o-"), ("kvfs T1 put", "C1o-"),
        ("file-per-block", "C2^:"), ("diskcache", "C4v:"), ("redis", "C3x:")]
GPU = [("pinned H2D", "k--"), ("T0 -> GPU", "C0o-"), ("T1 kvikio", "C1o-"), ("T1 staged", "C1s-.")]


def _mib(label: str) -> float:
    n, unit = label.split()
    return float(n) / 1024 if unit == "KiB" else float(n)


def _by_size(ax: Any, t: Table, series: list[tuple[str, str]], sizes: list[str]) -> None:
    xs = [_mib(s) for s in sizes]
    for name, style in series:
        row = next((r for r in t.rows if r[0] == name), None)
        if row is None:
            continue
        ys = [float(row[t.col(s)].split()[0]) for s in sizes]
        ax.plot(xs, ys, style, label=name, markersize=4)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, sizes)
    ax.set_ylabel("GB/s")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)


def throughput(src: Sources, path: Path) -> None:
    plt = _pyplot()
    compare = src.get("bench --compare")
    try:
        gpu: Source | None = src.get("bench --gpu --total", gpu=True)
    except TableError:
        gpu = None
    fig, axes = plt.subplots(1, 3 if gpu else 2, figsize=(16 if gpu else 11, 4.6))
    gets = table_named(compare.text, "gets, 1 thr: GB/s (x baseline)")
    puts = table_named(compare.text, "puts, 1 thr: GB/s (x baseline)")
    _by_size(axes[0], gets, GETS, gets.headers[1:])
    axes[0].set_title(f"reads into host memory, 1 thread\n(kvfs bench --compare, {compare.commit})", fontsize=9)
    _by_size(axes[1], puts, PUTS, puts.headers[1:])
    axes[1].set_title(f"writes from host memory, 1 thread\n(kvfs bench --compare, {compare.commit})", fontsize=9)
    if gpu:
        first, second = (t for t in tables(gpu.text) if t.headers[0] == "block")
        merged = Table(first.headers + second.headers[2:],
                       [a + b[2:] for a, b in zip(first.rows, second.rows)])
        flipped = Table(["system"] + [r[0] for r in merged.rows],
                        [[h] + [r[merged.col(h)] for r in merged.rows] for h in merged.headers[1:]])
        _by_size(axes[2], flipped, GPU, flipped.headers[1:])
        axes[2].set_title(f"reads into GPU memory\n(kvfs bench --gpu, {gpu.commit})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def ttft(src: Sources, path: Path) -> None:
    plt = _pyplot()
    s = src.get("demo-ttft --tokens", gpu=True)
    pts = ttft_points(s.text)
    fig, ax = plt.subplots(figsize=(7, 4.4))
    t0 = pts["T0"]
    ax.plot([p[0] for p in t0], [p[1] for p in t0], "k--o", label="recomputed (prefill)", markersize=4)
    for tier, style in (("T0", "C0o-"), ("T1", "C1s-")):
        if tier in pts:
            ax.plot([p[0] for p in pts[tier]], [p[2] for p in pts[tier]], style, markersize=4,
                    label=f"loaded from kvfs {tier} ({'shared memory' if tier == 'T0' else 'NVMe'})")
    ax.set_xlabel("prompt tokens (all but the last 64 cached)")
    ax.set_ylabel("time to first token, ms")
    gpu = re.search(r"cuda (.+)$", s.text.split("\n")[0])
    ax.set_title(f"Llama-3.1-8B shape, bf16, layer-wise loads{', ' + gpu[1] if gpu else ''}\n"
                 f"(kvfs demo-ttft, {s.commit})", fontsize=9)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def _pyplot() -> Any:
    matplotlib = need("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


CHARTS = {"throughput.png": throughput, "ttft.png": ttft}


def draw(sources: list[Source], folder: Path) -> list[Path]:
    """Every chart into ``folder``; the paths drawn."""
    src = Sources(sources)
    out = []
    for name, chart in CHARTS.items():
        chart(src, folder / name)
        out.append(folder / name)
    return out
