"""`kvfs compact [--threshold R] [--stripe DIR] [--json]`: copy the live
records of mostly-dead segments forward (an open one is sealed first) and
free those segments, while the daemon serves (kvfsd.compaction); then name
the segments that still hold dead bytes, and why."""
from __future__ import annotations

import argparse
import json
from typing import Any

from kvfs.sizes import format_size

from .cli import add_socket_arg
from .progress import progress_bar
from .table import render

MAX_LISTED = 20  # segments named in the table; --json has them all


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("compact", help="reclaim the dead bytes of mostly-dead segments (online)")
    add_socket_arg(p)
    p.add_argument("--threshold", type=float, default=None, metavar="R",
                   help="compact segments at least this share dead, in (0, 1] (default: the daemon's, 0.5)")
    p.add_argument("--stripe", default=None, metavar="DIR", help="only this stripe directory")
    p.add_argument("--json", action="store_true", help="print JSON")
    return p


def format_compact(r: dict[str, Any]) -> str:
    rows = [
        ["segments freed", r["segments"]],
        ["... of which waiting for readers' leases", r["segments_pending_lease"]],
        ["objects moved", f"{r['objects_moved']} ({format_size(r['bytes_copied'])} copied)"],
        ["disk space reclaimed", format_size(r["bytes_reclaimed"])],
        ["skipped (changed meanwhile)", r["chunks_skipped"]],
        ["corrupt objects dropped", r["corrupt_dropped"]],
        ["time", f"{r['seconds']:.2f} s"],
    ]
    if r.get("open_segments_sealed"):
        rows.insert(1, ["open segments sealed to be compacted", r["open_segments_sealed"]])
    left = r.get("not_reclaimed", [])
    rows.insert(-1, ["dead bytes left", f"{format_size(r.get('dead_bytes_left', 0))} in {len(left)} segment(s)"])
    out = render(["compact", ""], rows)
    if r["stopped_for_room"]:
        out += "\nstopped early: not enough free space for the copies (evict or add a stripe first)"
    if left:
        shown = sorted(left, key=lambda x: -x["dead_bytes"])[:MAX_LISTED]
        out += "\n\nnot reclaimed:\n" + render(
            ["segment", "stripe", "dead", "why"],
            [[x["segment"], x["stripe"], f"{format_size(x['dead_bytes'])} ({x['dead_share']:.0%})", x["reason"]]
             for x in shown])
        if len(left) > len(shown):
            out += f"\n... and {len(left) - len(shown)} more (--json lists them all)"
    return out


def run(args: argparse.Namespace) -> int:
    import kvfs

    bar = None if args.json else progress_bar("compact: copying")
    with kvfs.connect(args.socket) as store:
        r = store.compact(threshold=args.threshold, stripe=args.stripe,
                          progress=(lambda _phase, d, t: bar(d, t)) if bar is not None else None)
    print(json.dumps(r) if args.json else format_compact(r))
    return 0
