"""`kvfs verify [--deep] [--repair] [--root DIR] [--json]`: reconcile the
index and the segments both ways (kvfsd.verify), through the running daemon
or, with --root, offline (daemon stopped)."""
from __future__ import annotations

import argparse
import json
from typing import Any, Callable

from kvfs.sizes import format_size

from .cli import add_socket_arg
from .progress import progress_bar
from .table import render


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("verify", help="check the index against the segments and back (--repair fixes)")
    add_socket_arg(p)
    p.add_argument("--deep", action="store_true", help="hash every payload too (reads every byte)")
    p.add_argument("--repair", action="store_true",
                   help="drop broken objects, index orphans (intact values the index lost)")
    p.add_argument("--root", default=None, help="verify this store offline (its daemon stopped)")
    p.add_argument("--json", action="store_true", help="print JSON")
    return p


def _progress(enabled: bool) -> Callable[[str, int, int], None] | None:
    """One bar per phase (objects checked, then bytes of segments scanned)."""
    if not enabled:
        return None
    bars: dict[str, Any] = {}

    def show(phase: str, done: int, total: int) -> None:
        if phase not in bars:
            bars[phase] = progress_bar(f"verify: {phase:<8}")
        if bars[phase] is not None:
            bars[phase](done, total)
    return show


def format_verify(r: dict[str, Any]) -> str:
    rows = [
        ["mode", f"{r['mode']}{', deep' if r['deep'] else ''}"],
        ["objects checked", f"{r['objects']} ({r['chunks']} chunks)"],
        ["broken objects", r["broken_count"]],
        ["orphans (intact, not indexed)", r["orphan_count"]],
        ["segments scanned", f"{r['segments']} ({format_size(r['bytes_scanned'])})"],
        ["records", f"{r['records']}" + (f" ({r['records_bad']} with a bad payload)" if r["deep"] else "")],
        ["repaired", f"{r['repaired_dropped']} dropped, {r['repaired_indexed']} indexed"],
        ["time", f"{r['seconds']:.2f} s"],
    ]
    out = [render(["verify", ""], rows)]
    for ns, key, reason in r["broken"][:20]:
        out.append(f"  broken  {ns}/{key}: {reason}")
    for ns, key, size in r["orphans"][:20]:
        out.append(f"  orphan  {ns}/{key} ({format_size(size)})")
    shown = min(20, len(r["broken"])) + min(20, len(r["orphans"]))
    if r["broken_count"] + r["orphan_count"] > shown:
        out.append(f"  ... and {r['broken_count'] + r['orphan_count'] - shown} more (--json lists up to 1000 of each)")
    return "\n".join(out)


def problems_left(r: dict[str, Any]) -> bool:
    return r["broken_count"] > r["repaired_dropped"] or r["orphan_count"] > r["repaired_indexed"]


def run(args: argparse.Namespace) -> int:
    progress = _progress(not args.json)
    if args.root is not None:
        from kvfsd.verify import verify_offline
        r = verify_offline(args.root, args.deep, args.repair, progress).as_dict()
    else:
        import kvfs
        with kvfs.connect(args.socket) as store:
            r = store.verify_store(deep=args.deep, repair=args.repair, progress=progress)
    print(json.dumps(r) if args.json else format_verify(r))
    return 1 if problems_left(r) else 0
