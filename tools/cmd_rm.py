"""`kvfs rm NS KEY...`: delete objects."""
from __future__ import annotations

import argparse
import sys

from .cli import add_socket_arg


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("rm", help="delete NS/KEY...")
    add_socket_arg(p)
    p.add_argument("ns")
    p.add_argument("keys", nargs="+")
    return p


def run(args: argparse.Namespace) -> int:
    import kvfs

    with kvfs.connect(args.socket) as store:
        n = store.delete(args.keys, ns=args.ns)
    print(f"deleted {n} of {len(args.keys)}", file=sys.stderr)
    return 0 if n == len(args.keys) else 1
