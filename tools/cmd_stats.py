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
    out += ["", render(["tier", "capacity", "objects", "bytes", "hits", "misses", "evictions", "promotions",
                        "write-back backlog"], tier_rows(st))]
    if st["namespaces"]:
        out += ["", render(["namespace", "objects"], sorted(st["namespaces"].items()))]
    if "client" in st:
        out += ["", render(["this client", ""], [[k, v] for k, v in st["client"].items()])]
    return "\n".join(out)


def tier_rows(st: dict[str, Any]) -> list[list[Any]]:
    t0, t1 = st["tiers"]["T0"], st["tiers"]["T1"]
    c = st["counters"]
    rows = []
    if t0.get("capacity_bytes"):
        rows.append(["T0 shm", format_size(t0["capacity_bytes"]), t0["objects"], format_size(t0["bytes"]),
                     t0["hits"], t0["misses"], t0["evictions"], t0["promotions"],
                     f"{t0['writeback_objects']} ({format_size(t0['writeback_bytes'])})"])
    else:
        rows.append(["T0 shm", "off", "", "", "", "", "", "", ""])
    rows.append(["T1 disk", format_size(st["capacity_bytes"]), t1["objects"], format_size(t1["bytes"]),
                 t1["hits"], t1["misses"], c["evictions"], "", ""])
    return rows


def run(args: argparse.Namespace) -> int:
    import kvfs

    with kvfs.connect(args.socket) as store:
        st = store.stats()
        st["client"] = store.capabilities()  # what a client on this machine can use (CUDA, kvikio, GDS)
    print(json.dumps(st, indent=2, sort_keys=True) if args.json else format_stats(st))
    return 0
