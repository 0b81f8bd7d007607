"""`kvfs du [NS] [--json]`: objects and bytes per namespace (all, or NS)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from kvfs.sizes import format_size

from .cli import add_socket_arg
from .table import render


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("du", help="objects and bytes per namespace (a table; --json for machines)")
    add_socket_arg(p)
    p.add_argument("ns", nargs="?", help="only this namespace")
    p.add_argument("--json", action="store_true", help="print JSON")
    return p


def usage(store: Any, names: list[str], progress: bool) -> list[dict[str, Any]]:
    """Per namespace: objects, bytes (values' sizes), and bytes per tier."""
    out = []
    for i, ns in enumerate(names):
        row: dict[str, Any] = {"ns": ns, "objects": 0, "bytes": 0, "tiers": {}}
        for o in store.objects(ns):
            row["objects"] += 1
            row["bytes"] += o["size"]
            row["tiers"][o["tier"]] = row["tiers"].get(o["tier"], 0) + o["size"]
            if progress and row["objects"] % 100000 == 0:
                print(f"\r{ns}: {row['objects']} objects ({i + 1}/{len(names)} namespaces)", end="", file=sys.stderr)
        out.append(row)
    if progress:
        print("\r\033[K", end="", file=sys.stderr)
    return out


def run(args: argparse.Namespace) -> int:
    import kvfs

    with kvfs.connect(args.socket) as store:
        names = [args.ns] if args.ns is not None else store.namespaces()
        rows = usage(store, names, progress=not args.json and sys.stderr.isatty())
    if args.json:
        print(json.dumps({"namespaces": rows, "objects": sum(r["objects"] for r in rows),
                          "bytes": sum(r["bytes"] for r in rows)}))
        return 0
    table = [[r["ns"], r["objects"], format_size(r["bytes"]),
              ", ".join(f"{t} {format_size(b)}" for t, b in sorted(r["tiers"].items()))] for r in rows]
    table.append(["total", sum(r["objects"] for r in rows), format_size(sum(r["bytes"] for r in rows)), ""])
    print(render(["namespace", "objects", "bytes", "by tier"], table))
    return 0
