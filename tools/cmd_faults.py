"""`kvfs faults [--quick] [--only NAMES] [--dir DIR] [--json]`: the fault
campaign (kvfstools.faults) against real daemons; prints its figures."""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("faults", help="the fault campaign: crashes, full disk, corruption, fuzzing, dead clients, load")
    p.add_argument("--quick", action="store_true", help="short versions (3 crash cycles, 3 power cuts a mode, 5 s of fuzzing and of load)")
    p.add_argument("--only", default=None, help="comma-separated: crash,diskfull,corrupt,fuzz,deadclient,load,powercut")
    p.add_argument("--dir", default=None, help="work directory; each scenario's daemon logs are kept in DIR/logs "
                   "(default: a temporary one, logs not kept)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the figures as JSON")
    return p


def summary(name: str, r: dict[str, Any]) -> str:
    if r.get("ok") is None:
        return f"{name:<10} skipped: {r.get('skipped')}"
    head = f"{name:<10} {'ok' if r['ok'] else 'FAILED: ' + '; '.join(r['failures'])} ({r['wall_s']:.1f} s)"
    if name == "crash":
        rec, rs = r["recovery_s"], r["restart_s"]
        body = (f"{r['cycles']} kill -9 cycles; {r['sync_acked']} sync and {r['fast_acked']} fast puts acknowledged; "
                f"{r['reads_checked']} reads checked: {r['sync_lost']} sync lost, {r['wrong_bytes']} wrong bytes, "
                f"{r['fast_lost']} fast lost; recovery {rec['median'] * 1e3:.1f} ms median "
                f"({rec['max'] * 1e3:.1f} max), restart to serving {rs['median']:.2f} s median; "
                f"{r['compactions_finished']} of {r['cycles']} compactions finished before their kill "
                f"({r['segments_compacted']} segments freed); {r['orphans_after']} orphans left by cut puts")
    elif name == "powercut":
        body = "\n           ".join(
            f"{mode}: {m['cuts']} power cuts ({', '.join(f'{n} {k}' for k, n in m['cut_kinds'].items())}); {m['acked']} puts acknowledged, {m['must_survive']} that must survive: "
            f"{m['lost_must']} lost, {m['wrong_bytes']} wrong bytes; {m['lost_fast']} fast lost (oldest acknowledged "
            f"{m['oldest_lost_fast_s']:.2f} s before its cut, bound {m['bound_s']:.1f} s); {m['corrupt_after_recovery']} "
            f"objects recovery kept found corrupt by reads; {m['rebuilds']} index "
            f"rebuilds; recovery {m['recovery_s']['median'] * 1e3:.1f} ms median ({m['recovery_s']['max'] * 1e3:.1f} "
            f"max), restart to serving {m['restart_s']['median']:.2f} s median; {m['evicted']} evicted, "
            f"{m['compactions_finished']} compactions finished" for mode, m in r["modes"].items())
    elif name == "diskfull":
        body = f"{r['stored_before_full']} values stored, then: {r['error']!r}; readable, space back after deletes"
    elif name == "corrupt":
        body = (f"{r['payload_flips']} payload + {r['header_flips']} header flips: {r['dropped_by_recovery']} "
                f"dropped by recovery, {r['verify_found']} found by verify, "
                f"{r['served_wrong']} served wrong, {r['refused']} refused; index ({r['index_pages_garbled']} pages garbled): {r['index']}")
    elif name == "fuzz":
        body = (f"{r['frames_tried']} frames in {r['seconds']:.0f} s, {r['mount_operations_tried']} bad mount "
                "operations; daemon up, data intact")
    elif name == "deadclient":
        body = (f"{r['leases_held']} lease(s) of a killed client released in {r['leases_released_s'] * 1e3:.1f} ms; "
                f"{r['segments_waiting']} compacted segment(s) then freed")
    else:
        lat = ", ".join(f"{op} p50 {v['p50_ms']:.2f} / p99 {v['p99_ms']:.2f} ms" for op, v in r["latency"].items())
        body = (f"{r['clients']} processes x {r['seconds']:.0f} s: {r['operations']} ops ({r['ops_per_s']:.0f}/s), "
                f"{r['put_gb']:.2f} GB put, {r['errors']} errors, {r['wrong_bytes']} wrong bytes; {lat}")
    return head + "\n           " + body


def run(args: argparse.Namespace) -> int:
    from .faults import run as campaign

    only = args.only.split(",") if args.only else None
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="kvfs-faults-"))
    res = campaign(work, only, args.quick, lambda n, r: print(summary(n, r), flush=True),
                   keep_logs=args.dir is not None)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    failed = [n for n, r in res.items() if r.get("ok") is False]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0
