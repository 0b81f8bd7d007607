"""`kvfs` command dispatcher: each subcommand lives in its own module with
``add_parser(subparsers)`` and ``run(args) -> int``."""
from __future__ import annotations

import argparse
import importlib
import sys

from kvfs.errors import KvfsError

COMMANDS = ["daemon", "config", "doctor", "stats", "ls", "du", "evict", "compact", "gc", "verify", "rebuild_index", "faults", "put", "get", "rm", "bench", "demo", "demo_ttft"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvfs", description="kvfs token warehouse: daemon and admin tools")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        mod = importlib.import_module(f"kvfstools.cmd_{name}")
        sp = mod.add_parser(sub)
        sp.set_defaults(_run=mod.run)
    return p


def add_socket_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", default=None, help="daemon socket (default $KVFS_SOCKET, else ~/.kvfs/kvfs.sock)")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args._argv = argv  # the command line itself (kvfs daemon layers its config files under it)
    try:
        return int(args._run(args) or 0)
    except KvfsError as e:
        print(f"kvfs {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
