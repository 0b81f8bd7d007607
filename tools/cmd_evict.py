"""`kvfs evict --to SIZE [--ns NS] [--json]`: evict least recently used
objects until the values of NS (or of the whole store) total at most SIZE."""
from __future__ import annotations

import argparse
import json
from typing import Any

from kvfs.sizes import format_size, parse_size

from .cli import add_socket_arg
from .table import render


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("evict", help="evict least recently used objects down to a size (a table; --json)")
    add_socket_arg(p)
    p.add_argument("--to", required=True, type=parse_size, metavar="SIZE",
                   help="keep at most this many bytes of values, e.g. 10G or 0")
    p.add_argument("--ns", default=None, help="evict only from this namespace (its values count, not the store's)")
    p.add_argument("--json", action="store_true", help="print JSON")
    return p


def format_evict(r: dict[str, Any]) -> str:
    rows = [
        ["scope", r["ns"] if r["ns"] is not None else "(all namespaces)"],
        ["objects evicted", r["objects"]],
        ["values", f"{format_size(r['bytes_before'])} -> {format_size(r['bytes_after'])} "
                   f"(target {format_size(r['to'])}{'' if r['reached'] else ', NOT reached'})"],
        ["disk used", f"{format_size(r['disk_before'])} -> {format_size(r['disk_after'])}"],
        ["skipped (in use)", r["skipped_in_use"]],
    ]
    out = render(["evict", ""], rows)
    if not r["reached"]:
        out += "\nthe rest is in use (leased by a reader, or still being written back); try again later"
    if r["objects"] and r["disk_before"] - r["disk_after"] < r["bytes_before"] - r["bytes_after"]:
        out += ("\ndisk space comes back as whole segments die; survivors of partly-dead segments "
                "keep theirs until compaction")
    return out


def run(args: argparse.Namespace) -> int:
    import kvfs

    with kvfs.connect(args.socket) as store:
        r = store.evict(args.to, ns=args.ns)
    print(json.dumps(r) if args.json else format_evict(r))
    return 0 if r["reached"] else 1
