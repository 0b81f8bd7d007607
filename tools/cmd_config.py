"""`kvfs config --show`: what `kvfs daemon` would run with, the same flags
given, and where each value came from (a default, a configuration file,
the command line): kvfstools.config_file."""
from __future__ import annotations

import argparse
import json
from typing import Any

from .cmd_daemon import DAEMON_PARSER, add_daemon_arguments
from .table import render

OWN = ("--show", "--json")  # this command's own flags; the rest are the daemon's


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("config", help="show the daemon's effective configuration and where each value comes from "
                                      "(the daemon's flags may be given, as to kvfs daemon)")
    p.add_argument("--show", action="store_true", help="print the effective configuration (the default)")
    p.add_argument("--json", action="store_true", help="as JSON: [{key, value, from}]")
    add_daemon_arguments(p)
    return p


def _text(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, list):
        return ", ".join(map(str, v)) if v else "-"
    return str(v)


def run(args: argparse.Namespace) -> int:
    from .config_file import daemon_settings, describe

    dargs, source = daemon_settings(args, "config", OWN)
    rows = describe(DAEMON_PARSER[0], dargs, source)
    if args.json:
        print(json.dumps(rows, indent=1, default=str))
    else:
        print(render(["setting", "value", "from"], [[r["key"], _text(r["value"]), r["from"]] for r in rows], left=3))
    return 0
