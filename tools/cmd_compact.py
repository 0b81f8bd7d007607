"""`kvfs compact [--threshold R] [--stripe DIR] [--json]`: copy the live
records of mostly-dead sealed segments forward and free those segments,
while the daemon serves (kvfsd.compaction)."""
from __future__ import annotations

import argparse
import json
from typing import Any

from kvfs.sizes import format_size

from .cli import add_socket_arg
from .progress import progress_bar
from .table import render


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
    out = render(["compact", ""], rows)
    if r["stopped_for_room"]:
        out += "\nstopped early: not enough free space for the copies (evict or add a stripe first)"
    return out


def run(args: argparse.Namespace) -> int:
    import kvfs

    bar = None if args.json else progress_bar("compact: copying")
    with kvfs.connect(args.socket) as store:
        r = store.compact(threshold=args.threshold, stripe=args.stripe,
                          progress=(lambda _phase, d, t: bar(d, t)) if bar is not None else None)
    print(json.dumps(r) if args.json else format_compact(r))
    return 0
