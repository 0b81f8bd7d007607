"""`kvfs doctor`: what this node offers kvfs (FUSE, shared memory, huge
pages, CUDA and kvikio, NIXL, the stripes' filesystems, the root's
permissions, the integration packages), without a daemon running. Takes
the daemon's flags (and reads its configuration files) to know what is
asked for; exits 1 when something asked for is missing (kvfstools.doctor)."""
from __future__ import annotations

import argparse
import json

from .cmd_daemon import add_daemon_arguments
from .table import render

OWN = ("--json",)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("doctor", help="check what this node offers kvfs, before a daemon runs (the daemon's flags "
                                      "may be given: a missing thing they ask for makes it exit 1)")
    p.add_argument("--json", action="store_true", help="as JSON: [{name, status, detail, fix, needed}]")
    add_daemon_arguments(p)
    return p


def run(args: argparse.Namespace) -> int:
    from .config_file import daemon_settings
    from .doctor import MISSING, run_checks

    cfg, _source = daemon_settings(args, "doctor", OWN)
    checks = run_checks(cfg)
    if args.json:
        print(json.dumps([c.as_dict() for c in checks], indent=1))
    else:
        print(render(["check", "status", "detail", "fix"],
                     [[c.name, c.status + (" (asked for)" if c.needed and c.status == MISSING else ""), c.detail,
                       c.fix] for c in checks], left=4))
    return 1 if any(c.needed and c.status == MISSING for c in checks) else 0
