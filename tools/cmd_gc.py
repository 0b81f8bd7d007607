"""`kvfs gc --remote --older-than AGE [--dry-run] [--json]`: remove the
shared tier's objects (S3) and presence records (Redis/Valkey) not
accessed for AGE, through the daemon that has the shared tier configured
(kvfsd.shared_tier.SharedTier.gc). Local space needs no gc: eviction and
compaction keep it."""
from __future__ import annotations

import argparse
import json
from typing import Any

from kvfs.errors import InvalidArgument
from kvfs.sizes import parse_age

from .cli import add_socket_arg
from .progress import progress_count
from .table import render


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("gc", help="remove shared-tier objects by last access (--remote)")
    add_socket_arg(p)
    p.add_argument("--remote", action="store_true", help="the shared tier (the only one gc applies to)")
    p.add_argument("--older-than", required=True, metavar="AGE",
                   help="remove what was not accessed for AGE: 3600, 30m, 12h, 7d")
    p.add_argument("--dry-run", action="store_true", help="count what would go, remove nothing")
    p.add_argument("--json", action="store_true", help="print JSON")
    return p


def format_gc(r: dict[str, Any]) -> str:
    verb = "would remove" if r.get("dry_run") else "removed"
    return render(["gc --remote", ""], [
        ["presence records scanned", r.get("records_scanned", 0)],
        ["objects scanned", r.get("objects_scanned", 0)],
        [f"{verb} (last access older than {r['older_than_s']:.0f} s)", r.get("removed", 0)],
        [f"{verb} (no presence record, uploaded as long ago)", r.get("removed_unindexed", 0)],
    ])


def run(args: argparse.Namespace) -> int:
    import kvfs

    if not args.remote:
        raise InvalidArgument("kvfs gc works on the shared tier: pass --remote")
    try:
        age = parse_age(args.older_than)
    except ValueError as e:
        raise InvalidArgument(str(e)) from None
    show = None if args.json else progress_count("gc --remote: scanned")
    with kvfs.connect(args.socket) as store:
        r = store.gc_remote(age, dry_run=args.dry_run, progress=show)
    if show is not None:
        show("", -1, 0)
    print(json.dumps(r) if args.json else format_gc(r))
    return 0
