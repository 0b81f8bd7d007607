"""`kvfs rebuild-index --root DIR [--json]`: rebuild the LMDB index from the
segment files alone, with the daemon stopped (see kvfsd.rebuild)."""
from __future__ import annotations

import argparse
import json

from kvfs.sizes import format_size

from .progress import progress_bar
from .table import render


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("rebuild-index", help="rebuild the index from the segments (daemon stopped)")
    p.add_argument("--root", required=True, help="the store's root directory")
    p.add_argument("--json", action="store_true", help="print JSON")
    return p


def run(args: argparse.Namespace) -> int:
    from kvfsd.rebuild import rebuild_index

    rep = rebuild_index(args.root, progress_bar("scanning segments"))
    if args.json:
        print(json.dumps(rep.as_dict()))
        return 0
    rows = [
        ["segments scanned", f"{rep.segments} ({format_size(rep.bytes_scanned)})"],
        ["records", f"{rep.records} ({rep.records_bad} with a bad payload)"],
        ["objects rebuilt", rep.objects],
        ["keys not rebuilt (no intact put)", rep.objects_incomplete],
        ["namespaces", rep.namespaces],
        ["old index kept as", rep.old_index or "(there was none)"],
        ["time", f"{rep.seconds:.2f} s"],
    ]
    print(render(["rebuild-index", ""], rows))
    for line in rep.details[:20]:
        print(f"  {line}")
    if len(rep.details) > 20:
        print(f"  ... and {len(rep.details) - 20} more")
    print("object meta and access times are not in the segments: rebuilt objects have none")
    return 0
