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
    p.add_argument("--watch", type=float, nargs="?", const=2.0, default=None, metavar="SECONDS",
                   help="redraw every SECONDS (default 2) with rates since the last draw; Ctrl-C ends")
    return p


def _ms(s: float) -> str:
    return "-" if s == 0 else (f"{s * 1e3:.2f} ms" if s != float("inf") else "> 10 s")


def rates(prev: dict[str, Any], cur: dict[str, Any], seconds: float) -> list[list[Any]]:
    """Per-second rates between two snapshots."""
    a, b = prev["counters"], cur["counters"]
    d = {k: (b.get(k, 0) - a.get(k, 0)) / seconds for k in b}
    lookups = d["hits"] + d["misses"]
    return [["puts", f"{d['puts']:.0f}/s ({format_size(d['put_bytes'])}/s)"],
            ["lookups", f"{lookups:.0f}/s" + (f" ({100 * d['hits'] / lookups:.1f}% hit)" if lookups else "")],
            ["deletes / evictions", f"{d['deletes']:.0f}/s / {d['evictions']:.0f}/s"],
            ["compaction", f"{format_size(d.get('compacted_bytes', 0))}/s copied"]]


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
        *([["index", f"{format_size(st['index']['used_bytes'])} of LMDB pages, {st['index']['commits']} commits"]]
          if st.get("index") else []),
        ["leases", st["leases"]],
        ["connections", st.get("connections", 0)],
        ["hits / misses", f"{c['hits']} / {c['misses']}" + (f" ({100 * c['hits'] / lookups:.1f}% hit)" if lookups else "")],
        ["puts", f"{c['puts']} ({format_size(c['put_bytes'])}), {c['puts_existing']} already there"],
        ["deletes / evictions", f"{c['deletes']} / {c['evictions']}"],
        ["compactions", f"{c.get('compactions', 0)} segments ({format_size(c.get('compacted_bytes', 0))} copied)"],
        ["corrupt dropped", c["corrupt_dropped"]],
        ["uptime", f"{st['uptime_s']:.0f} s"],
        ["data plane", st.get("data_plane", "?") + ("" if st.get("data_plane") != "python" else
                                                    " (kvfs._native not built, or KVFS_NATIVE=0: slower)")],
    ]
    t0 = st["tiers"]["T0"]
    if t0.get("capacity_bytes"):
        huge = t0.get("huge_page_bytes", 0)
        rows.append(["T0 arena", f"{t0['path']}, " + (f"{format_size(huge)} on 2 MiB pages" if huge else
                                                      "4 KiB pages (README, tuning: huge=advise)")])
    d = st.get("directory")
    if d:
        # clients answer contains/prefix_match from it; objects outside make them ask the daemon
        rows.append(["directory", f"{d['entries']} of {d['slots']} slots, "
                     + ("complete" if d.get("complete", True) else
                        f"{d['outside']} objects outside, the oldest (misses are asked of the daemon: "
                        "raise --dir-slots)")
                     + (f"; {d['refilled']} refilled after removals" if d.get("refilled") else "")])
    acc = st.get("access")
    if acc:
        granted = [f"uid {u}: {r}" for u, r in acc["uids"].items()] + [f"gid {g}: {r}" for g, r in acc["gids"].items()]
        rows.append(["admitted", f"uid {acc['owner_uid']} (the daemon's), root"
                     + (f"; {', '.join(granted)}" if granted else "; nobody else")])
    mnt = st.get("mount")
    if mnt:
        what = {"c": f"the C mount ({mnt.get('threads', '?')} threads)", "pyfuse3": "pyfuse3's mount"}
        rows.append(["mount", f"{mnt['path']}: {what.get(mnt['impl'], mnt['impl'])}"
                     + (f" (the C mount could not be used: {mnt['why']})" if mnt.get("why") else "")
                     + f"; read {format_size(mnt['read_bytes'])}, written {format_size(mnt['write_bytes'])}, "
                     f"{mnt['commits']} files stored"])
    out = [render(["store", ""], rows), ""]
    out.append(render(["stripe", "segments", "disk", "live", "chunks"],
                      [[s["path"], s["segments"], format_size(s["disk_bytes"]), format_size(s["live_bytes"]),
                        s.get("chunks", "")] for s in st["stripes"]]))
    out += ["", render(["tier", "capacity", "objects", "bytes", "hits", "misses", "evictions", "promotions",
                        "write-back backlog"], tier_rows(st))]
    if st["tiers"].get("T2"):
        out += ["", render(["shared tier (T2)", ""], shared_tier_rows(st["tiers"]["T2"]))]
    if st.get("requests"):
        out += ["", render(["request", "count", "p50", "p99", "mean"],
                           [[op, h["count"], _ms(h["p50_s"]), _ms(h["p99_s"]), _ms(h["sum_s"] / max(1, h["count"]))]
                            for op, h in st["requests"].items()])]
    if st["namespaces"]:
        out += ["", render(["namespace", "objects"], sorted(st["namespaces"].items()))]
    if st.get("connectors"):
        out += ["", render(["engine adapter (namespace)", "lookups", "hit tokens", "loaded", "load time",
                            "saved", "save time", "dropped / failed", "errors"], connector_rows(st["connectors"]))]
    if "client" in st:
        out += ["", render(["this client", ""], [[k, v] for k, v in st["client"].items()])]
    return "\n".join(out)


