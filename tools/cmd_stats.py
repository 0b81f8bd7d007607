"""`kvfs stats`: what the daemon holds and how it is doing."""
from __future__ import annotations

import argparse
import json
from typing import Any

from kvfs.sizes import format_size

from .cli import add_socket_arg
from .table import render


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("stats", help="show store statistics (a table; --json for machines)")
    add_socket_arg(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    return p


def format_stats(st: dict[str, Any]) -> str:
    c = st["counters"]
    lookups = c["hits"] + c["misses"]
    rows = [
        ["durability", st["durability"]],
        ["capacity", format_size(st["capacity_bytes"])],
        ["disk used", f"{format_size(st['disk_bytes'])} ({100 * st['disk_bytes'] / max(1, st['capacity_bytes']):.1f}%)"],
        ["live / dead", f"{format_size(st['live_bytes'])} / {format_size(st['dead_bytes'])}"],
        ["objects", f"{st['objects']} ({format_size(st['logical_bytes'])})"],
        ["segments", st["segments"]],
        ["leases", st["leases"]],
        ["connections", st.get("connections", 0)],
        ["hits / misses", f"{c['hits']} / {c['misses']}" + (f" ({100 * c['hits'] / lookups:.1f}% hit)" if lookups else "")],
        ["puts", f"{c['puts']} ({format_size(c['put_bytes'])}), {c['puts_existing']} already there"],
        ["deletes / evictions", f"{c['deletes']} / {c['evictions']}"],
        ["corrupt dropped", c["corrupt_dropped"]],
        ["uptime", f"{st['uptime_s']:.0f} s"],
    ]
    out = [render(["store", ""], rows), ""]
    out.append(render(["stripe", "segments", "disk", "live"],
                      [[s["path"], s["segments"], format_size(s["disk_bytes"]), format_size(s["live_bytes"])]
                       for s in st["stripes"]]))
    if st["namespaces"]:
        out += ["", render(["namespace", "objects"], sorted(st["namespaces"].items()))]
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    import kvfs

    with kvfs.connect(args.socket) as store:
        st = store.stats()
    print(json.dumps(st, indent=2, sort_keys=True) if args.json else format_stats(st))
    return 0