def connector_rows(conns: dict[str, Any]) -> list[list[Any]]:
    """One row per namespace an engine adapter (vLLM, LMCache) reported."""
    rows = []
    for ns, r in sorted(conns.items()):
        c = r["counters"]
        g = c.get
        rows.append([ns, g("lookups", 0), g("hit_tokens", 0),
                     f"{g('blocks_loaded', 0)} ({format_size(g('bytes_loaded', 0))})", _ms(g("load_us", 0) / 1e6),
                     f"{g('blocks_saved', 0)} ({format_size(g('bytes_saved', 0))})", _ms(g("save_us", 0) / 1e6),
                     f"{g('saves_dropped', 0)} / {g('saves_failed', 0)}",
                     g("errors", 0) + g("load_errors", 0) + g("unavailable", 0)])
    return rows


def shared_tier_rows(t2: dict[str, Any]) -> list[list[Any]]:
    """The shared tier's configuration, health, queue and traffic."""
    s3, pr = t2["s3"], t2["presence"]
    rows = [["bytes", f"{t2['url']}" + (f" at {s3['endpoint']}" if s3.get("endpoint") else "")
             + f" (credentials: {s3['credentials']}): {s3['state']}"],
            ["presence index", "none: lookups are S3 HEAD requests" if pr is None else
             f"{pr['url']} ({'cluster' if pr['cluster'] else 'one server'}): {pr['state']}"
             + "".join(f"; {n} {st}" for n, st in pr["nodes"].items() if st != "up")],
            ["written through", ", ".join(t2["namespaces"])],
            ["upload queue", f"{t2['queue']} waiting (at most {t2['queue_max']}), {t2['uploading']} uploading"],
            ["uploaded", f"{t2['uploaded']} ({format_size(t2['bytes_up'])}), {t2['upload_existing']} there already, "
                         f"{t2['upload_dropped']} dropped (queue full)"],
            ["read through", f"{t2['hits']} hits ({format_size(t2['bytes_down'])}), {t2['misses']} misses"],
            ["remote lookups", f"{t2['lookups']} keys, {t2['lookup_hits']} held remotely"],
            ["errors", f"{t2['errors']} (corrupt refused {t2['corrupt']}, stale records repaired "
                       f"{t2['stale_repaired']})"]]
    return rows


def tier_rows(st: dict[str, Any]) -> list[list[Any]]:
    t0, t1 = st["tiers"]["T0"], st["tiers"]["T1"]
    c = st["counters"]
    rows = []
    if t0.get("capacity_bytes"):
        journal = f", journal {format_size(t0['journal_bytes'])}" if "journal_bytes" in t0 else ""
        rows.append(["T0 shm", format_size(t0["capacity_bytes"]), t0["objects"], format_size(t0["bytes"]),
                     t0["hits"], t0["misses"], t0["evictions"], t0["promotions"],
                     f"{t0['writeback_objects']} ({format_size(t0['writeback_bytes'])}{journal})"])
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
        if args.watch is None:
            print(json.dumps(st, indent=2, sort_keys=True) if args.json else format_stats(st))
            return 0
        return watch(store, st, args.watch, args.json)


def watch(store: Any, st: dict[str, Any], every: float, as_json: bool) -> int:
    """Redraw (or, with --json, print one line per snapshot) until Ctrl-C."""
    import time
    client = st.pop("client")
    prev, t_prev = st, time.monotonic()
    try:
        while True:
            time.sleep(every)
            cur, now = store.stats(), time.monotonic()
            r = rates(prev, cur, now - t_prev)
            if as_json:
                print(json.dumps({"stats": cur, "rates": dict(r)}), flush=True)
            else:
                cur["client"] = client
                print("\033[H\033[2J" + render([f"last {now - t_prev:.1f} s", ""], r) + "\n\n" + format_stats(cur),
                      flush=True)
                cur.pop("client")
            prev, t_prev = cur, now
    except KeyboardInterrupt:
        return 0
